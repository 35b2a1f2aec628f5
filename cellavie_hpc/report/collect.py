"""Collect the per-rank records of runs into tidy tables: one row per run, per rank, per sweep point.

Definitions (also in docs/records.rst):

* A run is *complete* when every rank 0..W-1 has a header and a ``completed`` final record, all
  with the same step count. Otherwise its status says why (failed, preempted, incomplete) and the
  missing/failed/unfinished ranks are named. Incomplete runs are kept out of ``points`` (and so out
  of every efficiency figure) unless ``include_incomplete``.
* Measured steps: from ``warmup_steps`` (header, or the override) on, minus compile steps at the
  start of each attempt (`stats.measured_mask`). Each rank is reduced to sums and quantiles at once,
  so memory grows with ranks, not steps.
* Throughput = samples of all ranks over the measured steps / measured time of the slowest rank
  (the sum of its `wall_s`, so the gap of a requeue does not count).
* Step time of a run, per step: the slowest rank's time (synchronous data parallelism waits for it).
* Straggler: the rank with the most busy time (input wait + compute, i.e. excluding the exchange,
  where the other ranks wait for it); ratio = its busy time / the median rank's.
* Time to first step: the slowest rank's process start to the end of its first step (see
  `_time_to_first_step`; ``startup_source`` says which measurement it is).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from cellavie_hpc import __version__
from cellavie_hpc.errors import DataError, UserError
from cellavie_hpc.progress import Progress
from cellavie_hpc.records.reader import RankRecords, find_run_dirs, rank_files, read_rank_files
from cellavie_hpc.report import stats

SWEEP_FILE = "sweep.json"
#: Point keys that tell repeats of one point apart (not part of the point's identity).
REPEAT_KEYS = ("point.repeat", "point.seed")
#: Columns that describe what was run, used (with the point's own fields) to group repeats.
DESCRIPTORS = ("model", "backend", "precision", "xla", "patch", "world_size", "nodes", "gpus_per_node",
               "batch_per_gpu", "global_batch", "variant")


@dataclass
class Collection:
    """What `collect_runs` found: the tables and every problem, each naming its run/rank/file."""

    runs: pd.DataFrame
    ranks: pd.DataFrame
    problems: list[dict[str, Any]] = field(default_factory=list)
    sweeps: dict[str, Any] = field(default_factory=dict)
    warmup_override: int | None = None


def _problem(severity: str, message: str, run: str | None = None, rank: int | None = None) -> dict[str, Any]:
    return {"severity": severity, "run": run, "rank": rank, "message": message}


def _flatten(mapping: dict[str, Any], prefix: str) -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"point.a.b": 1}`; lists become JSON text so every cell is a scalar."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def _lookup(mapping: dict[str, Any] | None, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(mapping, dict) or part not in mapping:
            return None
        mapping = mapping[part]
    return mapping


def _ranks_text(ranks: Iterable[int]) -> str:
    return ",".join(str(r) for r in sorted(ranks))


def summarize_rank(rec: RankRecords, warmup_steps: int | None = None) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Reduce one rank to summary numbers; also return its measured step numbers and per-step times."""
    header = rec.header or {}
    warmup = int(warmup_steps if warmup_steps is not None else header.get("warmup_steps") or 0)
    s = rec.steps
    n_rec = rec.n_steps
    row: dict[str, Any] = {
        "rank": rec.rank, "node": header.get("node"), "attempts": len(rec.headers),
        "status": rec.final["status"] if rec.final else ("no header" if not rec.headers else "unfinished"),
        "steps_final": rec.final["steps"] if rec.final else None, "records": n_rec,
        "partial_lines": rec.partial_lines, "duplicate_steps": rec.duplicate_steps, "mem_source": rec.mem_source,
        "error": rec.final.get("error") if rec.final else None,
    }
    if n_rec == 0:
        empty = np.zeros(0)
        return row | {"records_measured": 0, "samples_measured": 0, "measured_wall_s": np.nan}, empty, empty
    per_step = s["wall_s"] / stats.steps_per_record(s["step"])
    keep = stats.measured_mask(s["step"], rec.attempt, per_step, warmup)
    wall = s["wall_s"][keep]
    q = stats.quantiles(per_step[keep])
    finite_loss = np.isfinite(s["loss"])
    start = next((h for h in rec.headers if h.get("attempt", 0) == rec.attempt[0]), header)
    row |= {
        "records_measured": int(keep.sum()), "warmup_excluded": int(n_rec - keep.sum()),
        "samples_total": int(s["samples"][s["samples"] > 0].sum()),
        "samples_measured": int(s["samples"][keep].clip(0).sum()),
        "measured_wall_s": float(wall.sum()) if wall.size else np.nan,
        "input_wait_s": stats.nansum_or_nan(s["input_wait_s"][keep]),
        "compute_s": stats.nansum_or_nan(s["compute_s"][keep]),
        "exchange_s": stats.nansum_or_nan(s["exchange_s"][keep]),
        "step_time_median_s": q["median"], "step_time_p10_s": q["p10"], "step_time_p90_s": q["p90"],
        "mem_peak_bytes": int(s["mem_peak_bytes"].max()) if (s["mem_peak_bytes"] >= 0).any() else None,
        **_time_to_first_step(rec, start, float(s["t_unix"][0])),
        "nan_loss_steps": int((~finite_loss).sum()),
        "first_nan_loss_step": int(s["step"][~finite_loss][0]) if (~finite_loss).any() else None,
    }
    busy = np.nan_to_num(s["input_wait_s"][keep]) + np.nan_to_num(s["compute_s"][keep])
    row["busy_s"] = float(busy.sum()) if np.isfinite(s["compute_s"][keep]).any() else row["measured_wall_s"]
    return row, s["step"][keep], per_step[keep]


