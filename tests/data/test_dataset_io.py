"""TIFF round trips in every layout we accept, windowed reads, and every bad input -> DataError."""
import json
import shutil

import numpy as np
import pytest
import tifffile

from cellavie_hpc.data.dataset import open_dataset
from cellavie_hpc.data.synthetic import generate_dataset
from cellavie_hpc.data.tiff_io import TiffSource, read_pages, write_tiled
from cellavie_hpc.errors import DataError

RNG = np.random.default_rng(0)
IMG = RNG.random((300, 420)).astype(np.float32)
WINDOWS = [(0, 0, 300, 420), (10, 260, 100, 150), (255, 255, 2, 2), (299, 419, 1, 1), (37, 5, 200, 3)]


def _check_windows(path, ref, page=0):
    src = TiffSource(path)
    for y, x, h, w in WINDOWS:
        np.testing.assert_array_equal(src.read_window(page, y, x, h, w), ref[y:y + h, x:x + w])
    return src


@pytest.mark.parametrize("kwargs", [
    dict(tile=(64, 128)),
    dict(rowsperstrip=7),
    dict(rowsperstrip=16, compression="zlib", predictor=True),
    dict(rowsperstrip=16, compression="lzw"),
    dict(tile=(32, 32), compression="zstd"),
    dict(byteorder=">", rowsperstrip=9),
    dict(byteorder=">", tile=(64, 64), compression="zlib"),
])
def test_windows_match_numpy_slices_in_every_layout(tmp_path, kwargs):
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, IMG, **kwargs)
    src = _check_windows(path, IMG)
    assert src.pages[0].tiled == ("tile" in kwargs)


def test_uncompressed_strips_are_memory_mapped_and_big_endian_is_converted(tmp_path):
    data = RNG.integers(0, 60000, (120, 90)).astype(">u2")
    tifffile.imwrite(tmp_path / "be.tif", data, byteorder=">")
    src = TiffSource(tmp_path / "be.tif")
    assert src.pages[0].memmap_offset is not None and src.pages[0].dtype == np.dtype("uint16")
    out = src.read_window(0, 5, 7, 50, 60)
    assert out.dtype.byteorder in "=|" and np.array_equal(out, data[5:55, 7:67])


def test_tiled_multipage_complex_samples_and_ome_round_trip(tmp_path):
    field = (RNG.normal(size=(2, 100, 130)) + 1j * RNG.normal(size=(2, 100, 130))).astype(np.complex64)
    write_tiled(tmp_path / "f.tif", [np.stack([p.real, p.imag], -1) for p in field], tile=(32, 64))
    src = TiffSource(tmp_path / "f.tif")
    assert [p.shape for p in src.pages] == [(100, 130, 2)] * 2 and src.pages[1].tiled
    w = src.read_window(1, 20, 70, 40, 50)
    np.testing.assert_array_equal(w[..., 0] + 1j * w[..., 1], field[1, 20:60, 70:120])
    stack = RNG.random((3, 64, 80)).astype(np.float32)
    tifffile.imwrite(tmp_path / "s.ome.tif", stack, ome=True, metadata={"axes": "ZYX"}, compression="zlib")
    np.testing.assert_array_equal(read_pages(tmp_path / "s.ome.tif"), stack)
    rgb = RNG.integers(0, 255, (3, 64, 80), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "sep.tif", rgb, photometric="rgb", planarconfig="separate", tile=(32, 32))
    np.testing.assert_array_equal(TiffSource(tmp_path / "sep.tif").read(0), np.moveaxis(rgb, 0, -1))


def test_window_decodes_only_the_overlapping_tiles(tmp_path):
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, IMG, tile=(64, 64), compression="zlib")
    src = TiffSource(path)
    first = src.pages[0].offsets[0]
    raw = bytearray(path.read_bytes())
    raw[first:first + 16] = b"\xff" * 16          # destroy tile 0 only
    path.write_bytes(bytes(raw))
    np.testing.assert_array_equal(src.read_window(0, 200, 200, 50, 50), IMG[200:250, 200:250])
    with pytest.raises(DataError, match=r"t\.tif: page 0 tile/strip 0 cannot be decoded"):
        src.read_window(0, 10, 10, 5, 5)


