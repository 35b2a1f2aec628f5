"""Calibration: on timings drawn from a known model with noise, the fit recovers it and predicts well."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellavie_hpc.errors import UserError
from cellavie_hpc.report import calibration as cal

TRUE = np.array([0.010, 0.004, 0.0005, 0.030])  # t0 s, c s/sample, alpha s, gamma s


def synthetic_points(noise=0.02, seed=1, gpus=(1, 2, 4, 8, 16, 32), batches=(8, 16, 32), repeats=3):
    rng = np.random.default_rng(seed)
    rows = []
    for n in gpus:
        for b in batches:
            for _ in range(repeats):
                t = cal.predict_step_time(TRUE, n, b)[0] * (1 + noise * rng.standard_normal())
                rows.append({"model": "unet", "backend": "horovod", "precision": "fp32", "xla": False, "patch": 128,
                             "world_size": n, "batch_per_gpu": b, "throughput_samples_per_s": n * b / t,
                             "samples_per_epoch": 12800, "images_per_epoch": 100, "gpus_per_node": 4})
    return pd.DataFrame(rows)


def test_fit_recovers_parameters_and_held_out_point():
    (c,) = cal.calibrate(synthetic_points(), repeats=100)
    # 2% noise on 54 points: parameters within 10% (gamma, alpha) and 5% (c); fit error near the noise.
    assert c.params["compute_s_per_sample"] == pytest.approx(TRUE[1], rel=0.05)
    assert c.params["gamma_s"] == pytest.approx(TRUE[3], rel=0.10)
    assert c.params["alpha_s"] == pytest.approx(TRUE[2], rel=0.10)
    assert c.params["t0_s"] == pytest.approx(TRUE[0], rel=0.15)
    assert 0.01 < c.fit_rms_rel_error < 0.03
    assert all(v > 0 for v in c.params_std.values())
    assert [h["gpus"] for h in c.heldout] == [32] * 9  # fitted without 32 GPUs, then predicted
    assert max(abs(h["rel_error"]) for h in c.heldout) < 0.06
    assert c.samples_per_image == 128.0 and c.gpus_per_node == 4 and c.measured_gpus == [1, 2, 4, 8, 16, 32]
    x = c.throughput([64, 512], 16)
    true_x = np.array([64, 512]) * 16 / cal.predict_step_time(TRUE, [64, 512], [16, 16])
    np.testing.assert_allclose(x, true_x, rtol=0.05)
    lo, hi = c.throughput_band([512], 16)
    assert lo[0] <= x[1] <= hi[0] and hi[0] / lo[0] < 1.1  # bootstrap band around the 512-GPU projection


def test_exact_data_and_unidentifiable_terms():
    points = synthetic_points(noise=0.0, gpus=(1,), repeats=1)
    (c,) = cal.calibrate(points, repeats=10)
    assert c.params["alpha_s"] == 0 and c.params["gamma_s"] == 0  # no multi-GPU point: no exchange term
    assert c.params["compute_s_per_sample"] == pytest.approx(TRUE[1]) and c.fit_rms_rel_error < 1e-9
    assert "no held-out check" in c.heldout_note


def test_projection_table_and_plan():
    (c,) = cal.calibrate(synthetic_points(noise=0.0), repeats=20)
    proj = cal.projection_table([c])
    assert proj["gpus"].tolist() == [2 ** k for k in range(10)] and (proj["source"] == "projected").all()
    assert proj.set_index("gpus").loc[64, "extrapolated"] and not proj.set_index("gpus").loc[32, "extrapolated"]
    x1 = c.throughput(1)[0]
    assert proj["efficiency"].iloc[3] == pytest.approx(c.throughput(8)[0] / (8 * x1))

    samples, epochs, deadline = 1_000_000, 10, 3600.0
    answer = cal.plan(c, samples, epochs, deadline)
    assert answer.feasible and answer.time_s <= deadline
    previous = cal.candidate_gpus(4)[cal.candidate_gpus(4).index(answer.gpus) - 1]
    assert samples * epochs / c.throughput(previous)[0] > deadline  # the fewest GPUs that make it
    on16 = cal.plan(c, samples, 1, gpus=16)
    assert on16.time_s == pytest.approx(samples / c.throughput(16)[0]) and "16 GPU(s)" in on16.text()
    impossible = cal.plan(c, 1e12, 1, 60.0)
    assert not impossible.feasible and "no world size" in impossible.text()


def test_durations_candidates_and_selection():
    assert cal.parse_duration_s("2h") == 7200 and cal.parse_duration_s("90m") == 5400
    assert cal.parse_duration_s("1.5d") == 129600 and cal.parse_duration_s("45") == 45
    with pytest.raises(UserError, match="deadline 'soon'"):
        cal.parse_duration_s("soon")
    assert cal.candidate_gpus(4, 16) == [1, 2, 3, 4, 8, 12, 16]
    cals = cal.calibrate(pd.concat([synthetic_points(gpus=(1, 2)), synthetic_points(gpus=(1, 2)).assign(model="yolo")]),
                         repeats=5)
    assert cal.select(cals, model="yolo").series["model"] == "yolo"
    with pytest.raises(UserError, match="2 calibrated series match"):
        cal.select(cals)
    with pytest.raises(UserError, match="no calibrated series matches"):
        cal.select(cals, backend="mirrored")
