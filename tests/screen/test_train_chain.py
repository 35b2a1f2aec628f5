"""The classifier's training crops come from the chain's own refocused phase, aligned and labelled by ground truth."""
import json
import shutil

import numpy as np
import pytest

from cellavie_hpc.errors import UserError
from cellavie_hpc.screen.chain import ScreenOptions, crops_around, physics_refocus
from cellavie_hpc.screen.train_chain import refocused_dataset, train_chain

CROP = 64


@pytest.fixture(scope="module")
def refocused(sample_dir, tmp_path_factory):
    return refocused_dataset(sample_dir, tmp_path_factory.mktemp("chain-view") / "refocused", progress=None)


def test_refocused_crops_are_centred_on_true_cells_with_their_labels(sample_dir, refocused):
    from cellavie_hpc.data.dataset import open_dataset
    from cellavie_hpc.data.pipeline import build_pipeline, task_plan
    from cellavie_hpc.models.targets import stage_label

    source, view = open_dataset(sample_dir), open_dataset(refocused)
    plan = task_plan(view, "classifier", CROP)
    crops, labels = [], []
    for x, y in build_pipeline(view, plan.tiles, "classifier", 64, CROP, drop_remainder=False):
        crops.append(x.numpy()[..., 0])
        labels.append((y["label"] if isinstance(y, dict) else y).numpy().reshape(-1))
    crops, labels = np.concatenate(crops), np.concatenate(labels)
    assert len(crops) == len(plan.tiles) > 100
    row = 0
    for i in range(len(source.images)):
        truth = {c["id"]: c for c in source.cells(i)}
        instance = source.read_truth_patch(i, 0, 0, 512, 512)["instance"]
        phase, _ = physics_refocus(source.read_field(i)[0], source, ScreenOptions())
        cells = view.cells(i)
        mine = plan.tiles[:, 0] == i
        assert mine.sum() == len(cells)
        centres = plan.tiles[mine, 1:] + CROP // 2
        # the crops are the chain's refocused phase around the chain's cells, not the clean truth phase
        np.testing.assert_array_equal(crops[row:row + len(cells)],
                                      crops_around(phase, centres[:, 0], centres[:, 1], CROP))
        on_cell = [c for c in cells if c["true_cell"]]
        assert len(on_cell) >= 0.95 * len(cells)   # the rest: blobs of refocusing artefacts at the border
        # labels: the stage of the true cell under the crop centre, as listed in the data set
        centred = np.array([instance[int(round(c["cy"])), int(round(c["cx"]))] == c["true_cell"] > 0 for c in cells])
        assert centred.mean() >= 0.95
        expected = np.array([stage_label(truth[c["true_cell"]]["stage"]) if c["true_cell"] else 0 for c in cells])
        np.testing.assert_array_equal(labels[row:row + len(cells)][centred], expected[centred])
        assert {c["stage"] for c in cells if c["true_cell"]} == {truth[c["true_cell"]]["stage"] for c in on_cell}
        # isolated cells (found once, whole inside the image; cut cells at the border are kept too, ~25 %):
        # crop centre within 2 px of the true centre
        whole = [c for c in on_cell if sum(d["true_cell"] == c["true_cell"] for d in on_cell) == 1
                 and 2 <= truth[c["true_cell"]]["cy"] - truth[c["true_cell"]]["radius_px"]
                 and truth[c["true_cell"]]["cy"] + truth[c["true_cell"]]["radius_px"] <= 509
                 and 2 <= truth[c["true_cell"]]["cx"] - truth[c["true_cell"]]["radius_px"]
                 and truth[c["true_cell"]]["cx"] + truth[c["true_cell"]]["radius_px"] <= 509]
        offsets = np.array([np.hypot(c["cy"] - truth[c["true_cell"]]["cy"], c["cx"] - truth[c["true_cell"]]["cx"])
                            for c in whole])
        assert len(whole) >= 0.7 * len(on_cell) and np.quantile(offsets, 0.95) <= 2.0, np.sort(offsets)[-10:]
        infected_true = {k for k, c in truth.items() if c["infected"]}
        assert {c["true_cell"] for c in cells if c["infected"]} <= infected_true
        row += len(cells)


def test_refocused_dataset_is_reused_and_rebuilt_when_the_options_change(sample_dir, refocused):
    manifest = json.loads((refocused / "manifest.json").read_text())
    stamp = (refocused / "truth" / "img-00000.tif").stat().st_mtime_ns
    assert refocused_dataset(sample_dir, refocused, progress=None) == refocused
    assert (refocused / "truth" / "img-00000.tif").stat().st_mtime_ns == stamp
    assert manifest["derived"]["options"]["pad"] == "edge"
    assert manifest["counts"]["cells"] == sum(e["cells"] for e in manifest["images"])
    other = refocused.parent / "refocused-copy"
    shutil.copytree(refocused, other, symlinks=True)
    refocused_dataset(sample_dir, other, options=ScreenOptions(pad="none"), progress=None)
    assert json.loads((other / "manifest.json").read_text())["derived"]["options"]["pad"] == "none"
    assert (other / "truth" / "img-00000.tif").read_bytes() != (refocused / "truth" / "img-00000.tif").read_bytes()


def test_size_rules_follow_the_training_cells(sample_dir):
    from cellavie_hpc.data.dataset import open_dataset
    from cellavie_hpc.screen.train_chain import cell_geometry

    ds = open_dataset(sample_dir)
    r = float(np.median([c["radius_px"] for i in range(len(ds.images)) for c in ds.cells(i)]))
    geometry = cell_geometry(ds)
    assert 13 < r < 18                      # 7.8 um cells at 0.25 um per pixel
    assert geometry == {"split_distance_px": round(2 * r / 3), "border_min_area_px": round(np.pi * r * r / 2)}


def test_unknown_crop_source_is_named(sample_dir, tmp_path):
    with pytest.raises(UserError, match="classifier crops must be one of"):
        train_chain(sample_dir, tmp_path / "m", tmp_path / "w", crops="clean", progress=None)