def test_truncated_corrupt_and_non_tiff_files_raise_data_error(tmp_path):
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, IMG, tile=(64, 64))
    raw = path.read_bytes()
    (tmp_path / "cut.tif").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cut\.tif: .*truncated"):
        TiffSource(tmp_path / "cut.tif")
    (tmp_path / "junk.tif").write_bytes(b"II*\x00" + bytes(RNG.integers(0, 255, 64, dtype=np.uint8)))
    with pytest.raises(DataError, match=r"junk\.tif: (not a readable TIFF|contains no image pages)"):
        TiffSource(tmp_path / "junk.tif")
    (tmp_path / "text.tif").write_text("hello")
    with pytest.raises(DataError, match=r"text\.tif: not a readable TIFF"):
        TiffSource(tmp_path / "text.tif")
    with pytest.raises(DataError, match="cannot be opened"):
        TiffSource(tmp_path / "absent.tif")
    with pytest.raises(DataError, match="outside page 0"):
        TiffSource(path).read_window(0, 290, 0, 20, 5)


def test_nan_and_inf_pixels_are_refused(tmp_path):
    bad = IMG.copy()
    bad[5, 7] = np.nan
    bad[100, 300] = np.inf
    tifffile.imwrite(tmp_path / "nan.tif", bad)
    with pytest.raises(DataError, match=r"nan\.tif: image has 2 NaN/Inf values"):
        read_pages(tmp_path / "nan.tif")


# ----------------------------------------------------------------------------- data sets

@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "pristine"
    generate_dataset(root, images=3, size=96, parasitemia=0.2, seed=9, angles=2, workers=1, progress=False)
    return root


@pytest.fixture
def ds_copy(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "ds")


def _manifest(root):
    return json.loads((root / "manifest.json").read_text())


def test_dataset_api_reads_fields_patches_truth_and_cells(pristine):
    ds = open_dataset(pristine, verify=True)
    assert len(ds.images) == 3 and ds.angles == 2 and ds.wavelength_m == pytest.approx(532e-9)
    info = ds.images[1]
    assert (info.index, info.height, info.width, info.angles) == (1, 96, 96, 2)
    full = ds.read_field(1)
    assert full.dtype == np.complex64 and full.shape == (2, 96, 96)
    np.testing.assert_array_equal(ds.read_field_patch(1, 10, 20, 30, 40), full[:, 10:40, 20:60])
    truth = ds.read_truth_patch(1, 10, 20, 30, 40)
    assert {k: v.dtype for k, v in truth.items()} == {"phase": np.float32, "instance": np.int32, "cls": np.int32}
    assert truth["phase"].shape == (30, 40)
    cells = ds.cells(1)
    assert cells and set(cells[0]) >= {"id", "cy", "cx", "radius_px", "bbox", "infected", "stage"}


def test_missing_file_raises_naming_it_or_is_skipped_with_a_warning(ds_copy):
    victim = ds_copy / _manifest(ds_copy)["images"][1]["files"]["field"]["path"]
    victim.unlink()
    with pytest.raises(DataError, match=r"img-00001\.tif: missing .*regenerate"):
        open_dataset(ds_copy)
    with pytest.warns(UserWarning, match="skipped 1 of 3 images"):
        ds = open_dataset(ds_copy, on_error="skip")
    assert [i.id for i in ds.images] == ["img-00000", "img-00002"] and ds.skipped[0][0] == "img-00001"
    assert ds.images[1].index == 1 and ds.read_field(1).shape == (2, 96, 96)


