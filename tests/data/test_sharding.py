"""Sharding invariants over random plans and world sizes: disjoint, complete, balanced, deterministic."""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cellavie_hpc.data.sharding import epoch_rng, shard, shard_all, shard_table, steps_per_epoch
from cellavie_hpc.data.tiling import plan_tiles
from cellavie_hpc.errors import ConfigError


def _keys(tiles):
    return tiles[:, 0] * 10**8 + tiles[:, 1] * 10**4 + tiles[:, 2]


@st.composite
def plans(draw, max_images=7):
    sizes = draw(st.lists(st.tuples(st.integers(8, 80), st.integers(8, 80)), min_size=1, max_size=max_images))
    patch = draw(st.integers(4, 24))
    stride = draw(st.integers(max(1, patch // 2), patch))
    border = draw(st.sampled_from(["drop", "reflect"]))
    plan = plan_tiles(sizes, patch, stride, border)
    assume(len(plan) > 0)
    return plan


common = dict(
    plan=plans(),
    world=st.integers(1, 9),
    epoch=st.integers(0, 50),
    seed=st.integers(0, 2**32 - 1),
    remainder=st.sampled_from(["pad", "drop"]),
    balance=st.sampled_from(["count", "cost"]),
    shuffle=st.booleans(),
)


@settings(max_examples=120, deadline=None)
@given(**common)
def test_global_sharding_invariants(plan, world, epoch, seed, remainder, balance, shuffle):
    shares = shard_all(plan, world, epoch, seed, shuffle=shuffle, remainder=remainder, balance=balance)
    n = len(plan)
    lengths = {len(s) for s in shares}
    assert len(lengths) == 1, "every rank must hold the same number of tiles"
    real = [s.tiles[~s.padded] for s in shares]
    counts = [len(r) for r in real]
    assert max(counts) - min(counts) <= 1
    keys = np.concatenate([_keys(r) for r in real])
    assert np.unique(keys).size == keys.size, "shares overlap"
    plan_keys = _keys(plan.tiles)
    assert np.isin(keys, plan_keys).all()
    if remainder == "pad":
        assert keys.size == n and lengths == {-(-n // world)}
        assert all(s.dropped == 0 for s in shares)
    else:
        assert shares[0].dropped == n - keys.size == n % world and lengths == {n // world}
    for s in shares:
        assert np.isin(_keys(s.tiles[s.padded]), plan_keys).all()
        assert s.steps(3) == steps_per_epoch(n, world, 3, remainder)
        assert s.steps(3, drop_last_batch=False) == steps_per_epoch(n, world, 3, remainder, drop_last_batch=False)
    if balance == "cost":
        costs = plan.in_bounds_pixels()
        index = {k: c for k, c in zip(plan_keys.tolist(), costs.tolist())}
        loads = [sum(index[k] for k in _keys(r).tolist()) for r in real]
        assert max(loads) - min(loads) <= costs.max()


@settings(max_examples=60, deadline=None)
@given(**common, rank_frac=st.floats(0, 0.999), locality=st.booleans())
def test_any_process_computes_the_same_share(plan, world, epoch, seed, remainder, balance, shuffle, rank_frac, locality):
    rank = int(rank_frac * world)
    kwargs = dict(shuffle=shuffle, remainder=remainder, balance=balance, locality=locality)
    one = shard(plan, world, rank, epoch, seed, **kwargs)
    again = shard(plan, world, rank, epoch, seed, **kwargs)
    from_all = shard_all(plan, world, epoch, seed, **kwargs)[rank]
    for other in (again, from_all):
        assert np.array_equal(one.tiles, other.tiles)
        assert np.array_equal(one.padded, other.padded)
        assert one.dropped == other.dropped


@settings(max_examples=60, deadline=None)
@given(plan=plans(), world=st.integers(1, 4), epoch=st.integers(0, 50), seed=st.integers(0, 2**32 - 1),
       locality=st.booleans(), balance=st.sampled_from(["count", "cost"]))
def test_epochs_reshuffle(plan, world, epoch, seed, locality, balance):
    assume(len(plan) >= 12 * world)
    a = shard_all(plan, world, epoch, seed, locality=locality, balance=balance)
    b = shard_all(plan, world, epoch + 1, seed, locality=locality, balance=balance)
    assert any(not np.array_equal(x.tiles, y.tiles) for x, y in zip(a, b))
    # Same multiset of tiles per epoch without locality is not required, but the plan stays covered.
    for shares in (a, b):
        keys = np.concatenate([_keys(s.tiles[~s.padded]) for s in shares])
        assert np.unique(keys).size == len(plan)


@settings(max_examples=120, deadline=None)
@given(**common)
def test_locality_invariants(plan, world, epoch, seed, remainder, balance, shuffle):
    shares = shard_all(plan, world, epoch, seed, shuffle=shuffle, remainder=remainder, balance=balance, locality=True)
    n = len(plan)
    assert len({len(s) for s in shares}) == 1
    real = [s.tiles[~s.padded] for s in shares]
    keys = np.concatenate([_keys(r) for r in real])
    assert np.unique(keys).size == keys.size
    assert keys.size + shares[0].dropped == n
    if remainder == "pad":
        assert keys.size == n
    n_images = int(np.count_nonzero(plan.tiles_per_image()))
    if n_images >= world:
        owners = {}
        for s in shares:
            for image in s.images().tolist():
                assert owners.setdefault(image, s.rank) == s.rank, f"image {image} read by two ranks"
        if remainder == "pad":  # with drop, a heavy rank may leave out every tile of one of its images
            assert len(owners) == n_images
        costs = plan.in_bounds_pixels() if balance == "cost" else np.ones(n)
        image_cost = np.bincount(plan.images, weights=costs)
        loads = [image_cost[s.images()].sum() for s in shares]
        assert max(loads) - min(loads) <= image_cost.max() + 1e-9  # greedy largest-first bound
    else:
        counts = [len(r) for r in real]
        assert max(counts) - min(counts) <= 1 and shares[0].dropped <= world - 1
        assert all(s.steps(2) == steps_per_epoch(n, world, 2, remainder) for s in shares)


def test_locality_example_reads_only_own_files():
    plan = plan_tiles([(64, 64)] * 4 + [(32, 32)] * 2, patch=16)  # 16,16,16,16,4,4 tiles
    shares = shard_all(plan, 2, epoch=3, seed=1, locality=True)
    assert [s.images().tolist() for s in shares] == [[0, 2, 4], [1, 3, 5]]
    assert [len(s) for s in shares] == [36, 36] and all(not s.padded.any() for s in shares)


def test_pad_and_drop_exact_counts():
    plan = plan_tiles([(40, 40)], patch=8)  # 25 tiles
    pad = shard_all(plan, 4, seed=5)
    assert [len(s) for s in pad] == [7] * 4 and [int(s.padded.sum()) for s in pad] == [0, 1, 1, 1]
    drop = shard_all(plan, 4, seed=5, remainder="drop")
    assert [len(s) for s in drop] == [6] * 4 and drop[0].dropped == 1
    assert steps_per_epoch(25, 4, 2) == 3 and steps_per_epoch(25, 4, 2, "drop") == 3
    assert steps_per_epoch(25, 4, 4, drop_last_batch=False) == 2
    table = shard_table(pad, batch=2)
    assert table[1] == {"rank": 1, "tiles": 7, "padded": 1, "images": 1, "steps_per_epoch": 3}


def test_unshuffled_is_round_robin_of_plan_order():
    plan = plan_tiles([(16, 32)], patch=8)  # 8 tiles
    s = shard(plan, 3, 1, shuffle=False)
    assert s.tiles.tolist() == [plan.tiles[i].tolist() for i in (1, 4, 7)]


def test_epoch_rng_is_pcg64_of_seed_and_epoch():
    a = epoch_rng(7, 2).integers(0, 1 << 30, 4)
    b = np.random.Generator(np.random.PCG64(np.random.SeedSequence([7, 2]))).integers(0, 1 << 30, 4)
    assert np.array_equal(a, b)


def test_more_ranks_than_tiles_pads_every_rank():
    plan = plan_tiles([(8, 8)], patch=4)  # 4 tiles
    for locality in (False, True):
        shares = shard_all(plan, 6, locality=locality)
        assert [len(s) for s in shares] == [1] * 6
        assert sum(int((~s.padded).sum()) for s in shares) == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"world_size": 0, "rank": 0}, "world_size must be an integer >= 1"),
        ({"world_size": 2, "rank": 2}, r"rank 2 is out of range for world size 2 \(ranks are 0..1\)"),
        ({"world_size": 2, "rank": 0, "epoch": -1}, "epoch must be an integer >= 0"),
        ({"world_size": 2, "rank": 0, "remainder": "wrap"}, "remainder must be one of pad, drop"),
        ({"world_size": 2, "rank": 0, "balance": "cost", "costs": np.ones(3)}, "one number per tile"),
        ({"world_size": 2, "rank": 0, "balance": "cost", "costs": -np.ones(4)}, "finite and positive"),
    ],
)
def test_bad_arguments(kwargs, message):
    plan = plan_tiles([(8, 8)], patch=4)
    with pytest.raises(ConfigError, match=message):
        shard(plan, **kwargs)


def test_empty_plan_says_what_to_do():
    with pytest.raises(ConfigError, match="border=reflect or a smaller patch"):
        shard(plan_tiles([(8, 8)], patch=16), 1, 0)
