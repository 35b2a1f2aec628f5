"""Tile plans: where the training patches of a data set lie, as one flat int64 array.

A tile is `(image, y, x)`: the image index and the top-left pixel of a `patch` x `patch` window.
Plans are pure values (no I/O) so that every rank computes the same plan from the image sizes alone,
and they are arrays rather than lists of tuples because a plan over a large data set holds millions
of tiles that get shuffled and sliced every epoch.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np

from cellavie_hpc.errors import ConfigError

Border = Literal["drop", "reflect"]
BORDERS: tuple[str, ...] = ("drop", "reflect")


@dataclasses.dataclass(frozen=True, eq=False)
class TilePlan:
    """All tiles of a data set, image-major then row-major.

    `tiles` is an (N, 3) int64 array of `(image, y, x)`; with `border="reflect"` the last row and
    column of tiles of an image reach past its border and are read with reflect padding.
    """

    tiles: np.ndarray
    patch: int
    stride: int
    border: str
    image_sizes: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def images(self) -> np.ndarray:
        """Image index of every tile, (N,) int64."""
        return self.tiles[:, 0]

    def tiles_per_image(self) -> np.ndarray:
        """Number of tiles of each image, (n_images,) int64 (0 for images smaller than a patch under `drop`)."""
        return np.bincount(self.tiles[:, 0], minlength=len(self.image_sizes)).astype(np.int64)

    def in_bounds_pixels(self) -> np.ndarray:
        """Pixels of each tile that lie inside its image, (N,) int64: the part a reader fetches from disk."""
        sizes = np.asarray(self.image_sizes, dtype=np.int64).reshape(-1, 2)
        h = sizes[self.tiles[:, 0], 0]
        w = sizes[self.tiles[:, 0], 1]
        y, x = self.tiles[:, 1], self.tiles[:, 2]
        rows = np.clip(np.minimum(y + self.patch, h) - np.maximum(y, 0), 0, None)
        cols = np.clip(np.minimum(x + self.patch, w) - np.maximum(x, 0), 0, None)
        return rows * cols

    def to_records(self) -> list[dict[str, int]]:
        """The plan as JSON-ready `{"image", "y", "x"}` mappings (small plans only: it is a Python list)."""
        return [{"image": int(i), "y": int(y), "x": int(x)} for i, y, x in self.tiles.tolist()]


def _positions(size: int, patch: int, stride: int, border: str) -> np.ndarray:
    """Start offsets along one axis of length `size` (pixels)."""
    if border == "drop":
        if size < patch:
            return np.empty(0, dtype=np.int64)
        return np.arange(0, size - patch + 1, stride, dtype=np.int64)
    # reflect: enough starts that the last window reaches the border (at least one window).
    count = 1 if size <= patch else -(-(size - patch) // stride) + 1
    return np.arange(count, dtype=np.int64) * stride


def plan_tiles(
    image_sizes: Sequence[tuple[int, int]],
    patch: int,
    stride: int | None = None,
    border: Border = "drop",
) -> TilePlan:
    """Tile every image on a `stride` grid (pixels; default `patch`).

    `drop` keeps only windows that lie wholly inside the image; `reflect` covers the whole image,
    the last windows of each row/column extending past the border (to be reflect-padded on read).
    Images may have different sizes.
    """
    patch = _positive_int(patch, "patch")
    stride = patch if stride is None else _positive_int(stride, "stride")
    if border not in BORDERS:
        raise ConfigError(f"border must be one of {', '.join(BORDERS)}, got {border!r}")
    sizes = _checked_sizes(image_sizes)
    blocks = []
    for i, (h, w) in enumerate(sizes):
        ys = _positions(h, patch, stride, border)
        xs = _positions(w, patch, stride, border)
        if ys.size == 0 or xs.size == 0:
            continue
        block = np.empty((ys.size * xs.size, 3), dtype=np.int64)
        block[:, 0] = i
        block[:, 1] = np.repeat(ys, xs.size)
        block[:, 2] = np.tile(xs, ys.size)
        blocks.append(block)
    tiles = np.concatenate(blocks) if blocks else np.empty((0, 3), dtype=np.int64)
    return TilePlan(tiles=tiles, patch=patch, stride=stride, border=border, image_sizes=sizes)


def plan_crops(image_sizes: Sequence[tuple[int, int]], centres: np.ndarray, crop: int) -> TilePlan:
    """Square `crop` windows centred on given pixels, as a plan (the classifier's tiles are cells).

    `centres` is (N, 3) int `(image, cy, cx)`; the window starts at `(cy - crop//2, cx - crop//2)`,
    so the centre pixel lands at `[crop//2, crop//2]`. Windows may reach past any border and are
    read with reflect padding (`border="reflect"`).
    """
    crop = _positive_int(crop, "crop")
    sizes = _checked_sizes(image_sizes)
    centres = np.asarray(centres, dtype=np.int64).reshape(-1, 3)
    if centres.size and (centres[:, 0].min() < 0 or centres[:, 0].max() >= len(sizes)):
        raise ConfigError(f"crop centres name images outside 0..{len(sizes) - 1}")
    tiles = centres - np.array([0, crop // 2, crop // 2], dtype=np.int64)
    return TilePlan(tiles=tiles, patch=crop, stride=crop, border="reflect", image_sizes=sizes)


def _checked_sizes(image_sizes: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    sizes = []
    for i, hw in enumerate(image_sizes):
        try:
            h, w = (int(v) for v in hw)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"image {i}: size must be a (height, width) pair, got {hw!r}") from err
        if h <= 0 or w <= 0:
            raise ConfigError(f"image {i}: size must be positive, got {h}x{w}")
        sizes.append((h, w))
    return tuple(sizes)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) <= 0:
        raise ConfigError(f"{name} must be a positive integer (pixels), got {value!r}")
    return int(value)
