"""Screening accuracy against ground truth: which true cell each detection is, and cell-level rates.

A detection is the true cell whose instance raster holds its centre (or, for a centre that falls just
outside a cell, the cell most present in a small window around it). Counting is per true cell, because
a screen's question is per cell: an infected cell is *found* when some detection of it is called
infected (tp), else missed (fn, also when it was not detected at all); a healthy cell called infected
is a false positive, and so is a detection on background called infected. False positives are also
given per million healthy cells, the figure that matters at parasitaemias of 1e-3 to 1e-5.
"""
from __future__ import annotations

import numpy as np

COUNT_KEYS = ("cells", "infected", "healthy", "detected", "duplicates", "spurious", "tp", "fn", "fp", "tn",
              "edge_cells")


def match_detections(cy: np.ndarray, cx: np.ndarray, instance: np.ndarray, window_px: int = 2) -> np.ndarray:
    """True cell id (0 = background) of each detection centre (pixels) on the instance raster (H, W)."""
    h, w = instance.shape
    iy = np.clip(np.rint(np.asarray(cy, np.float64)).astype(np.int64), 0, h - 1)
    ix = np.clip(np.rint(np.asarray(cx, np.float64)).astype(np.int64), 0, w - 1)
    ids = instance[iy, ix].astype(np.int64)
    for k in np.flatnonzero(ids == 0):
        y, x = iy[k], ix[k]
        patch = instance[max(0, y - window_px):y + window_px + 1, max(0, x - window_px):x + window_px + 1]
        present = patch[patch > 0]
        if present.size:
            values, counts = np.unique(present, return_counts=True)
            ids[k] = values[np.argmax(counts)]
    return ids


def owned_cells(truth_cells: list[dict], shape: tuple[int, int]) -> set[int]:
    """Ids of the true cells whose centre lies inside the field of view (H, W).

    A field owns the cells whose centre it contains, as a scan of adjacent fields assigns each cell to
    one field. A cell centred outside shows only a sliver here (5 to 370 of its ~750 pixels for the
    eight such infected cells of the validation sample), which the neighbouring field sees whole.
    """
    h, w = shape
    return {int(c["id"]) for c in truth_cells if 0 <= c["cy"] < h and 0 <= c["cx"] < w}


def evaluate_image(truth_cells: list[dict], instance: np.ndarray, cy, cx, called_infected) -> dict:
    """`count_matches` of detections centred at (cy, cx) pixels on the instance raster (H, W)."""
    return count_matches(truth_cells, instance.shape, match_detections(cy, cx, instance), called_infected)


def count_matches(truth_cells: list[dict], shape: tuple[int, int], true_ids, called_infected) -> dict:
    """Counts (`COUNT_KEYS`) of one image (H, W) whose detections are the true cells `true_ids`
    (`match_detections`), plus the missed infected cells and the false positives (lists).

    Only cells the image owns (`owned_cells`) count as cells, infected or healthy; the others are
    `edge_cells`. Any healthy cell called infected is a false positive, owned or not: the alarm is raised.
    """
    called = np.asarray(called_infected, bool).reshape(-1)
    ids = np.asarray(true_ids, np.int64).reshape(-1)
    own = owned_cells(truth_cells, shape)
    infected_ids = {int(c["id"]) for c in truth_cells if c["infected"] and int(c["id"]) in own}
    healthy_ids = {int(c["id"]) for c in truth_cells if not c["infected"]}
    stage_of = {int(c["id"]): c["stage"] for c in truth_cells}
    owned_hits = np.isin(ids, sorted(own))
    hit = set(ids[owned_hits].tolist())
    positive = set(ids[(ids > 0) & called].tolist())
    spurious_positive = int(np.count_nonzero((ids == 0) & called))
    healthy_positive = positive & healthy_ids
    n_healthy = len(healthy_ids & own)
    missed = sorted(infected_ids - positive)
    counts = {
        "cells": len(own), "infected": len(infected_ids), "healthy": n_healthy, "detected": len(hit),
        "duplicates": int(np.count_nonzero(owned_hits)) - len(hit), "spurious": int(np.count_nonzero(ids == 0)),
        "tp": len(positive & infected_ids), "fn": len(missed),
        "fp": len(healthy_positive) + spurious_positive, "tn": n_healthy - len(healthy_positive & own),
        "edge_cells": len(truth_cells) - len(own),
    }
    counts["missed_infected"] = [{"id": i, "stage": stage_of[i], "detected": i in hit} for i in missed]
    detections = np.flatnonzero(called & ((ids == 0) | np.isin(ids, sorted(healthy_positive))))
    counts["false_positives"] = [{"detection": int(k), "true_cell": int(ids[k])} for k in detections]
    return counts


def rates(counts: dict) -> dict:
    """Sensitivity, specificity, false positives per million healthy cells, detection recall (NaN if undefined)."""
    def ratio(a, b):
        return a / b if b else float("nan")

    return {
        "sensitivity": ratio(counts["tp"], counts["tp"] + counts["fn"]),
        "specificity": ratio(counts["tn"], counts["tn"] + counts["fp"]),
        "false_positives_per_million_healthy": ratio(counts["fp"] * 1e6, counts["healthy"]),
        "detection_recall": ratio(counts["detected"], counts["cells"]),
        "precision": ratio(counts["tp"], counts["tp"] + counts["fp"]),
    }


def combine(per_image: list[dict]) -> dict:
    """Sum the counts of many images and derive the rates from the sums (not a mean of per-image rates)."""
    total = {k: int(sum(c[k] for c in per_image)) for k in COUNT_KEYS}
    return {"counts": total, **rates(total)}
