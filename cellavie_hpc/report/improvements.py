"""Improvements measured on/off: each variant of a sweep against the baseline of the same back-end and axes.

A sweep's `variant` axis (`launch.sweep`) runs named sets of improvement switches (fp16 allreduce,
gradient accumulation, per-tensor exchange, staging, ...) next to `baseline` with every other axis equal,
interleaved repeat by repeat. Per back-end, variant and world size this module gives

    ratio = median(throughput of the variant's repeats) / median(throughput of the baseline's repeats)

with a bootstrap confidence interval (each side's repeats resampled independently, ratio of the
resampled medians, percentiles). A ratio is *resolved* when its interval excludes 1. A variant whose
baseline has no completed run gets no ratio and a note saying so, never a ratio against something else.

`projected_improvements` does the same with the calibrated step-time model of each (back-end, variant)
series (`report.calibration`): projected figures, in their own table, never mixed with measured ones.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cellavie_hpc.report.calibration import SeriesCalibration
from cellavie_hpc.report.stats import bootstrap

BASELINE = "baseline"
CONFIDENCE = 0.95
CI_RESAMPLES = 2000
#: World sizes of the projected-improvement table (the full projection table has every power of two).
PROJECTED_GPUS = (1, 8, 64, 512)
#: Point fields that number or name a run, or follow from the others: not part of what a variant is compared at.
_NOT_AXES = ("point.variant", "point.id", "point.index", "point.repeat", "point.seed", "point.world_size",
             "point.tasks_per_node")
_MATCH = ("model", "backend", "world_size", "nodes")
_SHARES = ("input_wait_share", "compute_share", "exchange_share")


def _variant(value: Any) -> str:
    """A run's variant; none (a sweep point without the axis) is the baseline."""
    return BASELINE if value is None or value == "" or (isinstance(value, float) and np.isnan(value)) else str(value)


def ratio_of_medians(variant: np.ndarray, baseline: np.ndarray, resamples: int = CI_RESAMPLES,
                     confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float, float]:
    """median(variant) / median(baseline) and its bootstrap interval (the two samples resampled independently)."""
    variant, baseline = np.asarray(variant, np.float64), np.asarray(baseline, np.float64)
    ratio = float(np.median(variant) / np.median(baseline))
    top = bootstrap(len(variant), lambda i: np.median(variant[i]), repeats=resamples, seed=seed)
    bottom = bootstrap(len(baseline), lambda i: np.median(baseline[i]), repeats=resamples, seed=seed + 1)
    tail = 50 * (1 - confidence)
    low, high = np.percentile(top / bottom, [tail, 100 - tail])
    return ratio, float(low), float(high)


def _effect(low: float, high: float) -> str:
    if not np.isfinite(low):
        return "no ratio"
    return "faster" if low > 1 else "slower" if high < 1 else "unresolved"


def _setting_label(row: pd.Series, varying: list[str]) -> str:
    return " ".join(f"{c[6:]}={row[c]}" for c in varying if row[c] != "")


