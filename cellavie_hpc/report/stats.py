"""Pure statistics on step timings: per-step times, warm-up exclusion, robust summaries, bootstrap."""
from __future__ import annotations

from typing import Callable

import numpy as np

#: A step slower than this many times the median of the rest, at the start of an attempt, is a compile step.
COMPILE_FACTOR = 5.0


def steps_per_record(step: np.ndarray) -> np.ndarray:
    """How many optimiser steps each record covers (1, or `log_every` when records are sparse).

    The first record covers the usual spacing (or `step + 1` when it is the only record).
    """
    step = np.asarray(step, np.int64)
    if step.size == 0:
        return np.zeros(0, np.int64)
    gaps = np.diff(step)
    usual = int(np.median(gaps)) if gaps.size else int(step[0]) + 1
    first = max(1, min(usual, int(step[0]) + 1))
    return np.concatenate([[first], np.clip(gaps, 1, None)]).astype(np.int64)


def measured_mask(step: np.ndarray, attempt: np.ndarray, per_step_s: np.ndarray, warmup_steps: int,
                  factor: float = COMPILE_FACTOR) -> np.ndarray:
    """Which records count as measurement: after `warmup_steps`, and not a compile step.

    A compile step is one of the leading records of an attempt (a fresh process compiles again
    after a requeue) whose time exceeds `factor` times the median of the remaining records.
    """
    step = np.asarray(step)
    keep = step >= warmup_steps
    times = np.asarray(per_step_s, np.float64)
    for a in np.unique(attempt):
        idx = np.flatnonzero(keep & (attempt == a))
        while idx.size > 1:
            rest = times[idx[1:]]
            rest = rest[np.isfinite(rest)]
            if rest.size and times[idx[0]] > factor * np.median(rest):
                keep[idx[0]] = False
                idx = idx[1:]
            else:
                break
    return keep


def quantiles(values: np.ndarray) -> dict[str, float]:
    """Median, 10th and 90th percentile and inter-quartile range of the finite values (NaN if none)."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"median": np.nan, "p10": np.nan, "p90": np.nan, "iqr": np.nan}
    p10, q1, med, q3, p90 = np.percentile(values, [10, 25, 50, 75, 90])
    return {"median": float(med), "p10": float(p10), "p90": float(p90), "iqr": float(q3 - q1)}


def nansum_or_nan(values: np.ndarray) -> float:
    """Sum of finite values; NaN when none is finite (a quantity that was not measurable)."""
    values = np.asarray(values, np.float64)
    finite = np.isfinite(values)
    return float(values[finite].sum()) if finite.any() else float("nan")


def bootstrap(n: int, statistic: Callable[[np.ndarray], np.ndarray], repeats: int = 200,
              seed: int = 0) -> np.ndarray:
    """`statistic(indices)` on `repeats` resamples (with replacement) of `n` items; rows that fail are dropped."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(repeats):
        try:
            rows.append(np.asarray(statistic(rng.integers(0, n, n)), np.float64))
        except (ValueError, np.linalg.LinAlgError):
            continue
    return np.array(rows)
