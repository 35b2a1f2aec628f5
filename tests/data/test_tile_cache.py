"""Pre-tiled cache: the pipeline yields bitwise the batches of direct reads; stale or damaged caches are refused."""
import json

import numpy as np
import pytest

from cellavie_hpc.data.dataset import open_dataset
from cellavie_hpc.data.pipeline import _TileReader, task_plan
from cellavie_hpc.data.sharding import shard
from cellavie_hpc.data.synthetic import generate_dataset
from cellavie_hpc.data.tile_cache import TileCache, tile_windows
from cellavie_hpc.errors import ConfigError, DataError

P = 32


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("tilecache") / "ds"
    generate_dataset(root, 2, (150, 130), parasitemia=0.3, seed=1, angles=2, workers=1, progress=False)
    return open_dataset(root)


@pytest.mark.parametrize("task,border", [("refocus", "reflect"), ("unet", "drop"), ("classifier", None)])
def test_cache_reader_returns_exactly_the_arrays_of_direct_reads(ds, tmp_path, task, border):
    plan = task_plan(ds, task, P, stride=24, border=border or "drop")
    cache = TileCache.build(tmp_path / "c.tiles", ds, plan.tiles, task, P, progress=False)
    assert len(cache) == len(tile_windows(ds, plan.tiles, P))
    view = cache.view(ds)
    direct = _TileReader(ds, task, P, cache=False).read(plan.tiles)
    cached = _TileReader(view, task, P, cache=False).read(plan.tiles)
    assert len(direct) == len(cached) >= 2
    for a, b in zip(direct, cached):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    assert view.misses == 0 and view.hits == len(plan) * (2 if task == "refocus" else 1)


def test_pipeline_over_the_cache_yields_bitwise_the_batches_of_the_files(ds, tmp_path):
    tf = pytest.importorskip("tensorflow")
    from cellavie_hpc.data.pipeline import build_pipeline

    plan = task_plan(ds, "refocus", P, stride=P, border="reflect")
    cache = TileCache.build(tmp_path / "c.tiles", ds, plan.tiles, "refocus", P, progress=False)
    tiles = shard(plan, 2, 1, epoch=3, seed=7).tiles

    def batches(dataset):
        out = build_pipeline(dataset, tiles, "refocus", 4, P, augment=True, seed=7, epoch=3, drop_remainder=False)
        return [tf.nest.map_structure(lambda t: t.numpy().tobytes(), b) for b in out]

    view = cache.view(ds)
    assert batches(view) == batches(ds)
    assert view.misses == 0 and view.hits == 2 * len(tiles)


def test_windows_not_in_the_cache_are_read_from_the_files(ds, tmp_path):
    plan = task_plan(ds, "unet", P, border="drop")
    cache = TileCache.build(tmp_path / "c.tiles", ds, plan.tiles[:3], "unet", P, progress=False)
    view = cache.view(ds)
    got = view.read_truth_patch(1, 50, 60, P, P)
    want = ds.read_truth_patch(1, 50, 60, P, P)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert (view.hits, view.misses) == (0, 1)
    np.testing.assert_array_equal(view.read_field_patch(0, 0, 0, P, P), ds.read_field_patch(0, 0, 0, P, P))


def test_stale_cache_is_refused_with_the_reason(ds, tmp_path):
    plan = task_plan(ds, "refocus", P, border="drop")
    path = tmp_path / "c.tiles"
    TileCache.build(path, ds, plan.tiles, "refocus", P, progress=False)
    assert len(TileCache.open(path, ds, plan.tiles, "refocus", P)) == len(plan)
    with pytest.raises(DataError, match=r"stale tile cache: plan_sha256.*another tile plan"):
        TileCache.open(path, ds, plan.tiles[::-1], "refocus", P)
    with pytest.raises(DataError, match="stale tile cache: patch is 32 but this run needs 48"):
        TileCache.open(path, ds, patch=48)
    with pytest.raises(DataError, match="stale tile cache: task is 'refocus' but this run needs 'unet'"):
        TileCache.open(path, ds, task="unet")
    # same file names and sizes, other content: the manifest checksums differ
    other_root = tmp_path / "other"
    generate_dataset(other_root, 2, (150, 130), parasitemia=0.3, seed=9, angles=2, workers=1, progress=False)
    with pytest.raises(DataError, match=r"stale tile cache: built from other files than .*other"):
        TileCache.open(path, open_dataset(other_root), plan.tiles, "refocus", P)


def test_build_reuses_a_valid_cache_and_replaces_a_stale_one(ds, tmp_path, capsys):
    plan = task_plan(ds, "unet", P, border="drop")
    path = tmp_path / "c.tiles"
    first = TileCache.build(path, ds, plan.tiles, "unet", P, progress=False)
    inode = path.stat().st_ino
    again = TileCache.build(path, ds, plan.tiles, "unet", P, progress=False)
    assert path.stat().st_ino == inode and len(again) == len(first)
    assert capsys.readouterr().err == ""
    rebuilt = TileCache.build(path, ds, plan.tiles[:5], "unet", P, progress=False)
    assert path.stat().st_ino != inode and len(rebuilt) == 5
    assert "rebuilding" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if ".tmp." in p.name] == []


def test_damaged_files_are_refused(ds, tmp_path):
    plan = task_plan(ds, "unet", P, border="drop")
    path = tmp_path / "c.tiles"
    TileCache.build(path, ds, plan.tiles, "unet", P, progress=False)
    cut = tmp_path / "cut.tiles"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated tile cache"):
        TileCache.open(cut, ds)
    junk = tmp_path / "junk.tiles"
    junk.write_bytes(b"not a cache at all")
    with pytest.raises(DataError, match="bad magic"):
        TileCache.open(junk, ds)
    with pytest.raises(DataError, match="no tile cache here"):
        TileCache.open(tmp_path / "absent.tiles", ds)
    raw = bytearray(path.read_bytes())
    length = int.from_bytes(raw[8:16], "little")
    header = json.loads(raw[16:16 + length])
    header["version"] = 2          # same length: the header keeps its size
    text = json.dumps(header).encode().ljust(length)
    (tmp_path / "v2.tiles").write_bytes(bytes(raw[:16]) + text + bytes(raw[16 + length:]))
    with pytest.raises(DataError, match="format version 2"):
        TileCache.open(tmp_path / "v2.tiles", ds)


def test_bad_build_arguments(ds, tmp_path):
    with pytest.raises(ConfigError, match="task"):
        TileCache.build(tmp_path / "c", ds, np.zeros((1, 3), np.int64), "yolo", P, progress=False)
    with pytest.raises(ConfigError, match="no tiles"):
        TileCache.build(tmp_path / "c", ds, np.zeros((0, 3), np.int64), "unet", P, progress=False)
