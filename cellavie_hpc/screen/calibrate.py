"""The infected-call threshold, chosen on a validation sample with ground truth instead of assumed.

A screen trades sensitivity for false positives through one number: the P(infected) above which a cell
is called infected. `cellavie screen --calibrate VALIDATION --models MODELS_DIR --out OUT` screens a
sample with ground truth (its truth never seen in training), computes the operating curve (sensitivity
against false positives per million healthy cells at every threshold: an FROC curve) and writes the
chosen threshold into MODELS_DIR/chain.json with its validation figures as provenance.

Counting is per true cell, as in `evaluate`: an infected cell is found when its best detection reaches
the threshold; a healthy cell, or a detection on background, reaching it is one false positive.
The rule: the highest threshold that keeps the target sensitivity (default: every infected cell the
chain detects at all, the most any threshold can give), placed midway in log-odds between the lowest
infected score it must keep and the next lower score of a healthy cell, so the validation counts are
those of the curve and a new cell scoring a little lower than any seen is still called infected.
An infected-rich validation sample (parasitaemia ~5 %) gives hundreds of infected cells; the false
positive rate per healthy cell does not depend on the parasitaemia.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cellavie_hpc.errors import UserError
from cellavie_hpc.screen.summary import clopper_pearson_interval

#: P(infected) is kept inside (0, 1): chain.json's threshold must be a probability strictly between them.
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class CellScores:
    """Best P(infected) per true cell: `infected` (N_i,) for the infected cells the images own (NaN = never
    detected), `healthy` for every detected healthy cell, owned or not (a false alarm either way),
    `spurious` for detections on background; `healthy_cells`: the healthy cells the images own."""
    infected: np.ndarray
    healthy: np.ndarray
    spurious: np.ndarray
    healthy_cells: int


def truth_of(ds, n_images: int | None = None) -> dict[str, dict[int, tuple[bool, bool]]]:
    """Ground truth of the first `n_images` images: image id -> true cell id -> (infected, owned by the image)
    (`evaluate.owned_cells`: the screen answers for the cells whose centre is in the picture)."""
    from cellavie_hpc.screen.evaluate import owned_cells

    images = ds.images if n_images is None else ds.images[:n_images]
    truth = {}
    for i, info in enumerate(images):
        cells = ds.cells(i)
        own = owned_cells(cells, (info.height, info.width))
        truth[info.id] = {int(c["id"]): (bool(c["infected"]), int(c["id"]) in own) for c in cells}
    return truth


def cell_scores(cells: pd.DataFrame, truth: dict[str, dict[int, tuple[bool, bool]]]) -> CellScores:
    """Best score of every true cell from an evaluated cell table (columns image, true_cell, p_infected)
    and the ground truth (`truth_of`)."""
    missing = sorted(set(cells["image"]) - set(truth))
    if missing:
        raise UserError(f"cells of images {missing[:5]} have no ground truth; calibrate on the sample they came from")
    best = cells[cells["true_cell"] > 0].groupby(["image", "true_cell"])["p_infected"].max()
    infected, healthy, healthy_cells = [], [], 0
    for image, ids in truth.items():
        for cell_id, (is_infected, owned) in ids.items():
            score = best.get((image, cell_id), np.nan)
            if is_infected and owned:
                infected.append(score)
            elif not is_infected:
                healthy_cells += owned
                if not np.isnan(score):
                    healthy.append(score)
    return CellScores(np.asarray(infected, np.float64), np.asarray(healthy, np.float64),
                      cells.loc[cells["true_cell"] == 0, "p_infected"].to_numpy(np.float64), healthy_cells)


def operating_curve(scores: CellScores) -> pd.DataFrame:
    """Sensitivity and false positives at every distinct threshold, highest first (one row per threshold).

    Columns: threshold, tp, fn, fp, sensitivity, fp_per_million_healthy.
    """
    n_infected, n_healthy = len(scores.infected), scores.healthy_cells
    if n_infected == 0 or n_healthy == 0:
        raise UserError(f"calibration needs infected and healthy cells in the validation sample, got {n_infected} "
                        f"infected and {n_healthy} healthy; generate one with --parasitemia 0.05")
    positives = np.sort(scores.infected[~np.isnan(scores.infected)])
    negatives = np.sort(np.concatenate([scores.healthy, scores.spurious]))
    thresholds = np.unique(np.concatenate([positives, negatives]))[::-1]
    tp = len(positives) - np.searchsorted(positives, thresholds, side="left")
    fp = len(negatives) - np.searchsorted(negatives, thresholds, side="left")
    return pd.DataFrame({"threshold": thresholds, "tp": tp, "fn": n_infected - tp, "fp": fp,
                         "sensitivity": tp / n_infected, "fp_per_million_healthy": fp * 1e6 / n_healthy})


def _logit(p: float) -> float:
    p = min(max(p, _EPS), 1 - _EPS)
    return float(np.log(p / (1 - p)))


def choose_threshold(scores: CellScores, target_sensitivity: float | None = None) -> dict:
    """The calibrated threshold and its validation figures (see the module docstring for the rule)."""
    curve = operating_curve(scores)
    n_infected, n_healthy = len(scores.infected), scores.healthy_cells
    reachable = float(curve["sensitivity"].max())
    target = reachable if target_sensitivity is None else float(target_sensitivity)
    if not 0 < target <= 1:
        raise UserError(f"--target-sensitivity must be in (0, 1], got {target}")
    if target > reachable + 1e-12:
        raise UserError(f"--target-sensitivity {target:g} is out of reach: {curve['fn'].iloc[-1]} of the "
                        f"{n_infected} infected validation cells are never detected (at most {reachable:.4f}); "
                        "lower the target or leave it out")
    row = curve[curve["sensitivity"] >= target - 1e-12].iloc[0]
    keep = float(row["threshold"])
    negatives = np.concatenate([scores.healthy, scores.spurious])
    below = negatives[negatives < keep]
    low = float(below.max()) if below.size else 0.0
    threshold = 1 / (1 + np.exp(-(_logit(keep) + _logit(low)) / 2)) if below.size else keep / 2
    threshold = float(min(max(threshold, _EPS), 1 - _EPS))
    tp, fp = int(row["tp"]), int(row["fp"])
    lo, hi = clopper_pearson_interval(tp, n_infected)
    return {"threshold": threshold, "target_sensitivity": target_sensitivity, "reachable_sensitivity": reachable,
            "sensitivity": tp / n_infected, "sensitivity_ci95": [lo, hi], "tp": tp, "fn": n_infected - tp, "fp": fp,
            "fp_per_million_healthy": fp * 1e6 / n_healthy, "infected_cells": n_infected, "healthy_cells": n_healthy,
            "lowest_kept_infected_score": keep, "highest_healthy_score_below": low if below.size else None}


def curve_figure(curve: pd.DataFrame, choice: dict, default_threshold: float = 0.5):
    """FROC curve: sensitivity against false positives per million healthy cells (log), chosen point marked."""
    from cellavie_hpc.report.plots import STYLE, plt

    with plt.rc_context(STYLE):
        fig, ax = plt.subplots()
        x = np.maximum(curve["fp_per_million_healthy"].to_numpy(), 1.0)
        ax.step(x, curve["sensitivity"], where="post", color="C0", label="operating curve")
        ax.plot([max(choice["fp_per_million_healthy"], 1.0)], [choice["sensitivity"]], "o", color="C3",
                label=f"calibrated threshold {choice['threshold']:.3g}")
        at_default = curve[curve["threshold"] >= default_threshold]
        if len(at_default):
            last = at_default.iloc[-1]
            ax.plot([max(last["fp_per_million_healthy"], 1.0)], [last["sensitivity"]], "s", color="C1",
                    label=f"threshold {default_threshold:g}")
        ax.set_xscale("log")
        ax.set_ylim(max(0.0, np.floor((choice["sensitivity"] - 0.1) * 20) / 20), 1.005)   # the part that matters
        ax.set_xlabel("False positives per million healthy cells (1 = none)")
        ax.set_ylabel("Sensitivity (infected cells found)")
        ax.set_title(f"Validation: {choice['infected_cells']} infected, {choice['healthy_cells']} healthy cells")
        ax.legend(loc="lower right")
        return fig


def calibrate(out: str | Path, truth: dict[str, dict[int, bool]], models_dir: str | Path | None,
              target_sensitivity: float | None = None, dataset: str = "") -> dict:
    """Choose the threshold from OUT/cells.parquet (an evaluated screen), write OUT/calibration.{csv,json,png,pdf},
    and, with `models_dir`, store it in MODELS_DIR/chain.json (provenance `calibration`); return the choice."""
    from cellavie_hpc.report.plots import save_figure
    from cellavie_hpc.screen.models_dir import load_spec, save_spec

    out = Path(out)
    cells = pd.read_parquet(out / "cells.parquet")
    if "true_cell" not in cells:
        raise UserError(f"{out / 'cells.parquet'}: no true_cell column; screen the validation sample with --evaluate")
    scores = cell_scores(cells, truth)
    curve = operating_curve(scores)
    choice = {"dataset": dataset, **choose_threshold(scores, target_sensitivity)}
    curve.to_csv(out / "calibration.csv", index=False)
    save_figure(curve_figure(curve, choice), out / "calibration")
    tmp = out / f".calibration.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(choice, indent=2) + "\n")
    os.replace(tmp, out / "calibration.json")
    if models_dir is not None:
        spec = load_spec(models_dir)
        save_spec(models_dir, dataclasses.replace(spec, infected_threshold=choice["threshold"],
                                                  provenance={**spec.provenance, "calibration": choice}))
    return choice
