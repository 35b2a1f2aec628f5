"""Append-only writer of one rank's records (see `schema`): one line per record, flushed at once."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from cellavie_hpc.records.schema import rank_file_name, validate


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null so every line stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RecordWriter:
    """Writes `RUN_DIR/records/rank-XXXXX.jsonl` for one rank, appending across requeues."""

    def __init__(self, run_dir: str | Path, rank: int):
        self.path = Path(run_dir) / "records" / rank_file_name(rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._terminate_partial_line()

    def _terminate_partial_line(self) -> None:
        """After a crash mid-write, start the next record on a fresh line (the partial one stays, ignored)."""
        size = os.fstat(self._fd).st_size
        if size:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")

    def write(self, record: dict[str, Any], sync: bool = False) -> None:
        problems = validate(record)
        if problems:
            raise ValueError(f"refusing to write an invalid record to {self.path}: {'; '.join(problems)}")
        line = (json.dumps(_clean(record), separators=(",", ":"), sort_keys=False) + "\n").encode()
        os.write(self._fd, line)
        if sync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