def _time_to_first_step(rec: RankRecords, start: dict[str, Any], first_step_unix: float) -> dict[str, Any]:
    """Seconds from the rank's start to its first step, and which measurement gave them (`startup_source`).

    Best first: the final record's `startup_s.total` (process start to the end of the first step, latest
    attempt); else the first step's end minus the header's `process_start_unix`; else minus the header's
    `time_unix`, which is written after imports and the model build and so misses them.
    """
    total = _lookup(rec.final, "startup_s.total")
    if total is not None:
        return {"time_to_first_step_s": float(total), "startup_source": "startup_s"}
    if start.get("process_start_unix") is not None:
        return {"time_to_first_step_s": first_step_unix - float(start["process_start_unix"]),
                "startup_source": "process_start"}
    return {"time_to_first_step_s": first_step_unix - float(start.get("time_unix") or np.nan),
            "startup_source": "header"}


def _slowest_start(ranks_df: pd.DataFrame) -> dict[str, Any]:
    """The run's time to first step: its slowest rank's, with that rank's `startup_source`."""
    times = pd.to_numeric(ranks_df.get("time_to_first_step_s"), errors="coerce") \
        if "time_to_first_step_s" in ranks_df else None
    if times is None or not times.notna().any():
        return {"time_to_first_step_s": np.nan, "startup_source": None}
    slowest = ranks_df.loc[times.idxmax()]
    return {"time_to_first_step_s": float(times.max()), "startup_source": slowest["startup_source"]}


class _StepMax:
    """Per step number, the slowest rank's per-step time (memory: one float per distinct step, not per rank).

    The ranks of a run log the same step numbers, so the usual update is one in-place `fmax`; other
    numbers (a rank that stopped early, sparse, negative or huge step numbers) are merged by sorting.
    """

    def __init__(self) -> None:
        self.steps = np.zeros(0, np.int64)
        self.values = np.zeros(0)

    def add(self, step: np.ndarray, per_step_s: np.ndarray) -> None:
        if step.size == 0:
            return
        if np.array_equal(step, self.steps):
            np.fmax(self.values, per_step_s, out=self.values)
            return
        self.steps, where = np.unique(np.concatenate([self.steps, step]), return_inverse=True)
        values = np.full(self.steps.size, np.nan)
        np.fmax.at(values, where, np.concatenate([self.values, per_step_s]))
        self.values = values


