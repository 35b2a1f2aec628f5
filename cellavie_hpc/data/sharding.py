"""Sharding a tile plan across data-parallel ranks, reshuffled every epoch.

Every rank computes the whole assignment from `(plan, world_size, seed, epoch)` alone and keeps its
own share, so no communication is needed and any rank (or `cellavie tiles plan`) can reproduce any
other rank's share. The invariants that keep collectives from deadlocking and epochs complete:

* shares are disjoint and their union is the plan (`remainder="pad"` appends repeats, flagged in
  `Shard.padded`; `remainder="drop"` leaves out fewer than `world_size` tiles, counted in `Shard.dropped`);
* every rank holds the same number of tiles, hence runs the same number of steps per epoch;
* without locality, shares differ by at most one tile before padding.

`locality=True` assigns whole images to ranks (greedy, largest first) so that a rank opens only its
own files; when there are fewer images than ranks, images are split into contiguous runs instead.
Balance is then by image, so with `remainder="pad"` lighter ranks repeat some of their own tiles and
with `remainder="drop"` heavier ranks leave some out: fewer files per rank, paid for in repeats.
"""
from __future__ import annotations

import dataclasses
import heapq
from typing import Literal

import numpy as np

from cellavie_hpc.data.tiling import TilePlan
from cellavie_hpc.errors import ConfigError

Remainder = Literal["pad", "drop"]
Balance = Literal["count", "cost"]
REMAINDERS: tuple[str, ...] = ("pad", "drop")
BALANCES: tuple[str, ...] = ("count", "cost")


@dataclasses.dataclass(frozen=True, eq=False)
class Shard:
    """The tiles one rank trains on in one epoch, in the order it should read them."""

    rank: int
    world_size: int
    epoch: int
    tiles: np.ndarray  # (n, 3) int64 (image, y, x)
    padded: np.ndarray  # (n,) bool: True for repeats added by remainder="pad"
    dropped: int  # tiles of the plan left out this epoch, summed over all ranks

    def __len__(self) -> int:
        return int(self.tiles.shape[0])

    def images(self) -> np.ndarray:
        """Sorted indices of the images this rank reads."""
        return np.unique(self.tiles[:, 0])

    def steps(self, batch: int, drop_last_batch: bool = True) -> int:
        """Steps of `batch` tiles this rank runs per epoch (the same on every rank)."""
        return _steps(len(self), batch, drop_last_batch)


def epoch_rng(seed: int, epoch: int, rank: int | None = None) -> np.random.Generator:
    """The PCG64 generator of an epoch (or of one rank within it), the same in every process."""
    entropy = [int(seed), int(epoch)]
    sequence = np.random.SeedSequence(entropy) if rank is None else np.random.SeedSequence(entropy, spawn_key=(rank,))
    return np.random.Generator(np.random.PCG64(sequence))