def test_checksum_mismatch_is_found_by_verify_only(ds_copy):
    victim = ds_copy / _manifest(ds_copy)["images"][0]["files"]["field"]["path"]
    raw = bytearray(victim.read_bytes())
    raw[-100] ^= 0xFF                                  # same size, one pixel changed
    victim.write_bytes(bytes(raw))
    open_dataset(ds_copy)                              # cheap open: sizes only
    with pytest.raises(DataError, match=r"img-00000\.tif: sha256 checksum does not match"):
        open_dataset(ds_copy, verify=True)
    problems = open_dataset(ds_copy).verify(on_error="skip")
    assert [p[0] for p in problems] == ["img-00000"]


def test_truncated_file_in_a_dataset(ds_copy):
    victim = ds_copy / _manifest(ds_copy)["images"][2]["files"]["truth"]["path"]
    victim.write_bytes(victim.read_bytes()[:-500])
    with pytest.raises(DataError, match=r"img-00002\.tif: has \d+ bytes, the manifest says"):
        open_dataset(ds_copy)


def _replace_file(root, index, kind, writer):
    """Swap a file for another one and update the manifest's size/sha so only the content check can catch it."""
    from cellavie_hpc.data.dataset import sha256_file
    m = _manifest(root)
    meta = m["images"][index]["files"][kind]
    writer(root / meta["path"])
    meta["bytes"] = (root / meta["path"]).stat().st_size
    meta["sha256"] = sha256_file(root / meta["path"])
    (root / "manifest.json").write_text(json.dumps(m))


def test_wrong_dtype_or_shape_is_refused(ds_copy):
    _replace_file(ds_copy, 0, "truth", lambda p: write_tiled(p, [np.zeros((96, 96), np.float64)] * 3))
    ds = open_dataset(ds_copy)
    with pytest.raises(DataError, match=r"img-00000\.tif: pages are .*float64.* but the manifest promises"):
        ds.read_truth_patch(0, 0, 0, 8, 8)
    _replace_file(ds_copy, 1, "field", lambda p: write_tiled(p, [np.zeros((64, 96, 2), np.float32)] * 2))
    with pytest.raises(DataError, match=r"img-00001\.tif: pages are"):
        open_dataset(ds_copy).read_field(1)
    with pytest.warns(UserWarning, match="skipped 2 of 3"):
        assert len(open_dataset(ds_copy, on_error="skip")) == 1


def test_nan_in_a_field_is_refused_on_read(ds_copy):
    def nan_field(p):
        planes = [np.ones((96, 96, 2), np.float32)] * 2
        planes[1] = planes[1].copy()
        planes[1][50, 60, 1] = np.nan
        write_tiled(p, planes)
    _replace_file(ds_copy, 2, "field", nan_field)
    ds = open_dataset(ds_copy, verify=True)
    assert ds.read_field_patch(2, 0, 0, 40, 40).shape == (2, 40, 40)     # clean window reads fine
    with pytest.raises(DataError, match=r"img-00002\.tif: field window .* 1 NaN/Inf"):
        ds.read_field_patch(2, 40, 40, 20, 30)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format="other"), "format is 'other'"),
    (lambda m: m.update(version=99), "version 99 is not supported"),
    (lambda m: m["images"][0].pop("focus_distance_m"), r"images\[0\] has no 'focus_distance_m'"),
    (lambda m: m["images"][1]["files"].pop("cells"), r"images\[1\]\.files has no 'cells'"),
    (lambda m: m["parameters"].update(angles="two"), r"parameters\.angles is str"),
    (lambda m: m.update(images=[]), "lists no images"),
])
def test_bad_manifests_name_the_problem(ds_copy, edit, message):
    m = _manifest(ds_copy)
    edit(m)
    (ds_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=message):
        open_dataset(ds_copy)


def test_unreadable_or_absent_manifest(ds_copy, tmp_path):
    (ds_copy / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json: not valid JSON"):
        open_dataset(ds_copy)
    with pytest.raises(DataError, match="no data set manifest"):
        open_dataset(tmp_path / "nowhere")