def _run_columns(header: dict[str, Any]) -> dict[str, Any]:
    """Descriptor columns of a run from its header (config first, then the sweep point)."""
    point = header.get("point") or {}
    config = header.get("config") or {}

    def pick(config_key: str, point_key: str) -> Any:
        value = _lookup(config, config_key)
        return point.get(point_key) if value is None else value

    precision = pick("train.precision", "precision")
    if precision == "fp32" and _lookup(config, "train.tf32"):
        precision = "tf32"  # float32 storage, TF32 matmuls: its own row in every table
    world = int(header.get("world_size") or 0)
    nodes = int(header.get("nodes") or 1)
    versions = header.get("versions") or {}
    device = header.get("device") or {}
    slurm = header.get("slurm") or {}
    return {
        "run_id": header.get("run_id"), "model": header.get("model"), "backend": header.get("backend"),
        "variant": point.get("variant"), "precision": precision, "xla": pick("train.xla", "xla"),
        "patch": pick("data.patch", "patch"), "world_size": world, "nodes": nodes,
        "gpus_per_node": world // nodes if nodes else None, "batch_per_gpu": header.get("per_replica_batch"),
        "global_batch": header.get("global_batch"), "samples_per_epoch": header.get("samples_per_epoch"),
        "images_per_epoch": header.get("images_per_epoch") or point.get("images") or _lookup(config, "data.max_images"),
        "flops_per_sample": header.get("flops_per_sample"), "device_kind": device.get("kind"),
        "device_name": device.get("name"), "git_commit": header.get("git_commit"),
        "config_hash": header.get("config_hash"), "job_id": slurm.get("array_job_id") or slurm.get("job_id"),
        **{f"version.{k}": v for k, v in versions.items()}, **_flatten(point, "point"),
    }