def steps_per_epoch(
    plan_size: int, world_size: int, batch: int, remainder: Remainder = "pad", drop_last_batch: bool = True
) -> int:
    """Steps every rank runs per epoch when tiles are sharded without locality.

    Each rank holds ceil(N/W) tiles with `pad` and floor(N/W) with `drop`; a last partial batch
    is skipped when `drop_last_batch` (as the pipeline does by default).
    """
    world_size = _check_int(world_size, "world_size", minimum=1)
    _check_choice(remainder, REMAINDERS, "remainder")
    plan_size = _check_int(plan_size, "plan_size", minimum=0)
    per_rank = -(-plan_size // world_size) if remainder == "pad" else plan_size // world_size
    return _steps(per_rank, batch, drop_last_batch)


def shard_all(
    plan: TilePlan,
    world_size: int,
    epoch: int = 0,
    seed: int = 0,
    *,
    shuffle: bool = True,
    remainder: Remainder = "pad",
    locality: bool = False,
    balance: Balance = "count",
    costs: np.ndarray | None = None,
) -> list[Shard]:
    """The shares of all ranks for one epoch (see the module docstring for the invariants).

    `balance="cost"` balances the summed `costs` (one positive number per tile, e.g. bytes to
    read; default: in-bounds pixels, which differ only for reflect-border tiles) instead of counts:
    without locality tiles are dealt largest-first in a snake order so counts stay within one.
    """
    world_size = _check_int(world_size, "world_size", minimum=1)
    return _shares(plan, world_size, list(range(world_size)), epoch, seed, shuffle, remainder, locality, balance, costs)


def shard(
    plan: TilePlan,
    world_size: int,
    rank: int,
    epoch: int = 0,
    seed: int = 0,
    *,
    shuffle: bool = True,
    remainder: Remainder = "pad",
    locality: bool = False,
    balance: Balance = "count",
    costs: np.ndarray | None = None,
) -> Shard:
    """This rank's share of `plan` for `epoch` (computed identically by every process, in O(plan) time)."""
    world_size = _check_int(world_size, "world_size", minimum=1)
    rank = _check_int(rank, "rank", minimum=0)
    if rank >= world_size:
        raise ConfigError(f"rank {rank} is out of range for world size {world_size} (ranks are 0..{world_size - 1})")
    return _shares(plan, world_size, [rank], epoch, seed, shuffle, remainder, locality, balance, costs)[0]


def shard_table(shares: list[Shard], batch: int, drop_last_batch: bool = True) -> list[dict[str, int]]:
    """One row per rank: tiles, padded repeats, images touched and steps per epoch at `batch`."""
    return [
        {
            "rank": s.rank,
            "tiles": len(s),
            "padded": int(s.padded.sum()),
            "images": int(s.images().size),
            "steps_per_epoch": s.steps(batch, drop_last_batch),
        }
        for s in shares
    ]


def _shares(plan, world_size, ranks, epoch, seed, shuffle, remainder, locality, balance, costs) -> list[Shard]:
    epoch = _check_int(epoch, "epoch", minimum=0)
    seed = _check_int(seed, "seed", minimum=0)
    _check_choice(remainder, REMAINDERS, "remainder")
    _check_choice(balance, BALANCES, "balance")
    n = len(plan)
    if n == 0:
        raise ConfigError("the tile plan is empty: the patch is larger than every image (use border=reflect or a smaller patch)")
    tile_costs = _tile_costs(plan, costs) if balance == "cost" else None
    if not locality:
        return _dealt(plan, world_size, ranks, epoch, seed, shuffle, remainder, tile_costs)
    if np.count_nonzero(plan.tiles_per_image()) >= world_size:
        owner = _image_owners(plan, world_size, tile_costs)[plan.images]
        sizes = np.bincount(owner, minlength=world_size)
        if len(ranks) == 1:
            members = [np.flatnonzero(owner == ranks[0])]
        else:
            grouped = np.argsort(owner, kind="stable")
            members = np.split(grouped, np.cumsum(sizes)[:-1])
    else:
        # Fewer images than ranks: contiguous runs of the image-major plan, each rank touching few images.
        bounds = np.array([r * n // world_size for r in range(world_size + 1)], dtype=np.int64)
        sizes = np.diff(bounds)
        members = [np.arange(bounds[r], bounds[r + 1], dtype=np.int64) for r in (ranks if len(ranks) == 1 else range(world_size))]
    return _equalized(plan, ranks, members, sizes, world_size, epoch, seed, shuffle, remainder)


def _dealt(plan, world_size, ranks, epoch, seed, shuffle, remainder, tile_costs) -> list[Shard]:
    """Deal the (shuffled) plan round-robin; by descending cost in snake order for cost balance."""
    n = len(plan)
    order = epoch_rng(seed, epoch).permutation(n) if shuffle else np.arange(n, dtype=np.int64)
    if tile_costs is not None:
        order = order[np.argsort(-tile_costs[order], kind="stable")]
    extra = (-n) % world_size if remainder == "pad" else 0
    kept = n - (n % world_size if remainder == "drop" else 0)
    total = kept + extra
    rounds = np.arange(total // world_size, dtype=np.int64)
    shares = []
    for rank in ranks:
        if tile_costs is None:
            position = rounds * world_size + rank
        else:
            position = rounds * world_size + np.where(rounds % 2 == 1, world_size - 1 - rank, rank)
            if shuffle:
                position = position[epoch_rng(seed, epoch, rank).permutation(position.size)]
        # Positions past the kept tiles wrap to the start of the order: repeats, flagged as padding.
        padded = position >= kept
        index = order[np.where(padded, (position - kept) % n, position)]
        shares.append(Shard(rank, world_size, epoch, plan.tiles[index], padded, n - kept))
    return shares


def _image_owners(plan: TilePlan, world_size: int, tile_costs: np.ndarray | None) -> np.ndarray:
    """Rank of each image: whole images, largest first onto the least-loaded rank (LPT)."""
    if tile_costs is None:
        image_cost = plan.tiles_per_image().astype(np.float64)
    else:
        image_cost = np.bincount(plan.images, weights=tile_costs, minlength=len(plan.image_sizes))
    present = np.flatnonzero(plan.tiles_per_image() > 0)
    ranked = present[np.lexsort((present, -image_cost[present]))]
    loads = [(0.0, r) for r in range(world_size)]
    owner = np.full(len(plan.image_sizes), -1, dtype=np.int64)
    for image in ranked:
        load, r = heapq.heappop(loads)
        owner[image] = r
        heapq.heappush(loads, (load + float(image_cost[image]), r))
    return owner


def _equalized(plan, ranks, members, sizes, world_size, epoch, seed, shuffle, remainder) -> list[Shard]:
    """Shuffle each rank's own tiles, then pad (with its own repeats) or cut every rank to one length."""
    target = int(sizes.max() if remainder == "pad" else sizes.min())
    dropped = int(sizes.sum()) - target * world_size if remainder == "drop" else 0
    shares = []
    for rank in ranks:
        mine = members[0] if len(members) == 1 else members[rank]
        if shuffle:
            mine = mine[epoch_rng(seed, epoch, rank).permutation(mine.size)]
        if remainder == "pad":
            # A rank left without tiles (more ranks than tiles) repeats tiles of the whole plan.
            source = mine if mine.size else np.arange(len(plan), dtype=np.int64)
            chosen = np.concatenate([mine, np.resize(source, target - mine.size)])
        else:
            chosen = mine[:target]
        padded = np.arange(target) >= mine.size
        shares.append(Shard(rank, world_size, epoch, plan.tiles[chosen], padded, dropped))
    return shares


def _tile_costs(plan: TilePlan, costs: np.ndarray | None) -> np.ndarray:
    if costs is None:
        return plan.in_bounds_pixels().astype(np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    if costs.shape != (len(plan),):
        raise ConfigError(f"costs must hold one number per tile ({len(plan)}), got shape {costs.shape}")
    if not np.all(np.isfinite(costs)) or np.any(costs <= 0):
        raise ConfigError("costs must be finite and positive (e.g. bytes to read per tile)")
    return costs


def _steps(tiles: int, batch: int, drop_last_batch: bool) -> int:
    batch = _check_int(batch, "batch", minimum=1)
    return tiles // batch if drop_last_batch else -(-tiles // batch)


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
