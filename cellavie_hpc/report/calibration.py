"""Resource calibration: a step-time model fitted to measured points, projections, and `plan` answers.

Model of one synchronous data-parallel step on N GPUs with b samples per GPU:

    T(N, b) = t0 + c * b + alpha * 2(N-1) + gamma * 2(N-1)/N

t0 a fixed per-step overhead, c the compute time per sample (from the single-GPU points), and
the last two terms a ring all-reduce of the gradients (2(N-1) latency hops of alpha seconds, and
2(N-1)/N of the gradient bytes at a bandwidth of 1/beta: gamma = beta * gradient bytes, seconds).
Non-negative weighted least squares (relative error) over every measured point of a series;
uncertainty from a bootstrap over points; a held-out check fits without the largest world size
and predicts it. Measured and projected figures stay in separate tables (column `source`).

With a measured allreduce fit (`report.comm_model.CommFit`, ring, from `benchmarks/allreduce.py`) the
exchange is not fitted: alpha is the measured hop latency and gamma = beta x the fit's gradient bytes,
and only t0 and c are fitted (`comm=` of `calibrate`).
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cellavie_hpc.errors import UserError
from cellavie_hpc.report.efficiency import SERIES_KEYS, series_label
from cellavie_hpc.report.stats import bootstrap

if TYPE_CHECKING:
    from cellavie_hpc.report.comm_model import CommFit

PARAMS = ("t0_s", "compute_s_per_sample", "alpha_s", "gamma_s")
PROJECTION_GPUS = tuple(2 ** k for k in range(10))  # 1 .. 512
MAX_PLAN_GPUS = 4096


def design(world_size: np.ndarray, batch_per_gpu: np.ndarray) -> np.ndarray:
    """Columns of the model for each point: [1, b, 2(N-1), 2(N-1)/N]."""
    n = np.asarray(world_size, np.float64)
    b = np.asarray(batch_per_gpu, np.float64)
    return np.column_stack([np.ones_like(n), b, 2 * (n - 1), 2 * (n - 1) / n])


def nnls_small(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact non-negative least squares for a handful of columns: best non-negative subset solution.

    Among equally good fits the one with fewer non-zero parameters wins (an unidentifiable term stays 0).
    """
    best, best_res = np.zeros(a.shape[1]), float(np.sum(y ** 2))
    for k in range(1, a.shape[1] + 1):
        for cols in itertools.combinations(range(a.shape[1]), k):
            coef, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
            if np.any(coef < 0):
                continue
            res = float(np.sum((a[:, cols] @ coef - y) ** 2))
            if res < best_res * (1 - 1e-9) - 1e-30:
                best, best_res = np.zeros(a.shape[1]), res
                best[list(cols)] = coef
    return best


def measured_exchange(comm: CommFit) -> np.ndarray:
    """(alpha, gamma) from a measured ring allreduce fit of the full gradient."""
    if comm.algorithm != "ring" or not comm.gradient_bytes:
        raise UserError(f"comm fit {comm.engine!r}: the step-time model needs a ring fit with gradient_bytes, "
                        f"got algorithm {comm.algorithm!r}, gradient_bytes {comm.gradient_bytes!r}")
    return np.array([comm.alpha_s, comm.inv_bandwidth_s_per_byte * comm.gradient_bytes])


def fit_step_time(world_size: np.ndarray, batch_per_gpu: np.ndarray, step_time_s: np.ndarray,
                  comm: CommFit | None = None) -> np.ndarray:
    """Parameters (t0, c, alpha, gamma) minimising the relative error of the modelled step time.

    With `comm`, alpha and gamma are the measured ones and only t0 and c are fitted.
    """
    t = np.asarray(step_time_s, np.float64)
    a = design(world_size, batch_per_gpu) / t[:, None]
    if comm is None:
        return nnls_small(a, np.ones_like(t))
    exchange = measured_exchange(comm)
    return np.concatenate([nnls_small(a[:, :2], 1 - a[:, 2:] @ exchange), exchange])


def predict_step_time(params: np.ndarray, world_size: Any, batch_per_gpu: Any) -> np.ndarray:
    return design(np.atleast_1d(world_size), np.atleast_1d(batch_per_gpu)) @ np.asarray(params, np.float64)


