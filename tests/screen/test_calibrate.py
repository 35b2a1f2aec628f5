"""The infected threshold chosen on a validation sample: the curve's counts, the rule, and the CLI end to end."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from cellavie_hpc.errors import UserError
from cellavie_hpc.screen.calibrate import CellScores, cell_scores, choose_threshold, operating_curve


def _scores():
    # 5 infected cells (one never detected), 6 healthy (5 detected), 2 detections on background
    return CellScores(infected=np.array([0.95, 0.8, 0.6, 0.3, np.nan]),
                      healthy=np.array([0.01, 0.02, 0.2, 0.4, 0.7]), spurious=np.array([0.05, 0.9]), healthy_cells=6)


def test_operating_curve_counts_cells_at_every_threshold():
    curve = operating_curve(_scores()).set_index("threshold")
    assert curve.index.tolist() == sorted(curve.index, reverse=True)
    assert curve.loc[0.95, ["tp", "fp"]].tolist() == [1, 0]
    assert curve.loc[0.9, ["tp", "fp"]].tolist() == [1, 1]                   # the background blob at 0.9
    assert curve.loc[0.6, ["tp", "fp"]].tolist() == [3, 2]                   # 0.95 0.8 0.6 / 0.9 0.7
    assert curve.loc[0.3, ["tp", "fn", "fp"]].tolist() == [4, 1, 3]          # + 0.4 healthy
    assert curve.loc[0.3, "sensitivity"] == pytest.approx(0.8)               # the undetected cell counts
    assert curve.loc[0.01, "fp_per_million_healthy"] == pytest.approx(7 * 1e6 / 6)     # 5 healthy + 2 blobs


def test_threshold_keeps_every_detected_infected_cell_midway_to_the_next_healthy_score():
    choice = choose_threshold(_scores())
    assert choice["reachable_sensitivity"] == pytest.approx(0.8) and choice["tp"] == 4 and choice["fp"] == 3
    logit = lambda p: np.log(p / (1 - p))                                      # noqa: E731
    assert logit(choice["threshold"]) == pytest.approx((logit(0.3) + logit(0.2)) / 2)
    assert 0.2 < choice["threshold"] < 0.3
    lo, hi = choice["sensitivity_ci95"]
    assert lo < 0.8 < hi
    lower = choose_threshold(_scores(), target_sensitivity=0.6)              # 3 of 5: keep 0.6, next negative 0.4
    assert lower["tp"] == 3 and lower["fp"] == 2 and 0.4 < lower["threshold"] < 0.6
    with pytest.raises(UserError, match="out of reach.*1 of the 5 infected"):
        choose_threshold(_scores(), target_sensitivity=0.9)


def test_scores_come_from_the_best_detection_of_each_true_cell():
    cells = pd.DataFrame({"image": ["a", "a", "a", "b", "b", "b"], "true_cell": [1, 1, 0, 2, 3, 6],
                          "p_infected": [0.2, 0.7, 0.4, 0.1, 0.9, 0.8]})
    # (infected, owned): cell 6 is healthy but centred outside image b (still a false alarm when called);
    # cell 7 infected outside b (not asked of the screen)
    truth = {"a": {1: (True, True), 5: (False, True)},
             "b": {2: (False, True), 3: (True, True), 4: (True, True), 6: (False, False), 7: (True, False)}}
    s = cell_scores(cells, truth)
    assert sorted(np.nan_to_num(s.infected, nan=-1).tolist()) == [-1, 0.7, 0.9]
    assert sorted(s.healthy.tolist()) == [0.1, 0.8] and s.spurious.tolist() == [0.4] and s.healthy_cells == 2
    with pytest.raises(UserError, match="no ground truth"):
        cell_scores(cells, {"a": truth["a"]})


def test_cli_calibrates_the_chain_on_a_validation_sample(sample_dir, models_dir, tmp_path, capsys):
    from cellavie_hpc.cli import main
    from cellavie_hpc.screen.models_dir import load_spec

    models = tmp_path / "models"
    shutil.copytree(models_dir, models)
    out = tmp_path / "calib"
    code = main(["screen", str(sample_dir), "--models", str(models), "--out", str(out), "--calibrate",
                 "--tile", "256", "--overlays", "none", "--quiet"])
    assert code == 0, capsys.readouterr().err
    choice = json.loads((out / "calibration.json").read_text())
    spec = load_spec(models)
    assert spec.infected_threshold == pytest.approx(choice["threshold"])
    assert spec.provenance["calibration"]["tp"] == choice["tp"] > 0
    cells = pd.read_parquet(out / "cells.parquet")
    kept = cells[(cells["true_cell"] > 0)].groupby(["image", "true_cell"])["p_infected"].max()
    # every infected cell that was detected scores at or above the stored threshold
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert choice["tp"] + choice["fn"] == evaluation["counts"]["infected"]
    assert choice["fn"] == evaluation["counts"]["infected"] - sum(
        1 for (image, cell), p in kept.items() if p >= choice["threshold"] and cell in _infected(sample_dir, image))
    assert (out / "calibration.png").stat().st_size > 10_000 and len(pd.read_csv(out / "calibration.csv")) > 10
    assert "infected threshold" in capsys.readouterr().out


def _infected(sample_dir, image):
    from cellavie_hpc.data.dataset import open_dataset

    ds = open_dataset(sample_dir)
    index = [info.id for info in ds.images].index(image)
    return {c["id"] for c in ds.cells(index) if c["infected"] and 0 <= c["cy"] < 512 and 0 <= c["cx"] < 512}
