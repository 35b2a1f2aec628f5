"""TIFF reading and writing for holograms and ground truth, with windowed reads and loud failures.

Reading: `TiffSource(path)` parses a file once (any layout tifffile knows: tiled or strip-based,
uncompressed or compressed with zlib/LZW/zstd/..., little- or big-endian, multi-page, OME-TIFF) and
keeps only the page layout. `read_window` then fetches and decodes just the tiles or strips that
overlap the window (`os.pread` on a fresh descriptor, so reads are thread-safe and no file stays open);
uncompressed contiguous pages are memory-mapped instead. Every problem (truncated file, missing or
short tile, undecodable data, NaN/Inf pixels, unexpected dtype/shape) raises `DataError` naming the
file and what to do: a window is never silently filled with zeros.

Writing: `write_tiled` writes pages as 256x256 tiles (a patch read touches a handful of tiles).
Complex fields are stored as two float32 samples per pixel, (real, imag), interleaved in each tile.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import tifffile

from cellavie_hpc.errors import DataError

TILE = (256, 256)
COMPLEX_ENCODING = "complex64 as 2 float32 samples per pixel (real, imag), contiguous, tiled"


@dataclass(frozen=True)
class PageLayout:
    """Where one page's pixels live in its file and how to decode them (no open file handle)."""

    index: int
    shape: tuple[int, ...]          # (H, W) or (H, W, S)
    dtype: np.dtype                 # native byte order
    file_dtype: np.dtype            # as stored (may be big-endian)
    tiled: bool
    chunk: tuple[int, int]          # tile (rows, cols), or (rows per strip, width)
    planar_separate: bool
    compression: str
    offsets: tuple[int, ...]
    bytecounts: tuple[int, ...]
    memmap_offset: int | None       # set when the page is one uncompressed, row-major block
    decode: Callable

    @property
    def height(self) -> int:
        return self.shape[0]

    @property
    def width(self) -> int:
        return self.shape[1]


def _fail(path: Path, problem: str, todo: str = "regenerate or re-export the file") -> DataError:
    return DataError(f"{path}: {problem}; {todo}")


