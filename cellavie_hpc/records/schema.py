"""The per-rank record schema (version 1): the only contract between training and reporting.

Each rank of a run appends JSON objects, one per line, to `RUN_DIR/records/rank-XXXXX.jsonl`:

* ``header`` (first line, and again after each requeue/resume with a higher ``attempt``):
  schema_version, kind, run_id, attempt, point (the sweep point, a mapping), model, backend,
  world_size, rank, local_rank, nodes, node, slurm {job_id, array_job_id, array_task_id, restart_count},
  device {kind "gpu"|"cpu", name, count}, versions {python, tensorflow, keras, horovod, numpy, cellavie_hpc},
  git_commit, config_hash, config (the full training configuration), flops_per_sample,
  per_replica_batch, global_batch, samples_per_epoch, warmup_steps, time_unix.
  Optional (training engine): process_start_unix (when the rank's process started), gradient_bytes
  (bytes one replica's gradients put on the wire per exchange), horovod_environment (HOROVOD_* variables
  set before hvd.init, or null), learning_rate (the effective peak rate after lr_scaling), compile_cache
  ({dir, entries} of train.compile_cache_dir, or null).
* ``step`` (one per optimiser step, or per `log_every` steps): step (0-based global step),
  epoch, t_unix (end of step), wall_s, input_wait_s, compute_s, exchange_s (null when not measurable),
  samples (this rank's samples in the step, summed over the logged steps), loss,
  mem_peak_bytes, mem_source ("device"|"rss").
* ``epoch``: epoch, steps, samples (this rank), wall_s, metrics (mapping).
* ``final`` (last line): status ("completed"|"failed"|"preempted"), steps (global step count
  reached), samples (this rank, all attempts), wall_s, samples_per_s (this rank), metrics, error (or null).
  Optional: startup_s (this attempt's start-up, seconds: import, backend, data, build, first_step and
  their sum total = process start to the end of the first step; null if no step finished).

Times are seconds (suffix `_s`) or Unix epoch seconds (`_unix`); memory in bytes.
A record is one `write()` of one line, so a crash leaves at most one partial last line.
"""
from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 1
KINDS = ("header", "step", "epoch", "final")
STATUSES = ("completed", "failed", "preempted")

REQUIRED: dict[str, tuple[str, ...]] = {
    "header": (
        "schema_version", "kind", "run_id", "attempt", "point", "model", "backend", "world_size", "rank",
        "local_rank", "nodes", "node", "slurm", "device", "versions", "git_commit", "config_hash",
        "flops_per_sample", "per_replica_batch", "global_batch", "warmup_steps", "time_unix",
    ),
    "step": (
        "kind", "step", "epoch", "t_unix", "wall_s", "input_wait_s", "compute_s", "exchange_s", "samples",
        "loss", "mem_peak_bytes", "mem_source",
    ),
    "epoch": ("kind", "epoch", "steps", "samples", "wall_s", "metrics"),
    "final": ("kind", "status", "steps", "samples", "wall_s", "samples_per_s", "metrics", "error"),
}


def rank_file_name(rank: int) -> str:
    """`rank-00003.jsonl`: zero-padded so that a directory listing sorts by rank."""
    return f"rank-{int(rank):05d}.jsonl"


def validate(record: dict[str, Any]) -> list[str]:
    """Problems with one record ([] when valid); the caller names the file and line."""
    kind = record.get("kind")
    if kind not in KINDS:
        return [f"unknown record kind {kind!r} (expected one of {', '.join(KINDS)})"]
    problems = [f"{kind} record lacks '{key}'" for key in REQUIRED[kind] if key not in record]
    if kind == "header" and record.get("schema_version") != SCHEMA_VERSION:
        problems.append(
            f"schema_version {record.get('schema_version')!r} is not {SCHEMA_VERSION}; "
            "collect these records with the cellavie-hpc version that wrote them"
        )
    if kind == "final" and record.get("status") not in STATUSES:
        problems.append(f"final status {record.get('status')!r} is not one of {', '.join(STATUSES)}")
    return problems
