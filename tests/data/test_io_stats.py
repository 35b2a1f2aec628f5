"""Read amplification: exact tile/strip accounting, checked against the bytes the reader really reads."""
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellavie_hpc.data.dataset import open_dataset
from cellavie_hpc.data.io_stats import (
    PAGE_BYTES, CountingDataset, IOStats, chunks_for_window, layout_model, window_io,
)
from cellavie_hpc.data.pipeline import _TileReader, task_plan
from cellavie_hpc.data.synthetic import generate_dataset
from cellavie_hpc.data.tiff_io import TiffSource

IMG = np.random.default_rng(0).random((300, 420)).astype(np.float32)


def _rchar() -> int:
    """Bytes this process has read through read/pread system calls so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def test_tiled_window_decodes_whole_tiles(tmp_path):
    tifffile.imwrite(tmp_path / "t.tif", IMG, tile=(256, 256))
    layout = TiffSource(tmp_path / "t.tif").pages[0]
    # rows 10..109 lie in tile row 0, columns 260..409 in tile column 1: one tile
    assert chunks_for_window(layout, 10, 260, 100, 150) == [1]
    io = window_io(layout, 10, 260, 100, 150)
    assert (io.decoded_bytes, io.used_bytes, io.file_bytes) == (256 * 256 * 4, 100 * 150 * 4, 256 * 256 * 4)
    # a 2x2 window on the corner of four tiles decodes all four
    assert chunks_for_window(layout, 255, 255, 2, 2) == [0, 1, 2, 3]
    assert window_io(layout, 255, 255, 2, 2).decoded_per_used == 4 * 256 * 256 / 4


def test_strip_window_decodes_full_width_strips(tmp_path):
    tifffile.imwrite(tmp_path / "s.tif", IMG, rowsperstrip=16, compression="zlib")
    layout = TiffSource(tmp_path / "s.tif").pages[0]
    assert chunks_for_window(layout, 10, 100, 20, 32) == [0, 1]
    io = window_io(layout, 10, 100, 20, 32)
    assert io.decoded_bytes == 2 * 16 * 420 * 4 and io.used_bytes == 20 * 32 * 4
    assert io.file_bytes == layout.bytecounts[0] + layout.bytecounts[1]
    last = window_io(layout, 290, 0, 10, 10)              # the last strip has 300 - 18*16 = 12 rows
    assert last.decoded_bytes == 12 * 420 * 4


@pytest.mark.parametrize("kwargs,model", [(dict(tile=(64, 128)), dict(tile=(64, 128))),
                                          (dict(rowsperstrip=16, compression="zlib"), dict(rowsperstrip=16))])
def test_layout_model_decodes_what_the_real_file_decodes(tmp_path, kwargs, model):
    tifffile.imwrite(tmp_path / "x.tif", IMG, **kwargs)
    real = TiffSource(tmp_path / "x.tif").pages[0]
    planned = layout_model(300, 420, 4, **model)
    for window in [(10, 260, 100, 150), (0, 0, 300, 420), (255, 255, 2, 2), (290, 0, 10, 10)]:
        assert window_io(planned, *window).decoded_bytes == window_io(real, *window).decoded_bytes
        assert window_io(planned, *window).file_bytes == window_io(planned, *window).decoded_bytes


def test_memory_mapped_window_counts_touched_pages(tmp_path):
    tifffile.imwrite(tmp_path / "m.tif", IMG)              # uncompressed, contiguous: memory-mapped
    layout = TiffSource(tmp_path / "m.tif").pages[0]
    assert layout.memmap_offset is not None
    io = window_io(layout, 0, 0, 1, 1)
    first = layout.memmap_offset // PAGE_BYTES
    assert io.file_bytes == PAGE_BYTES and io.decoded_bytes == io.used_bytes == 4
    rows = window_io(layout, 0, 0, 3, 420)                  # 3 rows of 1680 bytes
    span_pages = (layout.memmap_offset + 3 * 1680 - 1) // PAGE_BYTES - first + 1
    assert span_pages <= rows.file_bytes // PAGE_BYTES <= span_pages + 2


@pytest.mark.parametrize("kwargs", [dict(tile=(64, 128), compression="zlib"), dict(rowsperstrip=16, compression="zlib"),
                                    dict(tile=(32, 32))])
def test_counted_file_bytes_are_the_bytes_the_reader_reads(tmp_path, kwargs):
    tifffile.imwrite(tmp_path / "x.tif", IMG, **kwargs)
    src = TiffSource(tmp_path / "x.tif")
    first = _rchar()
    probe = _rchar() - first                 # reading /proc/self/io is itself counted (about 120 bytes)
    for y, x, h, w in [(10, 260, 100, 150), (0, 0, 300, 420), (255, 255, 2, 2)]:
        before = _rchar()
        src.read_window(0, y, x, h, w)
        measured = _rchar() - before - probe
        assert abs(window_io(src.pages[0], y, x, h, w).file_bytes - measured) <= 8   # digits of rchar may grow


def test_counting_dataset_sums_the_reads_of_a_tile_reader(tmp_path):
    generate_dataset(tmp_path / "ds", 1, (300, 300), seed=0, angles=2, workers=1, progress=False)
    ds = open_dataset(tmp_path / "ds")
    counting = CountingDataset(ds)
    plan = task_plan(ds, "refocus", 96, border="drop")       # starts 0, 96, 192 on each axis: 9 tiles
    out = _TileReader(counting, "refocus", 96, cache=False).read(plan.tiles)
    np.testing.assert_array_equal(out[0], _TileReader(ds, "refocus", 96, cache=False).read(plan.tiles)[0])
    field, truth = counting.stats["field"], counting.stats["truth"]
    assert field.windows == truth.windows == len(plan) == 9
    assert field.used_bytes == 9 * 2 * 96 * 96 * 8                  # 2 angles of (real, imag) float32
    assert truth.used_bytes == 9 * 96 * 96 * (4 + 4 + 1)            # phase f32, instance u32, class u8 pages
    # per axis the windows cross 1, 1 and 2 TIFF tiles of 256 (192..287 crosses 256): (1 + 1 + 2)^2 tiles per page
    tile_bytes = 256 * 256 * 8
    assert field.decoded_bytes == field.file_bytes == 2 * tile_bytes * 16
    assert counting.total().used_bytes == field.used_bytes + truth.used_bytes
    assert counting.total().decoded_per_used == pytest.approx(
        (field.decoded_bytes + truth.decoded_bytes) / (field.used_bytes + truth.used_bytes))
    assert IOStats().decoded_per_used != IOStats().decoded_per_used      # NaN when nothing was read