def collect_run(run_dir: Path, warmup_steps: int | None = None, sweep_dir: Path | None = None
                ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """One run directory -> (run row, rank rows, problems)."""
    files = rank_files(run_dir)
    name = str(run_dir.relative_to(sweep_dir)) if sweep_dir else str(run_dir)
    problems: list[dict[str, Any]] = []
    rank_rows: list[dict[str, Any]] = []
    step_max = _StepMax()
    headers: dict[int, dict[str, Any]] = {}
    for rec in read_rank_files(files):
        problems += [_problem("warning", p, name, rec.rank) for p in rec.problems]
        row, kept_steps, kept_times = summarize_rank(rec, warmup_steps)
        rank_rows.append(row)
        step_max.add(kept_steps, kept_times)
        if rec.header:
            headers[rec.rank] = rec.header
        if row.get("nan_loss_steps"):
            problems.append(_problem("warning", f"rank {rec.rank}: loss is NaN/inf in {row['nan_loss_steps']} step(s), "
                                     f"first at step {row['first_nan_loss_step']} (training diverged?)", name, rec.rank))
    if not headers:
        raise DataError(f"{run_dir}: no rank file has a header record; these are not cellavie-hpc records")
    first = headers[min(headers)]
    run = {"run_dir": name, "sweep_dir": str(sweep_dir) if sweep_dir else None} | _run_columns(first)
    world = run["world_size"]
    for rank, h in headers.items():
        if h.get("world_size") != world or h.get("run_id") != first.get("run_id"):
            problems.append(_problem("error", f"rank {rank}: header says run {h.get('run_id')!r} of world size "
                                     f"{h.get('world_size')}, rank {min(headers)} says {first.get('run_id')!r} "
                                     f"of {world}", name, rank))
    by_rank = {r["rank"]: r for r in rank_rows}
    extra = sorted(r for r in by_rank if r >= world)
    missing = [r for r in range(world) if r not in headers]
    unfinished = [r for r in range(world) if r in headers and by_rank[r]["status"] == "unfinished"]
    failed = [r for r in range(world) if by_rank.get(r, {}).get("status") in ("failed", "preempted")]
    finals = {by_rank[r]["steps_final"] for r in range(world) if by_rank.get(r, {}).get("status") == "completed"}
    complete = not (missing or unfinished or failed or extra) and len(finals) == 1
    if complete:
        status = "completed"
    elif any(by_rank[r]["status"] == "failed" for r in failed):
        status = "failed"
    elif failed:
        status = "preempted"
    else:
        status = "incomplete"
    for label, ranks in (("no records (or no header)", missing), ("no final record (stopped)", unfinished),
                         ("a failed/preempted final record", failed), ("a rank number >= world size", extra)):
        if ranks:
            problems.append(_problem("error", f"rank(s) {_ranks_text(ranks)} of world size {world}: {label}", name))
    if len(finals) > 1:
        problems.append(_problem("error", f"completed ranks disagree on the step count: {sorted(finals)}", name))

    ranks_df = pd.DataFrame(rank_rows)
    measured_wall = ranks_df["measured_wall_s"].to_numpy(float)
    slowest = float(np.nanmax(measured_wall)) if np.isfinite(measured_wall).any() else np.nan
    samples = float(ranks_df["samples_measured"].sum())
    throughput = samples / slowest if slowest and np.isfinite(slowest) else np.nan
    q = stats.quantiles(step_max.values)
    busy = ranks_df["busy_s"].to_numpy(float) if "busy_s" in ranks_df else np.full(len(ranks_df), np.nan)
    straggler_pos = int(np.nanargmax(busy)) if np.isfinite(busy).any() else None
    total_wall = float(np.nansum(measured_wall))

    def share(column: str) -> float:
        if column not in ranks_df or not total_wall:
            return np.nan
        return stats.nansum_or_nan(ranks_df[column].to_numpy(float)) / total_wall

    mem = pd.to_numeric(ranks_df.get("mem_peak_bytes"), errors="coerce") if "mem_peak_bytes" in ranks_df else None
    errors = [e for e in ranks_df.get("error", pd.Series(dtype=object)).dropna() if e]
    run |= {
        "status": status, "complete": complete, "ranks_found": len(headers),
        "missing_ranks": _ranks_text(missing), "unfinished_ranks": _ranks_text(unfinished),
        "failed_ranks": _ranks_text(failed), "attempts": int(ranks_df["attempts"].max()),
        "steps": int(max(finals)) if finals else int(pd.to_numeric(ranks_df["records"]).max()),
        "steps_measured": int(np.isfinite(step_max.values).sum()),
        "warmup_steps_excluded": int(ranks_df.get("warmup_excluded", pd.Series([0])).max()),
        "global_samples": int(samples), "throughput_samples_per_s": throughput,
        "throughput_per_gpu_samples_per_s": throughput / world if world else np.nan,
        "step_time_median_s": q["median"], "step_time_p10_s": q["p10"], "step_time_p90_s": q["p90"],
        "step_time_iqr_s": q["iqr"],
        "input_wait_share": share("input_wait_s"), "compute_share": share("compute_s"),
        "exchange_share": share("exchange_s"),
        "straggler_rank": int(ranks_df["rank"].iloc[straggler_pos]) if straggler_pos is not None else None,
        "straggler_ratio": (float(busy[straggler_pos] / np.nanmedian(busy))
                            if straggler_pos is not None and np.nanmedian(busy) > 0 else np.nan),
        "mem_peak_bytes_max": float(mem.max()) if mem is not None and mem.notna().any() else np.nan,
        "mem_peak_rank": int(ranks_df["rank"].iloc[int(mem.fillna(-1).to_numpy().argmax())])
        if mem is not None and mem.notna().any() else None,
        "mem_source": next((m for m in ranks_df["mem_source"] if m), None),
        **_slowest_start(ranks_df),
        "wall_s": slowest, "nan_loss_steps": int(ranks_df.get("nan_loss_steps", pd.Series([0])).fillna(0).sum()),
        "partial_lines": int(ranks_df["partial_lines"].sum()), "duplicate_steps": int(ranks_df["duplicate_steps"].sum()),
        "error": errors[0] if errors else None,
    }
    fps = run.get("flops_per_sample")
    run["achieved_flops_per_s"] = float(fps) * throughput if fps else np.nan
    if complete and not np.isfinite(throughput):
        problems.append(_problem("warning", "no measured steps after warm-up; throughput unknown", name))
    for r in rank_rows:
        r["run_dir"], r["run_id"] = name, run["run_id"]
    return run, rank_rows, problems


def _sweep_points(sweep_dir: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """`sweep.json` (written by `cellavie sweep`) and its points, or (None, []) when absent."""
    path = sweep_dir / SWEEP_FILE
    if not path.exists():
        return None, []
    try:
        content = json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err}); rewrite it with `cellavie sweep` or remove it") from err
    points = content.get("points") if isinstance(content, dict) else None
    if not isinstance(points, list):
        raise DataError(f"{path}: expected an object with a list 'points'")
    return content, [p for p in points if isinstance(p, dict)]


def _missing_point_row(entry: dict[str, Any], run_dir: str | None, sweep_dir: Path) -> dict[str, Any]:
    point = entry.get("point") if isinstance(entry.get("point"), dict) else {}
    status = entry.get("status") or "missing"
    return {"run_dir": run_dir, "sweep_dir": str(sweep_dir), "run_id": entry.get("run_id"),
            "status": status if status in ("failed", "pending", "running", "cancelled", "timeout") else "missing",
            "complete": False, "ranks_found": 0, **_flatten(point, "point")}


