"""Write valid per-rank records (schema version 1) with known timings, for tests of any engineer.

`write_run` produces a run directory whose throughput, shares and stragglers can be computed by
hand: every post-warm-up step of rank r takes `step_time_s(r, step)` seconds, split into input
wait, compute and exchange by the given fractions, and processes `per_replica_batch` samples.
Records go through the real `RecordWriter`, so they are what training writes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from cellavie_hpc.records.schema import SCHEMA_VERSION, rank_file_name
from cellavie_hpc.records.writer import RecordWriter

T0_UNIX = 1_700_000_000.0
VERSIONS = {"python": "3.11.9", "tensorflow": "2.21.0", "keras": "3.15.0", "horovod": "0.28.1",
            "numpy": "2.4.6", "cellavie_hpc": "0.1.0"}


def header(run_id: str, rank: int, world_size: int, *, attempt: int = 0, point: dict | None = None,
           model: str = "unet", backend: str = "horovod", nodes: int = 1, per_replica_batch: int = 8,
           warmup_steps: int = 2, flops_per_sample: float = 1.0e9, samples_per_epoch: int | None = 6400,
           precision: str = "fp32", xla: bool = False, patch: int = 128, time_unix: float = T0_UNIX,
           **extra: Any) -> dict[str, Any]:
    """A header record; `point` defaults to the fields a scaling sweep varies."""
    gpus_per_node = max(1, world_size // max(1, nodes))
    if point is None:
        point = {"model": model, "backend": backend, "nodes": nodes, "gpus_per_node": gpus_per_node,
                 "batch_per_gpu": per_replica_batch, "patch": patch, "precision": precision, "xla": xla,
                 "repeat": 0}
    record = {
        "schema_version": SCHEMA_VERSION, "kind": "header", "run_id": run_id, "attempt": attempt, "point": point,
        "model": model, "backend": backend, "world_size": world_size, "rank": rank,
        "local_rank": rank % gpus_per_node, "nodes": nodes, "node": f"node{rank // gpus_per_node:02d}",
        "slurm": {"job_id": "1234", "array_job_id": "1230", "array_task_id": 4, "restart_count": attempt},
        "device": {"kind": "gpu", "name": "NVIDIA A100-SXM4-40GB", "count": gpus_per_node},
        "versions": dict(VERSIONS), "git_commit": "0123456789abcdef0123456789abcdef01234567",
        "config_hash": "cafe1234",
        "config": {"model": {"name": model, "preset": "tiny"},
                   "train": {"backend": backend, "batch_per_replica": per_replica_batch, "precision": precision,
                             "xla": xla},
                   "data": {"patch": patch}},
        "flops_per_sample": flops_per_sample, "per_replica_batch": per_replica_batch,
        "global_batch": per_replica_batch * world_size, "samples_per_epoch": samples_per_epoch,
        "warmup_steps": warmup_steps, "time_unix": time_unix,
    }
    record.update(extra)
    return record


def step(step_no: int, *, wall_s: float, input_wait_s: float, compute_s: float, exchange_s: float | None,
         samples: int, t_unix: float, loss: float | None = 0.5, mem_peak_bytes: int = 2 << 30,
         epoch: int = 0, mem_source: str = "device") -> dict[str, Any]:
    return {"kind": "step", "step": step_no, "epoch": epoch, "t_unix": t_unix, "wall_s": wall_s,
            "input_wait_s": input_wait_s, "compute_s": compute_s, "exchange_s": exchange_s, "samples": samples,
            "loss": loss, "mem_peak_bytes": mem_peak_bytes, "mem_source": mem_source}


def final(steps: int, samples: int, wall_s: float, status: str = "completed", error: str | None = None) -> dict:
    return {"kind": "final", "status": status, "steps": steps, "samples": samples, "wall_s": wall_s,
            "samples_per_s": samples / wall_s if wall_s else 0.0, "metrics": {"loss": 0.5}, "error": error}


def write_run(run_dir: str | Path, *, world_size: int, steps: int = 10, per_replica_batch: int = 8,
              step_time_s: float | Callable[[int, int], float] = 0.1, warmup_steps: int = 2,
              warmup_time_s: float = 5.0, input_share: float = 0.1, exchange_share: float = 0.2,
              ranks: list[int] | None = None, status: Callable[[int], str] | None = None,
              stop_at: dict[int, int] | None = None, mem_peak_bytes: Callable[[int], int] | None = None,
              run_id: str | None = None, epoch_every: int = 0, header_warmup_steps: int | None = None,
              **header_kw: Any) -> Path:
    """Write the records of one run; return its directory.

    Steps `0..warmup_steps-1` take `warmup_time_s` (compilation); later steps `step_time_s`.
    `ranks` limits which ranks get a file (a missing rank), `stop_at[r] = k` stops rank r after k steps
    with no final record, `status(r)` sets a rank's final status; `header_warmup_steps` makes the
    header declare another warm-up than the slow steps written (to test compile-step detection).
    """
    run_dir = Path(run_dir)
    run_id = run_id or run_dir.name
    timing = step_time_s if callable(step_time_s) else (lambda r, s: float(step_time_s))
    for rank in (range(world_size) if ranks is None else ranks):
        t = T0_UNIX + 2.0
        total = 0.0
        with RecordWriter(run_dir, rank) as writer:
            writer.write(header(run_id, rank, world_size, per_replica_batch=per_replica_batch,
                                warmup_steps=warmup_steps if header_warmup_steps is None else header_warmup_steps,
                                **header_kw))
            last = steps if stop_at is None or rank not in stop_at else stop_at[rank]
            for s in range(last):
                wall = warmup_time_s if s < warmup_steps else timing(rank, s)
                t += wall
                total += wall
                writer.write(step(s, wall_s=wall, input_wait_s=wall * input_share,
                                  compute_s=wall * (1 - input_share - exchange_share),
                                  exchange_s=wall * exchange_share, samples=per_replica_batch, t_unix=t,
                                  mem_peak_bytes=(mem_peak_bytes(rank) if mem_peak_bytes else 2 << 30),
                                  epoch=(s // epoch_every if epoch_every else 0)))
                if epoch_every and (s + 1) % epoch_every == 0:
                    writer.write({"kind": "epoch", "epoch": s // epoch_every, "steps": s + 1,
                                  "samples": (s + 1) * per_replica_batch, "wall_s": total, "metrics": {}})
            if stop_at is None or rank not in stop_at:
                writer.write(final(steps, steps * per_replica_batch, total,
                                   status=status(rank) if status else "completed"))
    return run_dir


def append_raw(run_dir: str | Path, rank: int, text: str) -> Path:
    """Append raw text to a rank file (partial lines, hand-edited records)."""
    path = Path(run_dir) / "records" / rank_file_name(rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
    return path


def append_records(run_dir: str | Path, rank: int, records: list[dict[str, Any]]) -> Path:
    """Append records as JSON lines without validation (to build wrong-version or odd files)."""
    return append_raw(run_dir, rank, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