def improvements_table(runs: pd.DataFrame, resamples: int = CI_RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """One row per (back-end, axes, variant, world size) of the complete runs of a sweep with variants
    (complete runs only, even with `--include-incomplete`: a partial run's throughput is not a repeat).

    Empty when no run names a variant other than the baseline.
    """
    if runs.empty or "variant" not in runs or "throughput_samples_per_s" not in runs:
        return pd.DataFrame()
    usable = runs[runs["complete"].fillna(False).astype(bool) & runs["throughput_samples_per_s"].notna()].copy()
    usable["variant"] = usable["variant"].map(_variant)
    if usable.empty or (usable["variant"] == BASELINE).all():
        return pd.DataFrame()
    axes = sorted(c for c in usable if c.startswith("point.") and c not in _NOT_AXES)
    keys = [c for c in _MATCH if c in usable] + axes
    usable[keys] = usable[keys].astype(object).where(usable[keys].notna(), "")
    varying = [c for c in axes if usable[c].nunique() > 1 and c[6:] not in ("backend", "model", "nodes",
                                                                             "gpus_per_node")]
    rows = []
    for _, group in usable.groupby(keys, sort=True):
        base = group.loc[group["variant"] == BASELINE, "throughput_samples_per_s"].to_numpy(float)
        first = group.iloc[0]
        for variant, part in group.groupby("variant", sort=False):
            x = part["throughput_samples_per_s"].to_numpy(float)
            row: dict[str, Any] = {
                "source": "measured", "model": first["model"], "backend": first["backend"],
                "setting": _setting_label(first, varying), "variant": variant,
                "gpus": int(first["world_size"]), "nodes": first.get("nodes"), "repeats": len(x),
                "baseline_repeats": len(base), "throughput_samples_per_s": float(np.median(x)),
                "throughput_min": float(x.min()), "throughput_max": float(x.max()),
                **{s: float(part[s].astype(float).median()) if s in part else np.nan for s in _SHARES},
                "time_to_first_step_s": float(part["time_to_first_step_s"].astype(float).median())
                if "time_to_first_step_s" in part else np.nan,
                "ratio": np.nan, "ratio_ci_low": np.nan, "ratio_ci_high": np.nan, "note": "",
            }
            if variant == BASELINE:
                row["ratio"] = 1.0
            elif base.size == 0:
                row["note"] = (f"no completed baseline run of {first['backend']} at {int(first['world_size'])} "
                               "GPU(s) with the same axes: no ratio (run the 'baseline' variant there)")
            else:
                ratio, low, high = ratio_of_medians(x, base, resamples, seed=seed)
                row.update(ratio=ratio, ratio_ci_low=low, ratio_ci_high=high)
                if min(len(x), len(base)) < 2:
                    row["note"] = "one repeat: the interval is a point, not an uncertainty"
            row["effect"] = "reference" if variant == BASELINE else _effect(row["ratio_ci_low"], row["ratio_ci_high"])
            rows.append(row)
    table = pd.DataFrame(rows)
    order = {BASELINE: ""}
    table["_order"] = table["variant"].map(lambda v: order.get(v, v))
    table = table.sort_values(["model", "backend", "setting", "gpus", "_order"]).drop(columns="_order")
    return table.reset_index(drop=True)


def _baseline_of(cal: SeriesCalibration, calibrations: list[SeriesCalibration]) -> SeriesCalibration | None:
    """The baseline series of `cal`: same model, back-end and patch; the same precision and XLA when several."""
    same = [c for c in calibrations if _variant(c.series.get("variant")) == BASELINE
            and all(c.series.get(k) == cal.series.get(k) for k in ("model", "backend", "patch"))]
    exact = [c for c in same if all(c.series.get(k) == cal.series.get(k) for k in ("precision", "xla"))]
    return exact[0] if len(exact) == 1 else same[0] if len(same) == 1 else None


def projected_improvements(calibrations: list[SeriesCalibration], gpus: tuple[int, ...] = PROJECTED_GPUS
                           ) -> pd.DataFrame:
    """Projected throughput of every (back-end, variant) series and its ratio to that back-end's baseline
    series at the same world size, with the 5-95 % band of the paired bootstrap fits (source = projected).

    Each series is projected at its own measured per-GPU batch, so a variant that splits the batch into
    micro-batches (gradient accumulation) is compared at the same samples per update as its baseline."""
    if not any(_variant(c.series.get("variant")) != BASELINE for c in calibrations):
        return pd.DataFrame()
    n = np.asarray(gpus, np.float64)
    rows = []
    for cal in calibrations:
        variant = _variant(cal.series.get("variant"))
        x = cal.throughput(n)
        lo, hi = cal.throughput_band(n)
        base = _baseline_of(cal, calibrations)
        ratio = ratio_lo = ratio_hi = np.full(n.size, np.nan)
        note = ""
        if variant == BASELINE:
            ratio, note = np.ones(n.size), "reference"
        elif base is None:
            note = "no calibrated baseline series of this back-end: no ratio"
        else:
            ratio = x / base.throughput(n)
            pairs = min(len(cal.bootstrap_params), len(base.bootstrap_params))
            if pairs:
                boot = cal.bootstrap_throughputs(n)[:pairs] / base.bootstrap_throughputs(n)[:pairs]
                ratio_lo, ratio_hi = np.percentile(boot, 5, axis=0), np.percentile(boot, 95, axis=0)
        for i, g in enumerate(gpus):
            rows.append({"source": "projected", "series": cal.label, "model": cal.series.get("model"),
                         "backend": cal.series.get("backend"), "variant": variant, "gpus": int(g),
                         "batch_per_gpu": cal.reference_batch_per_gpu, "throughput_samples_per_s": float(x[i]),
                         "throughput_p5": float(lo[i]), "throughput_p95": float(hi[i]),
                         "ratio": float(ratio[i]), "ratio_p5": float(ratio_lo[i]), "ratio_p95": float(ratio_hi[i]),
                         "measured_gpus": ",".join(map(str, cal.measured_gpus)),
                         "extrapolated": bool(g > max(cal.measured_gpus)), "note": note})
    table = pd.DataFrame(rows)
    table["_order"] = table["variant"].map(lambda v: "" if v == BASELINE else v)
    return table.sort_values(["model", "backend", "gpus", "_order"]).drop(columns="_order").reset_index(drop=True)