def _relative(path: str | None, sweep_dir: Path) -> str | None:
    if not path:
        return None
    p = Path(path)
    try:
        return str((p if p.is_absolute() else sweep_dir / p).resolve().relative_to(sweep_dir.resolve()))
    except ValueError:
        return str(p)


def collect_runs(sweep_dirs: Iterable[str | Path], warmup_steps: int | None = None,
                 progress: bool = True) -> Collection:
    """Read every run under the sweep directories (and their sweep.json) into a `Collection`."""
    sweep_dirs = [Path(d) for d in sweep_dirs]
    found = [(d, r) for d in sweep_dirs for r in find_run_dirs(d)]
    sweeps = {str(d): _sweep_points(d) for d in sweep_dirs}
    if not found and not any(points for _, points in sweeps.values()):
        raise DataError(f"no records found under {', '.join(map(str, sweep_dirs))} "
                        "(expected RUN_DIR/records/rank-XXXXX.jsonl at any depth)")
    runs, ranks, problems = [], [], []
    with Progress(sum(len(rank_files(r)) for _, r in found), "collect", unit="rank files",
                  enabled=progress) as bar:
        for sweep_dir, run_dir in found:
            run, rank_rows, run_problems = collect_run(run_dir, warmup_steps, sweep_dir)
            runs.append(run)
            ranks += rank_rows
            problems += run_problems
            bar.update(len(rank_rows))
    seen_ids: dict[str, str] = {}
    for run in runs:
        other = seen_ids.setdefault(str(run["run_id"]), run["run_dir"])
        if other != run["run_dir"]:
            problems.append(_problem("warning", f"run_id {run['run_id']!r} appears in {other} and {run['run_dir']}",
                                     run["run_dir"]))
    for sweep_dir in sweep_dirs:
        _, points = sweeps[str(sweep_dir)]
        have_dirs = {(r["sweep_dir"], r["run_dir"]) for r in runs}
        have_ids = {str(r["run_id"]) for r in runs}
        for entry in points:
            rel = _relative(entry.get("run_dir"), sweep_dir)
            if (str(sweep_dir), rel) in have_dirs or (entry.get("run_id") and str(entry["run_id"]) in have_ids):
                continue
            runs.append(_missing_point_row(entry, rel, sweep_dir))
            problems.append(_problem("error", f"sweep point {json.dumps(entry.get('point'), sort_keys=True)} produced "
                                     f"no records (sweep status: {entry.get('status', 'unknown')})", rel))
    runs_df = _integer_columns(pd.DataFrame(runs))
    return Collection(runs=runs_df, ranks=_integer_columns(pd.DataFrame(ranks)), problems=problems,
                      sweeps={k: v[0] for k, v in sweeps.items() if v[0] is not None}, warmup_override=warmup_steps)


