"""Scaling tables from the points table: speedup, strong- and weak-scaling efficiency, epoch time.

A *weak-scaling* series keeps the per-GPU batch fixed while GPUs are added (the global batch grows);
a *strong-scaling* series keeps the global batch fixed (each GPU gets a smaller share). Both compare
each world size N with the series' smallest one, N0 (1 when a single-GPU point was measured):

    speedup     = X_N / X_N0                      (X: throughput, samples/s)
    efficiency  = X_N / ((N / N0) * X_N0)         strong: T_N0 * N0 / (N * T_N) for the same work;
                                                  weak: per-GPU throughput at N over at N0.

Error bars come from the repeats (min and max throughput at N, against the median at N0).
Every row here is measured (column `source`); projections live in `calibration`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

#: What stays fixed along a scaling series besides the batch that defines weak or strong scaling
#: (`variant`: the sweep's named set of improvement switches, none outside a variant study).
SERIES_KEYS = ("model", "backend", "precision", "xla", "patch", "variant")
SCALING_BATCH = {"weak": "batch_per_gpu", "strong": "global_batch"}


def series_label(row: pd.Series | dict, keys: tuple[str, ...] = SERIES_KEYS) -> str:
    """Short human label of a series: `unet horovod fp32 xla p128`."""
    parts = []
    for key in keys:
        value = row.get(key)
        if value is None or (isinstance(value, float) and np.isnan(value)) or value == "":
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if key == "xla":
            parts.append("xla" if str(value).lower() in ("true", "1") else "no-xla")
        elif key == "patch":
            parts.append(f"p{value}")
        else:
            parts.append(str(value))
    return " ".join(parts)


def _present(points: pd.DataFrame, keys: tuple[str, ...]) -> list[str]:
    return [k for k in keys if k in points]


def scaling_table(points: pd.DataFrame) -> pd.DataFrame:
    """Rows per (scaling kind, series, world size) for every series measured at two or more world sizes."""
    if points.empty or "world_size" not in points:
        return pd.DataFrame()
    rows = []
    for kind, batch_key in SCALING_BATCH.items():
        keys = _present(points, SERIES_KEYS + (batch_key,))
        frame = points.copy()
        frame[keys] = frame[keys].astype(object).where(frame[keys].notna(), "")
        for key_values, series in frame.groupby(keys, sort=True, dropna=False):
            by_n = series.groupby("world_size").agg(
                throughput=("throughput_samples_per_s", "median"), throughput_min=("throughput_min", "min"),
                throughput_max=("throughput_max", "max"), repeats=("repeats", "sum"),
                samples_per_epoch=("samples_per_epoch", "max"), nodes=("nodes", "max"),
                batch_per_gpu=("batch_per_gpu", "median"), global_batch=("global_batch", "median"),
            ).reset_index().sort_values("world_size")
            if len(by_n) < 2:
                continue
            n0 = float(by_n["world_size"].iloc[0])
            x0 = float(by_n["throughput"].iloc[0])
            ideal = by_n["world_size"] / n0
            out = pd.DataFrame({
                "source": "measured", "scaling": kind, **dict(zip(keys, [v if v != "" else None for v in key_values])),
                "gpus": by_n["world_size"].astype(int), "nodes": by_n["nodes"],
                "batch_per_gpu": by_n["batch_per_gpu"], "global_batch": by_n["global_batch"],
                "repeats": by_n["repeats"].astype(int), "baseline_gpus": int(n0),
                "throughput_samples_per_s": by_n["throughput"], "throughput_min": by_n["throughput_min"],
                "throughput_max": by_n["throughput_max"],
                "throughput_per_gpu": by_n["throughput"] / by_n["world_size"],
                "speedup": by_n["throughput"] / x0, "speedup_min": by_n["throughput_min"] / x0,
                "speedup_max": by_n["throughput_max"] / x0, "ideal_speedup": ideal,
                "efficiency": by_n["throughput"] / (ideal * x0),
                "efficiency_min": by_n["throughput_min"] / (ideal * x0),
                "efficiency_max": by_n["throughput_max"] / (ideal * x0),
                "epoch_time_s": pd.to_numeric(by_n["samples_per_epoch"], errors="coerce") / by_n["throughput"],
            })
            batch = out[batch_key].iloc[0]
            out["series"] = series_label(out.iloc[0]) + (f" b{batch:g}/GPU" if kind == "weak" else f" B{batch:g}")
            rows.append(out)
    if not rows:
        return pd.DataFrame()
    return pd.concat(rows, ignore_index=True)
