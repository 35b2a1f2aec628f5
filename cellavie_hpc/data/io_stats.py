"""Read amplification: bytes a window read costs (file bytes fetched, bytes decoded) per byte it delivers.

A patch read decodes whole TIFF tiles or strips, so a 256-pixel patch from a file of full-width strips
decodes the full width of every strip it crosses. `window_io` computes exactly what
`TiffSource.read_window` fetches for a window (the same tile/strip selection; for uncompressed
contiguous pages, which are memory-mapped, the 4 KiB pages the window touches). `CountingDataset`
wraps a data set (same read API, usable with `build_pipeline`) and sums these per read, so a real
pipeline run reports its amplification.
"""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np

from cellavie_hpc.data.tiff_io import PageLayout, TiffSource

#: Granularity of memory-mapped reads (bytes): the kernel pages in whole pages.
PAGE_BYTES = 4096


@dataclasses.dataclass
class IOStats:
    """Running totals over window reads (bytes)."""

    windows: int = 0
    file_bytes: int = 0      # bytes fetched from the file (compressed size, or pages for memory-mapped pages)
    decoded_bytes: int = 0   # bytes of decoded tiles/strips (what the decoder produces)
    used_bytes: int = 0      # bytes of the windows delivered

    def add(self, other: "IOStats") -> None:
        self.windows += other.windows
        self.file_bytes += other.file_bytes
        self.decoded_bytes += other.decoded_bytes
        self.used_bytes += other.used_bytes

    @property
    def file_per_used(self) -> float:
        """File bytes fetched per byte delivered (1.0 = nothing wasted; < 1 with compression)."""
        return self.file_bytes / self.used_bytes if self.used_bytes else float("nan")

    @property
    def decoded_per_used(self) -> float:
        """Decoded bytes per byte delivered: the read amplification of the layout."""
        return self.decoded_bytes / self.used_bytes if self.used_bytes else float("nan")


def chunks_for_window(layout: PageLayout, y: int, x: int, h: int, w: int) -> list[int]:
    """Indices of the tiles/strips (in `layout.offsets`) that a window read fetches, as `read_window` does."""
    ch, cw = layout.chunk
    rows = range(y // ch, (y + h - 1) // ch + 1)
    cols = range(x // cw, (x + w - 1) // cw + 1) if layout.tiled else range(1)
    samples = layout.shape[2] if layout.planar_separate else 1
    per_sample = len(layout.offsets) // samples
    across = -(-layout.width // cw) if layout.tiled else 1
    return [s * per_sample + r * across + c for s in range(samples) for r in rows for c in cols]


def window_io(layout: PageLayout, y: int, x: int, h: int, w: int) -> IOStats:
    """Bytes fetched, decoded and delivered by one window read of one page."""
    pixel_bytes = layout.dtype.itemsize * (layout.shape[2] if len(layout.shape) == 3 else 1)
    used = h * w * pixel_bytes
    if layout.memmap_offset is not None:
        row_bytes = layout.width * pixel_bytes
        starts = layout.memmap_offset + np.arange(y, y + h, dtype=np.int64) * row_bytes + x * pixel_bytes
        first, last = starts // PAGE_BYTES, (starts + w * pixel_bytes - 1) // PAGE_BYTES
        pages = int(np.sum(last - first + 1))
        return IOStats(1, pages * PAGE_BYTES, used, used)
    segments = chunks_for_window(layout, y, x, h, w)
    ch, cw = layout.chunk
    sample_bytes = layout.dtype.itemsize * (1 if layout.planar_separate else pixel_bytes // layout.dtype.itemsize)
    decoded = 0
    for seg in segments:
        if layout.tiled:
            decoded += ch * cw * sample_bytes          # edge tiles are stored (and decoded) padded
        else:
            strip = seg % -(-layout.height // ch)
            decoded += min(ch, layout.height - strip * ch) * layout.width * sample_bytes
    return IOStats(1, sum(layout.bytecounts[s] for s in segments), decoded, used)


def layout_model(height: int, width: int, pixel_bytes: int, *, tile: tuple[int, int] | None = None,
                 rowsperstrip: int | None = None) -> PageLayout:
    """An uncompressed page layout without a file (tiled, or strips of `rowsperstrip` rows), for planning:
    `window_io` on it gives the bytes a read would decode in that layout (file bytes = decoded bytes)."""
    if (tile is None) == (rowsperstrip is None):
        raise ValueError("give exactly one of tile=(rows, cols) or rowsperstrip")
    chunk = tile if tile is not None else (rowsperstrip, width)
    count = -(-height // chunk[0]) * (-(-width // chunk[1]) if tile is not None else 1)
    full = chunk[0] * chunk[1] * pixel_bytes
    counts = [full] * count
    if tile is None:
        counts[-1] = (height - (count - 1) * chunk[0]) * width * pixel_bytes
    return PageLayout(index=0, shape=(height, width, pixel_bytes), dtype=np.dtype(np.uint8),
                      file_dtype=np.dtype(np.uint8), tiled=tile is not None, chunk=chunk, planar_separate=False,
                      compression="none", offsets=tuple(range(count)), bytecounts=tuple(counts),
                      memmap_offset=None, decode=None)


class CountingDataset:
    """A data-set view that counts read amplification per file kind (`field`, `truth`); reads are unchanged.

    Everything but the two windowed reads is the wrapped data set's, so it can be passed to
    `build_pipeline` (with `cache=False`: whole-image reads are not counted).
    """

    def __init__(self, dataset):
        self._dataset = dataset
        self._layouts: dict[Path, list[PageLayout]] = {}
        self._lock = threading.Lock()
        self.stats = {"field": IOStats(), "truth": IOStats()}

    def __getattr__(self, name):
        return getattr(self._dataset, name)

    def total(self) -> IOStats:
        out = IOStats()
        for s in self.stats.values():
            out.add(s)
        return out

    def _count(self, image_index: int, kind: str, y: int, x: int, h: int, w: int) -> None:
        path = self._dataset.path(image_index, kind)
        layouts = self._layouts.get(path)
        if layouts is None:
            layouts = TiffSource(path).pages
        window = IOStats()
        for layout in layouts:
            window.add(window_io(layout, y, x, h, w))
        window.windows = 1
        with self._lock:
            self._layouts[path] = layouts
            self.stats[kind].add(window)

    def read_field_patch(self, image_index: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        out = self._dataset.read_field_patch(image_index, y, x, h, w)
        self._count(image_index, "field", y, x, h, w)
        return out

    def read_truth_patch(self, image_index: int, y: int, x: int, h: int, w: int) -> dict[str, np.ndarray]:
        out = self._dataset.read_truth_patch(image_index, y, x, h, w)
        self._count(image_index, "truth", y, x, h, w)
        return out
