"""Synthetic disc tiles with known centres, ids and classes for the model tests (no data-set module needed)."""
import numpy as np


def disc_rasters(patch: int, cells: list[tuple[float, float, float, int]]):
    """instance, cls (int32) and phase (float32, rad) rasters of discs (cy, cx, radius_px, pixel class)."""
    yy, xx = np.mgrid[0:patch, 0:patch]
    instance = np.zeros((patch, patch), np.int32)
    cls = np.zeros((patch, patch), np.int32)
    phase = np.zeros((patch, patch), np.float32)
    for i, (cy, cx, r, c) in enumerate(cells, start=1):
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        instance[inside] = 100 + 7 * i  # sparse ids, like global cell ids
        cls[inside] = c
        phase[inside] = 0.6 + 0.3 * c
    return instance, cls, phase


def random_tiles(rng: np.random.Generator, count: int, patch: int, max_cells: int = 3):
    """``count`` tiles of non-overlapping random discs; returns stacked instance, cls, phase."""
    out = []
    for _ in range(count):
        cells = []
        for _ in range(rng.integers(1, max_cells + 1)):
            r = float(rng.uniform(3.0, 5.0))
            cy, cx = rng.uniform(r + 1, patch - r - 1, size=2)
            if all((cy - y) ** 2 + (cx - x) ** 2 > (r + q + 2) ** 2 for y, x, q, _ in cells):
                cells.append((float(cy), float(cx), r, int(rng.integers(1, 5))))
        out.append(disc_rasters(patch, cells))
    return tuple(np.stack(a) for a in zip(*out))


def defocused_field(phase: np.ndarray, blur_px: int = 2) -> np.ndarray:
    """(B, P, P, 2) real/imag of exp(i phase) box-blurred: a cheap stand-in for a defocused hologram."""
    field = np.exp(1j * phase)
    k = 2 * blur_px + 1
    padded = np.pad(field, ((0, 0), (blur_px, blur_px), (blur_px, blur_px)), mode="edge")
    blurred = sum(padded[:, dy:dy + phase.shape[1], dx:dx + phase.shape[2]]
                  for dy in range(k) for dx in range(k)) / (k * k)
    return np.stack([blurred.real, blurred.imag], axis=-1).astype(np.float32)