@dataclass
class SeriesCalibration:
    """The fitted model of one series (model, back-end, precision, XLA, patch) and its checks."""

    series: dict[str, Any]
    label: str
    params: dict[str, float]
    params_std: dict[str, float]
    points: int
    measured_gpus: list[int]
    reference_batch_per_gpu: float
    fit_rms_rel_error: float
    heldout: list[dict[str, float]] = field(default_factory=list)
    heldout_note: str = ""
    samples_per_epoch: float | None = None
    samples_per_image: float | None = None
    gpus_per_node: int = 1
    bootstrap_params: list[list[float]] = field(default_factory=list)
    exchange_source: str = "fitted"

    def vector(self) -> np.ndarray:
        return np.array([self.params[p] for p in PARAMS])

    def throughput(self, gpus: Any, batch_per_gpu: float | None = None) -> np.ndarray:
        """Projected samples/s at `gpus` (per-GPU batch: the measured reference unless given)."""
        b = self.reference_batch_per_gpu if batch_per_gpu is None else batch_per_gpu
        n = np.atleast_1d(np.asarray(gpus, np.float64))
        return n * b / predict_step_time(self.vector(), n, np.full_like(n, b))

    def bootstrap_throughputs(self, gpus: Any, batch_per_gpu: float | None = None) -> np.ndarray:
        """Projected samples/s at `gpus` of every bootstrap fit: (fits, len(gpus)); (0, len(gpus)) without fits."""
        b = self.reference_batch_per_gpu if batch_per_gpu is None else batch_per_gpu
        n = np.atleast_1d(np.asarray(gpus, np.float64))
        return np.array([n * b / predict_step_time(p, n, np.full_like(n, b)) for p in self.bootstrap_params]
                        ).reshape(-1, n.size)

    def throughput_band(self, gpus: Any, batch_per_gpu: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """5th and 95th percentile of projected throughput over the bootstrap fits."""
        if not self.bootstrap_params:
            x = self.throughput(gpus, batch_per_gpu)
            return x, x
        rows = self.bootstrap_throughputs(gpus, batch_per_gpu)
        return np.percentile(rows, 5, axis=0), np.percentile(rows, 95, axis=0)


def _measured(points: pd.DataFrame) -> pd.DataFrame:
    frame = points[points["throughput_samples_per_s"].astype(float) > 0].copy()
    frame["step_time_s"] = frame["world_size"].astype(float) * frame["batch_per_gpu"].astype(float) / \
        frame["throughput_samples_per_s"].astype(float)
    return frame


def calibrate_series(series: pd.DataFrame, keys: dict[str, Any], repeats: int = 200,
                     seed: int = 0, comm: CommFit | None = None) -> SeriesCalibration:
    """Fit one series' measured points; bootstrap; held-out check at the largest world size.

    With `comm` the exchange term is the measured allreduce (its uncertainty is the comm fit's).
    """
    frame = _measured(series)
    n, b, t = (frame[c].to_numpy(float) for c in ("world_size", "batch_per_gpu", "step_time_s"))
    params = fit_step_time(n, b, t, comm)
    rel = predict_step_time(params, n, b) / t - 1
    boot = bootstrap(len(t), lambda idx: fit_step_time(n[idx], b[idx], t[idx], comm), repeats=repeats, seed=seed)
    heldout, note = [], ""
    multi = sorted(set(n[n > 1]))
    if len(multi) >= 2:
        train = n < multi[-1]
        p_train = fit_step_time(n[train], b[train], t[train], comm)
        for i in np.flatnonzero(~train):
            predicted = float(predict_step_time(p_train, n[i], b[i])[0])
            heldout.append({"gpus": int(n[i]), "batch_per_gpu": float(b[i]), "measured_step_time_s": float(t[i]),
                            "predicted_step_time_s": predicted, "rel_error": predicted / t[i] - 1})
    else:
        note = "fewer than two multi-GPU world sizes: no held-out check (and the exchange term is weakly constrained)"
    spe = pd.to_numeric(frame.get("samples_per_epoch"), errors="coerce").max() if "samples_per_epoch" in frame else np.nan
    ipe = pd.to_numeric(frame.get("images_per_epoch"), errors="coerce").max() if "images_per_epoch" in frame else np.nan
    gpn = pd.to_numeric(frame.get("gpus_per_node"), errors="coerce").max() if "gpus_per_node" in frame else np.nan
    ref_b = float(pd.Series(b).mode().max())
    std = boot.std(axis=0) if len(boot) else np.full(4, np.nan)
    if comm is not None:
        std[2:] = [comm.alpha_std_s, comm.inv_bandwidth_std_s_per_byte * comm.gradient_bytes]
    return SeriesCalibration(
        series=keys, label=series_label(keys), params=dict(zip(PARAMS, map(float, params))),
        params_std=dict(zip(PARAMS, map(float, std))),
        points=int(len(t)), measured_gpus=sorted(int(x) for x in set(n)), reference_batch_per_gpu=ref_b,
        fit_rms_rel_error=float(np.sqrt(np.mean(rel ** 2))), heldout=heldout, heldout_note=note,
        samples_per_epoch=float(spe) if np.isfinite(spe) else None,
        samples_per_image=float(spe / ipe) if np.isfinite(spe) and np.isfinite(ipe) and ipe > 0 else None,
        gpus_per_node=int(gpn) if np.isfinite(gpn) and gpn >= 1 else 1,
        bootstrap_params=[list(map(float, row)) for row in boot],
        exchange_source=f"measured: {comm.engine}" if comm is not None else "fitted",
    )


def calibrate(points: pd.DataFrame, repeats: int = 200, seed: int = 0,
              comm: CommFit | None = None) -> list[SeriesCalibration]:
    """One calibration per series with a single-GPU point or at least three measured points.

    `comm` (a measured allreduce fit) applies to the series of its model (all series if it names none).
    """
    if points.empty:
        return []
    keys = [k for k in SERIES_KEYS if k in points]
    frame = points.copy()
    frame[keys] = frame[keys].astype(object).where(frame[keys].notna(), "")
    out = []
    for values, series in frame.groupby(keys, sort=True):
        if not ((series["world_size"] == 1).any() or len(series) >= 3):
            continue
        values = values if isinstance(values, tuple) else (values,)
        series_keys = {k: (v if v != "" else None) for k, v in zip(keys, values)}
        use = comm if comm is not None and comm.model in (None, series_keys.get("model")) else None
        out.append(calibrate_series(series, series_keys, repeats=repeats, seed=seed, comm=use))
    return out


def projection_table(calibrations: list[SeriesCalibration], gpus: tuple[int, ...] = PROJECTION_GPUS) -> pd.DataFrame:
    """Projected throughput, speedup, efficiency and epoch time to 512 GPUs (source = projected)."""
    rows = []
    for cal in calibrations:
        n = np.asarray(gpus, np.float64)
        x = cal.throughput(n)
        lo, hi = cal.throughput_band(n)
        x1 = float(cal.throughput(1)[0])
        for i, g in enumerate(gpus):
            rows.append({"source": "projected", "series": cal.label, **cal.series, "gpus": int(g),
                         "batch_per_gpu": cal.reference_batch_per_gpu, "throughput_samples_per_s": float(x[i]),
                         "throughput_p5": float(lo[i]), "throughput_p95": float(hi[i]),
                         "speedup": float(x[i] / x1), "efficiency": float(x[i] / (g * x1)),
                         "epoch_time_s": (cal.samples_per_epoch / float(x[i])) if cal.samples_per_epoch else np.nan,
                         "extrapolated": bool(g > max(cal.measured_gpus))})
    return pd.DataFrame(rows)


def write_calibration(calibrations: list[SeriesCalibration], path: str | Path) -> Path:
    path = Path(path)
    payload = {"model": "T(N,b) = t0 + c*b + alpha*2(N-1) + gamma*2(N-1)/N  (seconds per step)",
               "series": [{k: v for k, v in asdict(c).items() if k != "bootstrap_params"} |
                          {"bootstrap_params": c.bootstrap_params} for c in calibrations]}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(s|sec|m|min|h|hr|d)?\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}


