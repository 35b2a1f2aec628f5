"""Staging a shard's files on node-local storage: bitwise-identical batches, budget, one copy per node."""
import multiprocessing

import numpy as np
import pytest

from cellavie_hpc.data.dataset import open_dataset
from cellavie_hpc.data.pipeline import task_plan
from cellavie_hpc.data.sharding import shard
from cellavie_hpc.data.staging import STAGE_SUBDIR, resolve_stage_dir, shard_files, stage_dataset
from cellavie_hpc.data.synthetic import generate_dataset
from cellavie_hpc.errors import ConfigError, DataError

P = 32


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("staging") / "ds"
    generate_dataset(root, 3, (150, 130), parasitemia=0.3, seed=2, angles=2, workers=1, progress=False)
    return open_dataset(root)


def _field_and_truth_bytes(ds, image):
    files = {e["id"]: e["files"] for e in ds.manifest["images"]}[ds.images[image].id]
    return files["field"]["bytes"], files["truth"]["bytes"]


def test_staged_dataset_yields_bitwise_the_batches_of_the_original(ds, tmp_path):
    tf = pytest.importorskip("tensorflow")
    from cellavie_hpc.data.pipeline import build_pipeline, clear_image_cache

    plan = task_plan(ds, "refocus", P, stride=P, border="reflect")
    tiles = shard(plan, 2, 0, epoch=1, seed=3, locality=True).tiles
    staged, report = stage_dataset(ds, tiles, tmp_path, budget_bytes=1 << 30, progress=False)
    images = np.unique(tiles[:, 0]).tolist()
    assert report.files_copied == 2 * len(images) and report.files_remote == 0
    for image in images:
        for kind in ("field", "truth"):
            assert staged.path(image, kind).parent == tmp_path / STAGE_SUBDIR
            assert staged.path(image, kind).read_bytes() == ds.path(image, kind).read_bytes()
    assert report.bytes_copied == sum(sum(_field_and_truth_bytes(ds, i)) for i in images)

    def batches(dataset):
        clear_image_cache()
        out = build_pipeline(dataset, tiles, "refocus", 4, P, augment=True, seed=3, epoch=1, drop_remainder=False)
        return [tf.nest.map_structure(lambda t: t.numpy().tobytes(), b) for b in out]

    original, local = batches(ds), batches(staged)
    assert len(original) == len(local) == -(-len(tiles) // 4)
    assert original == local


def test_budget_stages_largest_read_share_first_and_reads_the_rest_remotely(ds, tmp_path):
    plan = task_plan(ds, "refocus", P, stride=P, border="drop")
    # image 1 read three times as often as image 0; image 2 not at all
    tiles = np.concatenate([plan.tiles[plan.images == 0][:2], np.repeat(plan.tiles[plan.images == 1][:2], 3, axis=0)])
    files = shard_files(ds, tiles, ("field", "truth"))
    field0, truth0 = _field_and_truth_bytes(ds, 0)
    field1, truth1 = _field_and_truth_bytes(ds, 1)
    # share = tiles x bytes per pixel: image 1 has 6 tiles, image 0 has 2, image 2 none
    shares = {(f.image, f.kind): f.read_share for f in files}
    pixels = 150 * 130
    assert shares == pytest.approx({(1, "field"): 6 * field1 / pixels, (1, "truth"): 6 * truth1 / pixels,
                                    (0, "field"): 2 * field0 / pixels, (0, "truth"): 2 * truth0 / pixels})
    assert [f.read_share for f in files] == sorted(shares.values(), reverse=True)
    assert (files[0].image, files[0].kind) == (1, "field")
    budget = field1 + field0 + 100            # room for both fields (the largest shares), no truth file
    assert min(truth0, truth1) > 100
    staged, report = stage_dataset(ds, tiles, tmp_path, budget, progress=False)
    assert report.bytes_local <= budget
    assert (report.files_copied, report.files_remote) == (2, 2)
    assert report.bytes_copied == field1 + field0
    assert staged.path(1, "field").parent == staged.path(0, "field").parent == tmp_path / STAGE_SUBDIR
    assert staged.path(0, "truth") == ds.path(0, "truth") and staged.path(1, "truth") == ds.path(1, "truth")
    assert staged.path(2, "field") == ds.path(2, "field")
    np.testing.assert_array_equal(staged.read_field_patch(0, 5, 7, 20, 30), ds.read_field_patch(0, 5, 7, 20, 30))

    everything, report_all = stage_dataset(ds, tiles, tmp_path / "all", None, progress=False)
    assert (report_all.files_copied, report_all.files_remote) == (4, 0) and " (budget " not in report_all.line()
    assert " (budget " in report.line() and "2 files" in report.line()
    nothing, report0 = stage_dataset(ds, tiles, tmp_path / "zero", 0, progress=False)
    assert report0.bytes_local == 0 and report0.files_remote == 4
    assert nothing.path(1, "field") == ds.path(1, "field")


def _stage_in_process(root, stage_dir, barrier):
    ds = open_dataset(root)
    barrier.wait()
    return stage_dataset(ds, np.arange(len(ds.images)), stage_dir, 1 << 30, progress=False).report


def test_two_processes_staging_at_once_copy_each_file_once(ds, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            reports = pool.starmap(_stage_in_process, [(str(ds.root), str(tmp_path), barrier)] * 2)
    files = 2 * len(ds.images)
    assert sum(r.files_copied for r in reports) == files
    assert all(r.files_copied + r.files_reused == files for r in reports)
    staged = sorted(p.name for p in (tmp_path / STAGE_SUBDIR).iterdir() if not p.name.endswith(".lock"))
    assert len(staged) == files and not any(".tmp." in name for name in staged)


def test_corrupt_source_is_refused_and_leaves_no_copy(ds, tmp_path):
    bad = tmp_path / "bad"
    generate_dataset(bad, 1, (64, 64), seed=5, workers=1, progress=False)
    broken = open_dataset(bad)
    path = broken.path(0, "field")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF                      # same size: only the checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256 does not match"):
        stage_dataset(broken, np.array([0]), tmp_path / "local", 1 << 30, progress=False)
    assert [p.name for p in (tmp_path / "local" / STAGE_SUBDIR).iterdir() if not p.name.endswith(".lock")] == []


def test_damaged_copies_are_replaced(ds, tmp_path):
    staged, _ = stage_dataset(ds, np.array([0]), tmp_path, 1 << 30, progress=False)
    copy = staged.path(0, "field")
    copy.write_bytes(copy.read_bytes()[:-10])             # truncated: size differs
    _, report = stage_dataset(ds, np.array([0]), tmp_path, 1 << 30, progress=False)
    assert (report.files_copied, report.files_reused) == (1, 1)
    data = bytearray(copy.read_bytes())
    data[100] ^= 1                                          # same size: only verify_reused sees it
    copy.write_bytes(bytes(data))
    _, report = stage_dataset(ds, np.array([0]), tmp_path, 1 << 30, verify_reused=True, progress=False)
    assert (report.files_copied, report.files_reused) == (1, 1)
    assert copy.read_bytes() == ds.path(0, "field").read_bytes()


def test_stage_dir_expands_variables_and_rejects_unset_ones(monkeypatch, tmp_path):
    monkeypatch.setenv("CELLAVIE_TEST_TMP", str(tmp_path))
    assert resolve_stage_dir("$CELLAVIE_TEST_TMP/x") == tmp_path / "x"
    monkeypatch.delenv("CELLAVIE_TEST_TMP")
    with pytest.raises(ConfigError, match="CELLAVIE_TEST_TMP"):
        resolve_stage_dir("$CELLAVIE_TEST_TMP/x")


def test_bad_arguments_are_config_errors(ds, tmp_path):
    with pytest.raises(ConfigError, match="budget_bytes"):
        stage_dataset(ds, np.array([0]), tmp_path, -1, progress=False)
    with pytest.raises(ConfigError, match="task"):
        stage_dataset(ds, np.array([0]), tmp_path, 10, task="yolo", progress=False)
    with pytest.raises(ConfigError, match="outside"):
        stage_dataset(ds, np.array([7]), tmp_path, 10, progress=False)