class TiffSource:
    """The page layouts of one TIFF file; windows are read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.size_bytes = self.path.stat().st_size
        except OSError as err:
            raise _fail(self.path, f"cannot be opened ({err.strerror or err})", "check the path") from None
        try:
            with tifffile.TiffFile(self.path) as tif:
                tif.pages.useframes = False
                self.pages = [self._layout(tif, i) for i in range(len(tif.pages))]
        except DataError:
            raise
        except Exception as err:  # tifffile raises many types for corrupt headers
            raise _fail(self.path, f"not a readable TIFF ({type(err).__name__}: {err})") from None
        if not self.pages:
            raise _fail(self.path, "contains no image pages")

    def _layout(self, tif: tifffile.TiffFile, index: int) -> PageLayout:
        page = tif.pages[index]
        separate, depth, length, width, contig = page.shaped
        if depth != 1:
            raise _fail(self.path, f"page {index} is volumetric (depth {depth}), which is not supported",
                        "store one 2-D plane per page")
        samples = separate * contig
        shape = (length, width) if samples == 1 else (length, width, samples)
        offsets, counts = tuple(int(o) for o in page.dataoffsets), tuple(int(c) for c in page.databytecounts)
        for o, c in zip(offsets, counts):
            if c == 0:
                raise _fail(self.path, f"page {index} has a missing tile/strip (byte count 0)")
            if o + c > self.size_bytes:
                raise _fail(self.path, f"page {index} is truncated: a tile/strip ends at byte {o + c} "
                                       f"but the file has {self.size_bytes} bytes")
        file_dtype = np.dtype(tif.byteorder + page.dtype.char)
        memmap_offset = None
        if (page.compression == 1 and not page.is_tiled and page.predictor == 1 and page.fillorder == 1
                and (separate == 1) and page.bitspersample == 8 * file_dtype.itemsize and page.is_contiguous):
            memmap_offset = offsets[0]
        chunk = (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip, width)
        return PageLayout(index=index, shape=shape, dtype=page.dtype.newbyteorder("="), file_dtype=file_dtype,
                          tiled=bool(page.is_tiled), chunk=chunk, planar_separate=separate > 1,
                          compression=page.compression.name.lower(), offsets=offsets, bytecounts=counts,
                          memmap_offset=memmap_offset, decode=page.decode)

    def page(self, index: int) -> PageLayout:
        if not 0 <= index < len(self.pages):
            raise _fail(self.path, f"has {len(self.pages)} pages, page {index} was asked for",
                        "check the number of illumination angles / pages")
        return self.pages[index]

    def read(self, index: int = 0) -> np.ndarray:
        """The whole page."""
        p = self.page(index)
        return self.read_window(index, 0, 0, p.height, p.width)

    def read_window(self, index: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Rows y:y+h, columns x:x+w of page `index`, decoding only the overlapping tiles/strips."""
        p = self.page(index)
        if h <= 0 or w <= 0 or y < 0 or x < 0 or y + h > p.height or x + w > p.width:
            raise _fail(self.path, f"window (y={y}, x={x}, h={h}, w={w}) is outside page {index} "
                                   f"of shape {p.height}x{p.width}", "clip or pad the window first")
        if p.memmap_offset is not None:
            mm = np.memmap(self.path, dtype=p.file_dtype, mode="r", offset=p.memmap_offset, shape=p.shape)
            return np.array(mm[y:y + h, x:x + w], dtype=p.dtype)
        out = np.empty((h, w) + p.shape[2:], p.dtype)
        filled = np.zeros((h, w) + p.shape[2:], bool) if p.planar_separate else None
        ch, cw = p.chunk
        rows = range(y // ch, (y + h - 1) // ch + 1)
        cols = range(x // cw, (x + w - 1) // cw + 1) if p.tiled else range(1)
        per_sample = len(p.offsets) // (p.shape[2] if p.planar_separate else 1)
        tiles_across = -(-p.width // cw) if p.tiled else 1
        wanted = [s * per_sample + r * tiles_across + c
                  for s in range(p.shape[2] if p.planar_separate else 1) for r in rows for c in cols]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for seg in wanted:
                data = os.pread(fd, p.bytecounts[seg], p.offsets[seg])
                if len(data) != p.bytecounts[seg]:
                    raise _fail(self.path, f"page {index} tile/strip {seg} is truncated")
                try:
                    chunk, (sample, _, cy, cx, _), _ = p.decode(data, seg)
                except Exception as err:
                    raise _fail(self.path, f"page {index} tile/strip {seg} cannot be decoded "
                                           f"({type(err).__name__}: {err})") from None
                chunk = chunk[0]  # drop the depth axis: (rows, cols, samples)
                y0, x0 = max(y, cy), max(x, cx)
                y1, x1 = min(y + h, cy + chunk.shape[0]), min(x + w, cx + chunk.shape[1])
                if y1 <= y0 or x1 <= x0:
                    continue
                piece = chunk[y0 - cy:y1 - cy, x0 - cx:x1 - cx]
                if p.planar_separate:
                    out[y0 - y:y1 - y, x0 - x:x1 - x, sample] = piece[..., 0]
                    filled[y0 - y:y1 - y, x0 - x:x1 - x, sample] = True
                else:
                    out[y0 - y:y1 - y, x0 - x:x1 - x] = piece if len(p.shape) == 3 else piece[..., 0]
        finally:
            os.close(fd)
        if filled is not None and not filled.all():
            raise _fail(self.path, f"page {index}: tiles/strips do not cover the window")
        return out


def check_finite(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Raise DataError if a float array has NaN/Inf: they would silently poison every loss downstream."""
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise _fail(Path(path), f"{what} has {bad} NaN/Inf values",
                    "regenerate the file or mask the pixels before use")
    return array


def read_pages(path: str | os.PathLike) -> np.ndarray:
    """All pages of a plain (multi-page) TIFF as one array (P, H, W[, S]); pages must agree in shape."""
    src = TiffSource(path)
    shapes = {p.shape for p in src.pages}
    if len(shapes) != 1:
        raise _fail(src.path, f"pages differ in shape {sorted(shapes)}", "read the pages one by one")
    return check_finite(np.stack([src.read(i) for i in range(len(src.pages))]), src.path, "image")


def field_to_samples(field: np.ndarray) -> np.ndarray:
    """complex64 (..., H, W) -> float32 (..., H, W, 2) with (real, imag) as the samples."""
    return np.stack([field.real, field.imag], axis=-1).astype(np.float32)


def samples_to_field(samples: np.ndarray, path: Path) -> np.ndarray:
    if samples.ndim < 3 or samples.shape[-1] != 2 or samples.dtype != np.float32:
        raise _fail(path, f"expected float32 (real, imag) samples, got {samples.dtype} shape {samples.shape}",
                    "the data set files do not match its manifest encoding; regenerate it")
    return (samples[..., 0] + 1j * samples[..., 1]).astype(np.complex64)


def write_tiled(path: str | os.PathLike, pages: Sequence[np.ndarray], *, tile: tuple[int, int] = TILE,
                compression: str | None = None, level: int | None = None) -> None:
    """Write arrays (H, W) or (H, W, S) as tiled pages; S samples are interleaved in each tile."""
    args = {} if compression is None else {"compression": compression,
                                          "compressionargs": {} if level is None else {"level": level}}
    total = sum(p.nbytes for p in pages)
    with tifffile.TiffWriter(path, bigtiff=total > 2**31) as tw:
        for arr in pages:
            tw.write(arr, tile=tile, photometric="minisblack",
                     planarconfig="contig" if arr.ndim == 3 else None, metadata=None, **args)
