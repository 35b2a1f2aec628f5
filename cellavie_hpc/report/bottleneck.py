"""Where each run's step time goes (input wait, compute, gradient exchange), its stragglers and memory."""
from __future__ import annotations

import pandas as pd

#: A rank whose busy time (input wait + compute) exceeds the run's median rank by this factor is a straggler.
STRAGGLER_FACTOR = 1.10
GIB = float(1 << 30)


def stragglers(ranks: pd.DataFrame, factor: float = STRAGGLER_FACTOR) -> dict[str, str]:
    """Per run directory, the ranks slower than `factor` x the median rank (comma-separated, slowest first)."""
    out: dict[str, str] = {}
    if ranks.empty or "busy_s" not in ranks:
        return out
    for run_dir, group in ranks.groupby("run_dir"):
        busy = group["busy_s"].astype(float)
        median = busy.median()
        slow = group[busy > factor * median].sort_values("busy_s", ascending=False) if median > 0 else group.iloc[:0]
        out[str(run_dir)] = ",".join(str(int(r)) for r in slow["rank"])
    return out


def bottleneck_table(runs: pd.DataFrame, ranks: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per run with a measured step time: shares of step time, stragglers, peak memory per GPU."""
    if runs.empty or "step_time_median_s" not in runs:
        return pd.DataFrame()
    measured = runs[runs["step_time_median_s"].notna()].copy()
    shares = measured[["input_wait_share", "compute_share", "exchange_share"]].astype(float)
    table = pd.DataFrame({
        "source": "measured", "run_id": measured["run_id"], "run_dir": measured["run_dir"],
        "model": measured["model"], "backend": measured["backend"], "gpus": measured["world_size"].astype(int),
        "batch_per_gpu": measured["batch_per_gpu"], "status": measured["status"],
        "step_time_median_s": measured["step_time_median_s"], "step_time_iqr_s": measured["step_time_iqr_s"],
        "input_wait_share": shares["input_wait_share"], "compute_share": shares["compute_share"],
        "exchange_share": shares["exchange_share"],
        "other_share": (1.0 - shares.fillna(0.0).sum(axis=1)).clip(lower=0.0),
        "straggler_rank": measured["straggler_rank"], "straggler_ratio": measured["straggler_ratio"],
        "mem_peak_gib": measured["mem_peak_bytes_max"].astype(float) / GIB,
        "mem_source": measured.get("mem_source"),
    })
    slow = stragglers(ranks) if ranks is not None else {}
    table["stragglers"] = [slow.get(str(d), "") for d in table["run_dir"]]
    return table.sort_values(["model", "backend", "gpus", "batch_per_gpu", "run_id"]).reset_index(drop=True)

