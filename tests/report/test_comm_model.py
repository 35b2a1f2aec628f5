"""Alpha-beta allreduce model: formulas, recovery of known latency/bandwidth from noisy timings, fits file, calibration hook."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cellavie_hpc.errors import DataError, UserError
from cellavie_hpc.report import calibration as cal
from cellavie_hpc.report import comm_model as cm

ALPHA_S = 20e-6
INV_BW = 1 / 5e9  # 5 GB/s
SIZES = 4096 * 4 ** np.arange(8)  # 4 KB .. 64 MB


def synthetic(algorithm="ring", noise=0.03, outliers=0.05, worlds=(2, 4, 8), repeats=15, seed=3):
    """Timed calls drawn from the model: multiplicative noise plus a few 3x slow calls (OS jitter)."""
    rng = np.random.default_rng(seed)
    n, p = np.meshgrid(SIZES, worlds, indexing="ij")
    n, p = np.repeat(n.ravel(), repeats), np.repeat(p.ravel(), repeats)
    t = cm.allreduce_time_s(n, p, ALPHA_S, INV_BW, algorithm) * np.exp(noise * rng.standard_normal(n.size))
    t[rng.random(n.size) < outliers] *= 3
    return n, p, t


def test_formulas():
    assert cm.allreduce_time_s(1e6, 4, 1e-5, 1e-9) == pytest.approx(6e-5 + 1.5e-3)
    assert cm.allreduce_time_s(1e6, 4, 1e-5, 1e-9, "tree") == pytest.approx(4 * (1e-5 + 1e-3))
    assert cm.allreduce_time_s(1e6, 5, 1e-5, 1e-9, "tree") == pytest.approx(6 * (1e-5 + 1e-3))  # ceil(log2 5) = 3
    np.testing.assert_allclose(cm.allreduce_time_s([0, 1e6], [2, 1], 1e-5, 1e-9), [2e-5, 0.0])
    assert cm.allreduce_time_s(np.ones((3, 2)), 2, 1.0, 0.0).shape == (3, 2)
    with pytest.raises(UserError, match="ring, tree"):
        cm.allreduce_time_s(1, 2, 1.0, 1.0, "butterfly")
    with pytest.raises(UserError, match="world size"):
        cm.allreduce_time_s(1, 0, 1.0, 1.0)


@pytest.mark.parametrize("algorithm", cm.ALGORITHMS)
def test_fit_recovers_latency_and_bandwidth(algorithm):
    n, p, t = synthetic(algorithm)
    fit = cm.fit_alpha_beta(n, p, t, engine="synthetic", algorithm=algorithm, repeats=100)
    # 3% noise and 5% of 3x outliers over 360 calls: alpha within 10%, bandwidth within 3%.
    assert fit.alpha_s == pytest.approx(ALPHA_S, rel=0.10)
    assert fit.bandwidth_bytes_per_s == pytest.approx(1 / INV_BW, rel=0.03)
    assert 0 < fit.alpha_std_s < 0.1 * ALPHA_S and 0 < fit.inv_bandwidth_std_s_per_byte < 0.03 * INV_BW
    assert fit.bandwidth_p5_bytes_per_s < 1 / INV_BW * 1.03 and fit.bandwidth_p95_bytes_per_s > 1 / INV_BW * 0.97
    assert fit.rms_rel_error < 0.05 and fit.points == n.size and fit.world_sizes == (2, 4, 8)
    assert float(fit.predict(64e6, 16)) == pytest.approx(cm.allreduce_time_s(64e6, 16, ALPHA_S, INV_BW, algorithm), rel=0.05)


def test_outliers_do_not_drag_the_robust_fit():
    n, p, t = synthetic(outliers=0.15, noise=0.01)
    fit = cm.fit_alpha_beta(n, p, t, repeats=20)
    plain, *_ = np.linalg.lstsq(cm.design(n, p) / t[:, None], np.ones_like(t), rcond=None)
    assert abs(fit.alpha_s / ALPHA_S - 1) < 0.05 < abs(plain[0] / ALPHA_S - 1)


def test_fit_needs_two_sizes_on_several_ranks():
    with pytest.raises(UserError, match="two message sizes"):
        cm.fit_alpha_beta([4096, 4096], [2, 4], [1e-5, 2e-5])
    with pytest.raises(UserError, match="two message sizes"):
        cm.fit_alpha_beta([4096, 8192], [1, 1], [1e-5, 2e-5])


def test_fits_file_round_trip_and_errors(tmp_path):
    n, p, t = synthetic(repeats=3)
    fits = [cm.fit_alpha_beta(n, p, t, engine=e, repeats=10, model="unet", gradient_bytes=3.1e7) for e in ("a/x", "b/y")]
    path = cm.write_comm_fits(fits, tmp_path / "comm_fits.json", {"cpu": "test"})
    assert cm.load_comm_fit(path, "b/y") == fits[1]
    with pytest.raises(UserError, match="a/x, b/y"):
        cm.load_comm_fit(path)
    (tmp_path / "other.json").write_text(json.dumps({"kind": "calibration"}))
    with pytest.raises(DataError, match="other.json"):
        cm.load_comm_fit(tmp_path / "other.json")


TRUE_STEP = np.array([0.010, 0.004])  # t0 s, c s/sample


def _points(model="unet", gradient_bytes=3.1e7):
    rows = []
    for n in (1, 2, 4, 8):
        for b in (8, 16, 32):
            t = TRUE_STEP[0] + TRUE_STEP[1] * b + cm.allreduce_time_s(gradient_bytes, n, ALPHA_S, INV_BW)
            rows.append({"model": model, "backend": "horovod", "precision": "fp32", "xla": False, "patch": 128,
                         "world_size": n, "batch_per_gpu": b, "throughput_samples_per_s": n * b / t})
    return pd.DataFrame(rows)


def test_calibration_uses_measured_exchange():
    comm = cm.CommFit(engine="horovod/gloo", algorithm="ring", alpha_s=ALPHA_S, inv_bandwidth_s_per_byte=INV_BW,
                      alpha_std_s=1e-6, inv_bandwidth_std_s_per_byte=1e-12, bandwidth_p5_bytes_per_s=4e9,
                      bandwidth_p95_bytes_per_s=6e9, points=10, world_sizes=(2,), rms_rel_error=0.01,
                      max_rel_error=0.02, model="unet", gradient_bytes=3.1e7)
    points = pd.concat([_points("unet"), _points("detector")])
    by_model = {c.series["model"]: c for c in cal.calibrate(points, repeats=20, comm=comm)}
    unet, detector = by_model["unet"], by_model["detector"]
    assert unet.exchange_source == "measured: horovod/gloo" and detector.exchange_source == "fitted"
    assert unet.params["alpha_s"] == ALPHA_S and unet.params["gamma_s"] == pytest.approx(INV_BW * 3.1e7)
    assert unet.params["t0_s"] == pytest.approx(TRUE_STEP[0], rel=1e-6)
    assert unet.params["compute_s_per_sample"] == pytest.approx(TRUE_STEP[1], rel=1e-6)
    assert unet.params_std["alpha_s"] == 1e-6 and unet.fit_rms_rel_error < 1e-9
    with pytest.raises(UserError, match="ring fit"):
        cal.calibrate(points, repeats=5, comm=cm.CommFit(**{**comm.__dict__, "algorithm": "tree"}))