def _integer_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Whole-number columns stay integers (nullable) even where a missing run or rank leaves a gap."""
    for col in frame.columns:
        values = frame[col]
        if values.dtype == float and values.notna().any() and (values.dropna() % 1 == 0).all() \
                and not col.endswith(("_s", "_share", "_ratio", "_per_s", "_bytes_max", "flops_per_sample")):
            frame[col] = values.astype("Int64")
        elif values.dtype == object and values.notna().any() and all(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values.dropna()):
            frame[col] = values.astype("Int64")
    return frame


def point_columns(runs: pd.DataFrame) -> list[str]:
    """Columns that identify a sweep point (its own fields and the run descriptors, not the repeat)."""
    cols = [c for c in DESCRIPTORS if c in runs]
    cols += sorted(c for c in runs if c.startswith("point.") and c not in REPEAT_KEYS and c not in cols)
    return cols


def combine_repeats(runs: pd.DataFrame, include_incomplete: bool = False) -> pd.DataFrame:
    """One row per point: median, min and max over its repeats of throughput and step time."""
    if runs.empty or "throughput_samples_per_s" not in runs:
        return pd.DataFrame()
    usable = runs[runs["throughput_samples_per_s"].notna()]
    if not include_incomplete:
        usable = usable[usable["complete"].fillna(False).astype(bool)]
    if usable.empty:
        return pd.DataFrame()
    keys = point_columns(usable)
    frame = usable.copy()
    frame[keys] = frame[keys].astype(object).where(frame[keys].notna(), "")
    agg: dict[str, Any] = {"repeats": ("run_id", "size"),
                           "throughput_samples_per_s": ("throughput_samples_per_s", "median"),
                           "throughput_min": ("throughput_samples_per_s", "min"),
                           "throughput_max": ("throughput_samples_per_s", "max"),
                           "step_time_median_s": ("step_time_median_s", "median"),
                           "step_time_min_s": ("step_time_median_s", "min"),
                           "step_time_max_s": ("step_time_median_s", "max"),
                           "input_wait_share": ("input_wait_share", "median"),
                           "compute_share": ("compute_share", "median"),
                           "exchange_share": ("exchange_share", "median"),
                           "straggler_ratio": ("straggler_ratio", "median"),
                           "mem_peak_bytes_max": ("mem_peak_bytes_max", "max"),
                           "samples_per_epoch": ("samples_per_epoch", "max"),
                           "images_per_epoch": ("images_per_epoch", "max"),
                           "flops_per_sample": ("flops_per_sample", "max"),
                           "achieved_flops_per_s": ("achieved_flops_per_s", "median"),
                           "complete_repeats": ("complete", "sum"),
                           "run_ids": ("run_id", lambda s: ",".join(map(str, s)))}
    points = frame.groupby(keys, dropna=False, sort=True).agg(**agg).reset_index()
    points[keys] = points[keys].replace("", None)
    return points


def write_results(collection: Collection, out: str | Path, include_incomplete: bool = False) -> dict[str, Path]:
    """Write runs/ranks/points as Parquet and CSV plus collect.json (summary and problems)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = combine_repeats(collection.runs, include_incomplete)
    paths: dict[str, Path] = {}
    for name, frame in (("runs", collection.runs), ("ranks", collection.ranks), ("points", points)):
        frame = _parquet_safe(frame)
        frame.to_parquet(out / f"{name}.parquet", index=False)
        frame.to_csv(out / f"{name}.csv", index=False)
        paths[name] = out / f"{name}.parquet"
    runs = collection.runs
    status_counts = runs["status"].value_counts().to_dict() if "status" in runs else {}
    summary = {
        "cellavie_hpc": __version__, "collected_unix": time.time(), "include_incomplete": include_incomplete,
        "warmup_override": collection.warmup_override, "runs": int(len(runs)),
        "complete": int(runs["complete"].fillna(False).astype(bool).sum()) if "complete" in runs else 0,
        "statuses": {str(k): int(v) for k, v in status_counts.items()}, "points": int(len(points)),
        "ranks": int(len(collection.ranks)),
        "incomplete_runs": _incomplete_list(runs),
        "problems": collection.problems, "sweeps": collection.sweeps,
    }
    (out / "collect.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    paths["summary"] = out / "collect.json"
    return paths


def _incomplete_list(runs: pd.DataFrame) -> list[dict[str, Any]]:
    if runs.empty:
        return []
    bad = runs[~runs["complete"].fillna(False).astype(bool)]
    cols = [c for c in ("run_dir", "run_id", "status", "missing_ranks", "unfinished_ranks", "failed_ranks", "error")
            if c in bad]
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in bad[cols].to_dict("records")]


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if not np.isfinite(value) else float(value)
    return str(value)


def _parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns with mixed types (point fields) become text so Parquet accepts them."""
    frame = frame.copy()
    for col in frame.columns:
        if frame[col].dtype == object:
            kinds = {type(v) for v in frame[col] if v is not None and not (isinstance(v, float) and math.isnan(v))}
            if len(kinds) > 1:
                frame[col] = frame[col].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v))
                                            else str(v))
    return frame


def load_results(results: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(runs, points, collect.json) from a results directory written by `write_results`."""
    results = Path(results)
    needed = [results / "runs.parquet", results / "points.parquet", results / "collect.json"]
    absent = [p for p in needed if not p.exists()]
    if absent:
        raise UserError(f"{absent[0]}: not found; run `cellavie collect SWEEP_DIR --out {results}` first")
    return (pd.read_parquet(needed[0]), pd.read_parquet(needed[1]), json.loads(needed[2].read_text()))


def collect(sweep_dirs: Iterable[str | Path], out: str | Path, include_incomplete: bool = False,
            warmup_steps: int | None = None, progress: bool = True) -> tuple[Collection, dict[str, Path]]:
    """`cellavie collect`: read the sweeps and write the results directory."""
    collection = collect_runs(sweep_dirs, warmup_steps, progress)
    return collection, write_results(collection, out, include_incomplete)
