"""Cell-level accuracy counts on a hand-made truth raster."""
import math

import numpy as np

from cellavie_hpc.screen.evaluate import combine, evaluate_image, match_detections


def _truth():
    instance = np.zeros((100, 100), np.int32)
    instance[10:30, 10:30] = 1      # healthy
    instance[10:30, 60:80] = 2      # infected (ring)
    instance[60:80, 10:30] = 3      # healthy
    instance[60:80, 60:80] = 4      # infected (schizont), never detected
    cells = [{"id": 1, "infected": False, "stage": "healthy", "cy": 19.5, "cx": 19.5},
             {"id": 2, "infected": True, "stage": "ring", "cy": 19.5, "cx": 69.5},
             {"id": 3, "infected": False, "stage": "healthy", "cy": 69.5, "cx": 19.5},
             {"id": 4, "infected": True, "stage": "schizont", "cy": 69.5, "cx": 69.5}]
    return instance, cells


def test_match_uses_the_raster_and_a_small_window_at_edges():
    instance, _ = _truth()
    ids = match_detections(np.array([20, 20, 31, 50]), np.array([20, 70, 20, 50]), instance)
    assert ids.tolist() == [1, 2, 1, 0]


def test_counts_tp_fn_fp_duplicates_spurious():
    instance, cells = _truth()
    # cell 1 called infected (fp), cell 2 found twice (tp + duplicate), cell 3 healthy (tn),
    # a background detection called infected (fp, spurious), cell 4 missed (fn).
    cy = np.array([20, 20, 21, 70, 50])
    cx = np.array([20, 70, 69, 20, 50])
    called = np.array([True, True, False, False, True])
    c = evaluate_image(cells, instance, cy, cx, called)
    assert {k: c[k] for k in ("cells", "infected", "healthy", "detected", "duplicates", "spurious", "tp", "fn",
                              "fp", "tn")} == {"cells": 4, "infected": 2, "healthy": 2, "detected": 3,
                                               "duplicates": 1, "spurious": 1, "tp": 1, "fn": 1, "fp": 2, "tn": 1}
    assert c["edge_cells"] == 0
    assert c["missed_infected"] == [{"id": 4, "stage": "schizont", "detected": False}]
    assert [f["detection"] for f in c["false_positives"]] == [0, 4]
    total = combine([c, c])
    assert total["counts"]["tp"] == 2 and total["sensitivity"] == 0.5
    assert total["false_positives_per_million_healthy"] == 1e6
    assert total["detection_recall"] == 0.75


def test_rates_are_nan_without_infected_cells():
    instance, cells = _truth()
    healthy_only = [dict(c, infected=False, stage="healthy") for c in cells]
    c = evaluate_image(healthy_only, instance, np.array([20.0]), np.array([20.0]), np.array([False]))
    assert math.isnan(combine([c])["sensitivity"]) and combine([c])["specificity"] == 1.0


def test_cells_centred_outside_the_field_are_not_counted_but_their_false_alarms_are():
    instance = np.zeros((100, 100), np.int32)
    instance[0:6, 40:60] = 1        # infected, centred at y = -8: a sliver, the neighbouring field's cell
    instance[94:100, 10:30] = 2     # healthy, centred at y = 107
    instance[40:60, 40:60] = 3      # infected, inside
    cells = [{"id": 1, "infected": True, "stage": "ring", "cy": -8.0, "cx": 50.0},
             {"id": 2, "infected": False, "stage": "healthy", "cy": 107.0, "cx": 20.0},
             {"id": 3, "infected": True, "stage": "ring", "cy": 50.0, "cx": 50.0}]
    # the sliver of cell 1 is not detected (no false negative); the healthy sliver 2 is called infected (fp)
    c = evaluate_image(cells, instance, np.array([50.0, 97.0]), np.array([50.0, 20.0]), np.array([True, True]))
    assert (c["cells"], c["infected"], c["healthy"], c["edge_cells"]) == (1, 1, 0, 2)
    assert (c["tp"], c["fn"], c["fp"], c["detected"]) == (1, 0, 1, 1)
