"""Targets from truth rasters: hand-checked classes, peaks, boxes; mappable in tf.data with the spec's shapes."""
import numpy as np
import pytest
import tensorflow as tf
from model_tiles import disc_rasters

from cellavie_hpc.models import targets
from cellavie_hpc.models.registry import model_spec


def test_segmentation_targets_boundary_separates_touching_cells_and_ignores_patch_edge():
    instance = np.zeros((8, 8), np.int32)
    instance[1:5, 0:3] = 5  # touches the left patch edge
    instance[1:5, 3:6] = 9  # touches cell 5
    seg = targets.segmentation_targets(instance).numpy()
    expected = np.zeros((8, 8), np.int32)
    expected[1:5, 0:6] = 2
    expected[2:4, 0:2] = 1  # column 0 is interior: the patch edge is not a cell edge
    expected[2:4, 4] = 1
    np.testing.assert_array_equal(seg, expected)


def test_detector_targets_peak_at_cell_centres_with_sizes_offsets_and_classes():
    # Disc centred (13.5, 9.5) spans rows/cols 10..17 / 6..13 -> box (10, 6, 18, 14), centre (14, 10) -> grid (3.5, 2.5)
    instance, cls, _ = disc_rasters(32, [(13.5, 9.5, 4.0, 1), (22.5, 25.5, 4.0, 3)])
    t = {k: v.numpy() for k, v in targets.detector_targets(instance, cls, stride=4, num_classes=2).items()}
    assert t["heatmap"].shape == (8, 8, 2) and t["size"].shape == (8, 8, 2) and t["mask"].shape == (8, 8, 1)
    assert t["heatmap"][3, 2, 0] == pytest.approx(1.0) and t["heatmap"][3, 2, 1] < 1e-6  # healthy
    assert t["heatmap"][5, 6, 1] == pytest.approx(1.0) and t["heatmap"][5, 6, 0] < 1e-6  # trophozoite: infected
    assert np.count_nonzero(t["heatmap"] >= 1.0 - 1e-6) == 2
    assert 0.0 < t["heatmap"][3, 3, 0] < 1.0  # Gaussian shoulder
    assert np.argwhere(t["mask"][..., 0]).tolist() == [[3, 2], [5, 6]]
    np.testing.assert_allclose(t["size"][3, 2], [2.0, 2.0])
    np.testing.assert_allclose(t["offset"][3, 2], [0.5, 0.5])
    assert t["size"].sum() == pytest.approx(8.0)


def test_detector_targets_stage_classes_empty_patch_and_fragments():
    instance, cls, _ = disc_rasters(16, [(7.5, 7.5, 3.0, 4)])
    instance[0, 0], cls[0, 0] = 77, 1  # a one-pixel fragment of a neighbouring cell: ignored
    t = targets.detector_targets(instance, cls, stride=4, num_classes=4)
    assert np.argwhere(t["heatmap"].numpy() >= 1.0 - 1e-6).tolist() == [[2, 2, 3]]  # schizont
    empty = targets.detector_targets(np.zeros((16, 16), np.int32), np.zeros((16, 16), np.int32))
    assert all(float(tf.reduce_sum(v)) == 0.0 for v in empty.values())
    with pytest.raises(ValueError, match="multiple of the output stride"):
        targets.detector_targets(np.zeros((18, 18), np.int32), np.zeros((18, 18), np.int32))


def test_cell_boxes_end_exclusive():
    instance, cls, _ = disc_rasters(32, [(13.5, 9.5, 4.0, 2)])
    boxes, classes = targets.cell_boxes(instance, cls)
    np.testing.assert_array_equal(boxes.numpy(), [[10, 6, 18, 14]])
    assert classes.numpy().tolist() == [1]


def test_classifier_target_takes_centre_cell_or_majority():
    instance, cls, _ = disc_rasters(16, [(7.5, 7.5, 3.0, 3), (1.0, 1.0, 1.5, 1)])
    assert int(targets.classifier_target(instance, cls)) == 2  # trophozoite under the centre
    instance, cls, _ = disc_rasters(16, [(2.0, 2.0, 1.5, 1), (12.0, 12.0, 3.0, 4)])
    assert int(targets.classifier_target(instance, cls)) == 3  # centre is background: the bigger cell votes more
    assert targets.stage_label("ring") == 1
    with pytest.raises(ValueError, match="unknown parasite stage"):
        targets.stage_label("gametocyte")


def test_refocus_targets_units():
    out = targets.refocus_targets(np.ones((8, 8), np.float32), focus_distance_m=-12.5e-6)
    assert out["phase"].shape == (8, 8, 1)
    assert float(out["defocus_um"][0]) == pytest.approx(-12.5)


@pytest.mark.parametrize("name", ["refocus", "unet", "detector", "classifier"])
def test_from_truth_maps_in_tf_data_with_the_spec_shapes(name):
    patch = 32 if name != "classifier" else 16
    spec = model_spec(name, "tiny", patch=patch)
    instance, cls, phase = disc_rasters(patch, [(8.0, 8.0, 3.0, 2), (20.0, 9.0, 3.0, 1)][: 1 if patch == 16 else 2])
    truth = {"instance": [instance] * 2, "cls": [cls] * 2, "phase": [phase] * 2, "focus_distance_m": [3e-6] * 2}
    ds = tf.data.Dataset.from_tensor_slices(truth).map(spec.targets.from_truth)
    (sample,) = ds.take(1)
    assert set(sample) == set(spec.targets.shapes)
    for key, value in sample.items():
        assert tuple(value.shape) == spec.targets.shapes[key], key
        assert value.dtype.name == spec.targets.dtypes[key], key
