"""One rank's records of one run (schema in `records/schema.py`), built from the training loop's timings.

The loop measures; this module shapes the measurements into header / step / epoch / final records and
appends them through `RecordWriter`. With `log_every > 1` consecutive steps are summed into one step
record (times and samples summed, loss averaged) so long runs keep small files. A requeued task appends
a new header with the next `attempt` to the same file; step numbers continue from the checkpoint.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from cellavie_hpc.records.schema import SCHEMA_VERSION, rank_file_name
from cellavie_hpc.records.writer import RecordWriter


def previous_attempts(run_dir: str | Path, rank: int) -> int:
    """Headers already in this rank's file: the attempt number of the next one."""
    path = Path(run_dir) / "records" / rank_file_name(rank)
    if not path.exists():
        return 0
    count = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                count += json.loads(line).get("kind") == "header"
            except (ValueError, AttributeError):
                continue
    return count


class StepWindow:
    """Sums of the steps not yet written (one `log_every` window)."""

    def __init__(self) -> None:
        self.steps = 0
        self.wall_s = self.input_wait_s = self.compute_s = 0.0
        self.exchange_s: float | None = None
        self.samples = 0
        self.loss_sum = 0.0

    def add(self, wall_s: float, input_wait_s: float, compute_s: float, exchange_s: float | None,
            samples: int, loss: float) -> None:
        self.steps += 1
        self.wall_s += wall_s
        self.input_wait_s += input_wait_s
        self.compute_s += compute_s
        if exchange_s is not None:
            self.exchange_s = (self.exchange_s or 0.0) + exchange_s
        self.samples += samples
        self.loss_sum += loss


class RunRecorder:
    """Appends this rank's records; keeps the totals the final record needs."""

    def __init__(self, run_dir: str | Path, rank: int, log_every: int = 1):
        self.attempt = previous_attempts(run_dir, rank)
        self.writer = RecordWriter(run_dir, rank)
        self.log_every = log_every
        self.window = StepWindow()
        self.started = time.perf_counter()
        self.samples = 0
        self.steps = 0
        self.last_epoch = 0

    @property
    def path(self) -> Path:
        return self.writer.path

    def header(self, **fields: Any) -> None:
        """The header: every field of the schema's header, with `attempt`, version and time filled in here."""
        self.writer.write({"schema_version": SCHEMA_VERSION, "kind": "header", "attempt": self.attempt,
                           **fields, "time_unix": time.time()}, sync=True)

    def step(self, step: int, epoch: int, *, wall_s: float, input_wait_s: float, compute_s: float,
             exchange_s: float | None, samples: int, loss: float, mem_peak_bytes: int, mem_source: str) -> None:
        """Account one optimiser step (global index `step`); writes a record every `log_every` steps."""
        self.window.add(wall_s, input_wait_s, compute_s, exchange_s, samples, loss)
        self.samples += samples
        self.steps = step + 1
        self.last_epoch = epoch
        if self.window.steps >= self.log_every:
            self.flush(mem_peak_bytes, mem_source)

    def flush(self, mem_peak_bytes: int, mem_source: str) -> None:
        """Write the pending window as one step record numbered by its last step."""
        w = self.window
        if not w.steps:
            return
        self.writer.write({
            "kind": "step", "step": self.steps - 1, "epoch": self.last_epoch, "t_unix": time.time(), "steps": w.steps,
            "wall_s": w.wall_s, "input_wait_s": w.input_wait_s, "compute_s": w.compute_s, "exchange_s": w.exchange_s,
            "samples": w.samples, "loss": w.loss_sum / w.steps, "mem_peak_bytes": mem_peak_bytes,
            "mem_source": mem_source,
        })
        self.window = StepWindow()

    def epoch(self, epoch: int, steps: int, samples: int, wall_s: float, metrics: dict[str, float]) -> None:
        self.writer.write({"kind": "epoch", "epoch": epoch, "steps": steps, "samples": samples, "wall_s": wall_s,
                           "metrics": metrics})

    def final(self, status: str, steps: int, samples_all_attempts: int, metrics: dict[str, float],
              error: str | None = None, startup_s: dict[str, float] | None = None) -> None:
        """The last line; `samples_per_s` is this attempt's rate (its samples over its wall time);
        `startup_s` where this attempt's start-up went (null when it never finished a step)."""
        wall_s = time.perf_counter() - self.started
        rate = self.samples / wall_s if wall_s > 0 else math.nan
        self.writer.write({"kind": "final", "status": status, "steps": steps, "samples": samples_all_attempts,
                           "wall_s": wall_s, "samples_per_s": rate, "metrics": metrics, "error": error,
                           "startup_s": startup_s}, sync=True)

    def close(self) -> None:
        self.writer.close()
