"""Merging detections of overlapping tiles into one list per image, each cell once (pure NumPy).

A large hologram is screened as overlapping tiles. A cell that crosses a tile border is seen whole by
one tile and cut by its neighbour (or seen whole by both, with slightly different boxes). The merge
first drops detections that touch an inner tile edge (cut pieces: the cell is whole in a neighbour),
then keeps, greedily, the detection that lies deepest inside its own tile (clipped to a margin, then
by score) and drops every later detection that mostly covers, or is mostly covered by, a kept one:
intersection over the *smaller* area (IoMin), not IoU, because a cut piece has a small IoU with the
whole cell but lies almost entirely inside it. Image borders do not count as tile edges: a cell cut by
the image border is cut in every tile.

The guarantee (see tests/screen/test_merge.py): when the tile overlap is at least the largest cell
diameter plus twice `edge_touch_px` (plus the box error), every cell lies wholly and clear of the edges
inside some tile, so exactly one detection per cell survives as long
as two distinct cells never have an IoMin above the threshold (true for red cells, which barely overlap).
"""
from __future__ import annotations

import numpy as np


def box_iomin(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise intersection / smaller area (N, M) of boxes (N, 4), (M, 4) as (y0, x0, y1, x1); 0 for empty boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=-1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=-1)
    smaller = np.minimum(area_a[:, None], area_b[None, :])
    return np.where(smaller > 0, inter / np.maximum(smaller, 1e-12), 0.0)


def inner_edge_distance(boxes: np.ndarray, tile_origins: np.ndarray, tile_size: tuple[int, int],
                        image_shape: tuple[int, int]) -> np.ndarray:
    """Pixels from each box to the nearest edge of its tile that is not also an image border (inf if none)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    origins = np.asarray(tile_origins, np.float64).reshape(-1, 2)
    th, tw = tile_size
    h, w = image_shape
    y0, x0 = origins[:, 0], origins[:, 1]
    gaps = np.stack([
        np.where(y0 > 0, boxes[:, 0] - y0, np.inf),
        np.where(x0 > 0, boxes[:, 1] - x0, np.inf),
        np.where(y0 + th < h, y0 + th - boxes[:, 2], np.inf),
        np.where(x0 + tw < w, x0 + tw - boxes[:, 3], np.inf),
    ], axis=1)
    return gaps.min(axis=1)


def merge_tile_detections(boxes, scores, tile_origins, tile_size: tuple[int, int], image_shape: tuple[int, int],
                          iomin_threshold: float = 0.5, edge_margin_px: float = 8.0,
                          edge_touch_px: float = 2.0) -> np.ndarray:
    """Indices of the detections to keep (sorted ascending), one per cell.

    `boxes` (N, 4) are image pixels (y0, x0, y1, x1); `tile_origins` (N, 2) the (y, x) of the tile each
    detection came from; `tile_size` (h, w) pixels. Detections closer than `edge_touch_px` to an inner tile
    edge are dropped; those at least `edge_margin_px` from every inner edge rank equally by distance, so
    among them the best score wins.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    n = boxes.shape[0]
    if scores.shape[0] != n or np.asarray(tile_origins).reshape(-1, 2).shape[0] != n:
        raise ValueError(f"boxes ({n}), scores ({scores.shape[0]}) and tile_origins must have one row per detection")
    if n == 0:
        return np.empty(0, np.int64)
    depth_px = inner_edge_distance(boxes, tile_origins, tile_size, image_shape)
    order = np.lexsort((-scores, -np.minimum(depth_px, edge_margin_px)))
    order = order[depth_px[order] >= edge_touch_px]
    # Bucket kept boxes on a grid at least as coarse as the largest box: candidates lie in 3x3 buckets.
    pitch = max(float(np.max(boxes[:, 2:] - boxes[:, :2])), 1.0)
    buckets: dict[tuple[int, int], list[int]] = {}
    kept: list[int] = []
    for i in order.tolist():
        cy = (boxes[i, 0] + boxes[i, 2]) / 2
        cx = (boxes[i, 1] + boxes[i, 3]) / 2
        key = (int(cy // pitch), int(cx // pitch))
        near = [j for dy in (-1, 0, 1) for dx in (-1, 0, 1) for j in buckets.get((key[0] + dy, key[1] + dx), ())]
        if near and box_iomin(boxes[i], boxes[near]).max() > iomin_threshold:
            continue
        buckets.setdefault(key, []).append(i)
        kept.append(i)
    return np.sort(np.asarray(kept, np.int64))