def parse_duration_s(text: str) -> float:
    """`90m`, `2h`, `1.5d`, `3600` (seconds) -> seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise UserError(f"deadline {text!r}: expected a number with an optional unit s, m, h or d (e.g. 2h, 90m)")
    return float(match.group(1)) * _UNIT_S[(match.group(2) or "s").lower()]


def candidate_gpus(gpus_per_node: int, limit: int = MAX_PLAN_GPUS) -> list[int]:
    """World sizes a job can ask for: 1..G on one node, then whole nodes of G GPUs."""
    g = max(1, gpus_per_node)
    return list(range(1, g + 1)) + list(range(2 * g, limit + 1, g))


@dataclass
class PlanAnswer:
    series: str
    samples: float
    epochs: float
    deadline_s: float | None
    gpus: int | None
    time_s: float
    time_p5_s: float
    time_p95_s: float
    extrapolated: bool
    feasible: bool
    measured_gpus: list[int]

    def text(self) -> str:
        hours = self.time_s / 3600
        low, high = sorted((self.time_p5_s / 3600, self.time_p95_s / 3600))
        band = f"({low:.2f}-{high:.2f} h, bootstrap 90% band)"
        where = "beyond the measured range" if self.extrapolated else "within the measured range"
        head = f"{self.series}: {self.samples:,.0f} samples x {self.epochs:g} epoch(s)"
        if self.deadline_s is None:
            return f"{head} on {self.gpus} GPU(s): {hours:.2f} h {band} [projected, {where}]"
        if not self.feasible:
            return (f"{head}: no world size up to {MAX_PLAN_GPUS} GPUs meets {self.deadline_s / 3600:.2f} h; "
                    f"fastest is {self.gpus} GPU(s) at {hours:.2f} h {band} [projected]")
        return (f"{head} within {self.deadline_s / 3600:.2f} h: {self.gpus} GPU(s), {hours:.2f} h {band} "
                f"[projected, {where}; measured GPUs: {self.measured_gpus}]")


def plan(cal: SeriesCalibration, samples: float, epochs: float = 1.0, deadline_s: float | None = None,
         gpus: int | None = None) -> PlanAnswer:
    """Fewest GPUs that train `epochs` x `samples` within `deadline_s`, or the time on `gpus` GPUs."""
    if samples <= 0 or epochs <= 0:
        raise UserError("the number of images/tiles and of epochs must be positive")
    candidates = np.array([gpus] if gpus else candidate_gpus(cal.gpus_per_node), np.float64)
    work = samples * epochs
    times = work / cal.throughput(candidates)
    lo, hi = cal.throughput_band(candidates)
    if gpus or deadline_s is None:
        i, feasible = (0 if gpus else int(np.argmin(times))), True
    else:
        ok = np.flatnonzero(times <= deadline_s)
        feasible = ok.size > 0
        i = int(ok[0]) if feasible else int(np.argmin(times))
    n = int(candidates[i])
    return PlanAnswer(series=cal.label, samples=samples, epochs=epochs, deadline_s=deadline_s, gpus=n,
                      time_s=float(times[i]), time_p5_s=float(work / hi[i]), time_p95_s=float(work / lo[i]),
                      extrapolated=n > max(cal.measured_gpus), feasible=feasible, measured_gpus=cal.measured_gpus)


def select(calibrations: list[SeriesCalibration], **wanted: Any) -> SeriesCalibration:
    """The one calibration matching `wanted` (model=..., backend=...), or a UserError listing the choices."""
    wanted = {k: v for k, v in wanted.items() if v is not None}
    matches = [c for c in calibrations if all(str(c.series.get(k)) == str(v) for k, v in wanted.items())]
    if len(matches) == 1:
        return matches[0]
    choices = "; ".join(c.label for c in calibrations) or "none (no series with a single-GPU point or 3 points)"
    if not matches:
        raise UserError(f"no calibrated series matches {wanted or 'the request'}; available: {choices}")
    raise UserError(f"{len(matches)} calibrated series match {wanted or 'the request'}; choose one with "
                    f"--model/--backend/--precision/--variant: {choices}")

