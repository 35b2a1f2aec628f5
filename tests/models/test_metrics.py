"""Metrics against hand-computed values."""
import math

import numpy as np
import pytest
from keras import ops

from cellavie_hpc.models import metrics


def np_(x):
    return ops.convert_to_numpy(x)


def test_box_iou_pairs():
    a = np.array([[0, 0, 2, 2], [0, 0, 0, 5]], np.float32)  # second box is empty
    b = np.array([[1, 1, 3, 3], [5, 5, 6, 6], [0, 0, 2, 2]], np.float32)
    np.testing.assert_allclose(np_(metrics.box_iou(a, b)), [[1 / 7, 0, 1], [0, 0, 0]], rtol=1e-6)


def test_segmentation_iou_and_dice():
    labels = np.array([[0, 1], [2, 2]])
    predicted = np.array([[0, 1], [1, 2]])
    np.testing.assert_allclose(np_(metrics.segmentation_iou(labels, predicted, 3)), [1.0, 0.5, 0.5])
    np.testing.assert_allclose(np_(metrics.segmentation_dice(labels, predicted, 3)), [1.0, 2 / 3, 2 / 3], rtol=1e-6)
    # a class in neither truth nor prediction cannot be wrong
    assert np_(metrics.segmentation_iou(labels, predicted, 4))[3] == 1.0


def test_infection_counts_and_rates():
    truth = np.array([0, 0, 1, 2, 3, 0])
    predicted = np.array([0, 1, 1, 0, 3, 1])
    tp, fp, tn, fn = (float(np_(v)) for v in metrics.infection_counts(truth, predicted))
    assert (tp, fp, tn, fn) == (2.0, 2.0, 1.0, 1.0)
    rates = metrics.infection_rates(tp, fp, tn, fn)
    assert rates == pytest.approx({"sensitivity": 2 / 3, "specificity": 1 / 3, "precision": 0.5})
    assert math.isnan(metrics.infection_rates(0, 0, 5, 0)["sensitivity"])  # no infected cell: undefined, not 0


def test_phase_rmse():
    assert float(np_(metrics.phase_rmse(np.array([3.0, 4.0]), np.zeros(2)))) == pytest.approx(math.sqrt(12.5))


def test_mean_average_precision_voc_hand_computed():
    box = [0, 0, 10, 10]
    truths = [
        {"boxes": [box, [20, 20, 30, 30]], "classes": [0, 0]},
        {"boxes": [box, [50, 50, 60, 60]], "classes": [0, 1]},
    ]
    detections = [
        {"boxes": [box, [0, 1, 10, 11], [40, 40, 50, 50], box], "scores": [0.9, 0.8, 0.6, 0.95],
         "classes": [0, 0, 0, 1]},
        {"boxes": [box, [50, 50, 60, 60]], "scores": [0.7, 0.5], "classes": [0, 1]},
    ]
    # class 0, by score: TP, duplicate FP, TP, FP; 3 truths -> AP = 1/3 * 1 + 1/3 * 2/3 = 5/9
    # class 1: FP (wrong class box) then TP; 1 truth -> AP = 1 * 1/2
    out = metrics.mean_average_precision(detections, truths, num_classes=3)
    assert out["ap_0"] == pytest.approx(5 / 9)
    assert out["ap_1"] == pytest.approx(0.5)
    assert math.isnan(out["ap_2"])
    assert out["map"] == pytest.approx((5 / 9 + 0.5) / 2)
    none = metrics.mean_average_precision([{"boxes": [], "scores": [], "classes": []}] * 2, truths, num_classes=2)
    assert none["map"] == 0.0
    with pytest.raises(ValueError, match="one of each per image"):
        metrics.mean_average_precision(detections[:1], truths, num_classes=2)


def test_infected_calls_use_the_summed_stage_probability_not_the_argmax():
    """Regression: the argmax over stages called a cell at 0.40 healthy / 0.30 ring / 0.30 trophozoite healthy."""
    probs = np.array([[0.40, 0.30, 0.30, 0.0], [0.60, 0.40, 0.0, 0.0], [0.10, 0.0, 0.0, 0.90]]) + 1e-9
    logits = np.log(probs).astype(np.float32)
    assert np.argmax(probs, -1).tolist() == [0, 0, 3]
    assert np_(metrics.infected_calls(logits)).tolist() == [1, 0, 1]
    assert np_(metrics.infected_calls(logits, threshold=0.95)).tolist() == [0, 0, 0]
    from cellavie_hpc.models.registry import model_spec
    out = model_spec("classifier", "tiny", 16).metrics({"label": np.array([1, 0, 3])}, {"logits": logits})
    assert [float(np_(out[k])) for k in ("tp_total", "fp_total", "tn_total", "fn_total")] == [2.0, 0.0, 1.0, 0.0]
    assert float(np_(out["correct_total"])) == 2.0  # stage accuracy stays the argmax's
