"""Read per-rank record files (see `schema`) fast and tolerantly: one rank's steps as numpy arrays.

A sweep can hold ~100 M step records, so parsing line by line with `json.loads` (~150 k lines/s on
one slow core) would take a quarter of an hour. The fast path keeps Python off the step lines: it
finds the few header/epoch/final lines with byte searches, hands the step lines of many files to
Arrow's C++ JSON parser in one call, and splits the result by file. Any file the fast path cannot
vouch for (a line that is not a step record among the step lines, a blank line, a duplicated key,
`Inf`/`-NaN` literals that Arrow accepts and `json.loads` does not, a first step without
`mem_source`) is re-read by the line-by-line path, which is also the reference the tests and
`benchmarks/collect.py` compare with.

Tolerated and counted: a partial line (a crashed rank: the last line, or the line before a requeue's
header), steps written twice by a requeued task (the latest attempt wins, by step number), a step
whose number does not fit a 64-bit integer (ignored, named in `problems`). Refused: a schema version
other than `SCHEMA_VERSION`.
"""
from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from cellavie_hpc.errors import DataError
from cellavie_hpc.records.schema import SCHEMA_VERSION, validate

RANK_FILE = re.compile(r"^rank-(\d+)\.jsonl$")

#: Numeric step fields kept as arrays (everything a report needs; `mem_source` is kept per rank).
STEP_FLOATS = ("t_unix", "wall_s", "input_wait_s", "compute_s", "exchange_s", "loss")
STEP_INTS = ("step", "epoch", "samples", "mem_peak_bytes")
_INT64 = (-(1 << 63), (1 << 63) - 1)
_ARROW_SCHEMA = pa.schema([(n, pa.int64()) for n in STEP_INTS] + [(n, pa.float64()) for n in STEP_FLOATS]
                          + [("kind", pa.string())])
_PARSE = pa_json.ParseOptions(explicit_schema=_ARROW_SCHEMA, unexpected_field_behavior="ignore")
#: 1 MiB blocks: as fast as one huge block (measured) and the parser's working set stays in cache.
_READ = pa_json.ReadOptions(use_threads=False, block_size=1 << 20)

NEWLINE = b"\n"
_OTHER_TAGS = (b'"kind":"header"', b'"kind":"epoch"', b'"kind":"final"')
_OTHER_KINDS = ("header", "epoch", "final")
#: Literals Arrow's parser reads as numbers but `json.loads` refuses (it takes only NaN, Infinity, -Infinity),
#: each with a rare byte it contains (a memchr finds that one cheaply first).
_ARROW_ONLY_LITERALS = ((b"I", b"Inf"), (b"N", b"-NaN"))


class SchemaVersionError(DataError):
    """Records written under another schema version: refused rather than misread."""


@dataclass
class RankRecords:
    """Everything one rank file holds, with its steps de-duplicated and sorted by step number."""

    path: Path
    rank: int
    headers: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] | None = None
    steps: dict[str, np.ndarray] = field(default_factory=dict)
    attempt: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    mem_source: str | None = None
    partial_lines: int = 0
    duplicate_steps: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def header(self) -> dict[str, Any] | None:
        """The latest attempt's header (the one that describes the finished state)."""
        return self.headers[-1] if self.headers else None

    @property
    def n_steps(self) -> int:
        return int(self.steps["step"].size) if self.steps else 0


def rank_of(path: Path) -> int:
    match = RANK_FILE.match(path.name)
    if not match:
        raise DataError(f"{path}: not a rank record file (expected rank-XXXXX.jsonl)")
    return int(match.group(1))


def find_run_dirs(root: str | Path) -> list[Path]:
    """Run directories under `root` (any depth): those with a `records/` folder holding rank files."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such sweep directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if os.path.basename(dirpath) == "records" and any(RANK_FILE.match(f) for f in filenames):
            found.append(Path(dirpath).parent)
            dirnames[:] = []
    return found


def rank_files(run_dir: Path) -> list[Path]:
    """The run's rank files, sorted by rank."""
    files = [p for p in (run_dir / "records").iterdir() if RANK_FILE.match(p.name)]
    return sorted(files, key=rank_of)


def _empty_steps() -> dict[str, np.ndarray]:
    return {n: np.zeros(0, np.int64) for n in STEP_INTS} | {n: np.zeros(0, np.float64) for n in STEP_FLOATS}


def _add_other(rec: RankRecords, record: dict[str, Any], where: str) -> None:
    """File one non-step record (header/epoch/final), refusing other schema versions."""
    kind = record.get("kind")
    if kind == "header" and record.get("schema_version") != SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where}: schema_version {record.get('schema_version')!r}, this collector reads version "
            f"{SCHEMA_VERSION}; collect these records with the cellavie-hpc version that wrote them"
        )
    problems = validate(record)
    if problems:
        rec.problems.append(f"{where}: {'; '.join(problems)}")
    if kind == "header":
        rec.headers.append(record)
    elif kind == "epoch":
        rec.epochs.append(record)
    elif kind == "final":
        rec.final = record


def _finish(rec: RankRecords, columns: dict[str, np.ndarray], attempt: np.ndarray) -> RankRecords:
    """De-duplicate steps by step number (latest attempt, then latest line wins) and sort them."""
    step = columns["step"]
    n = step.size
    if n > 1 and not (step[1:] > step[:-1]).all():  # strictly increasing (the usual case): nothing to do
        order = np.lexsort((np.arange(n), attempt, step))
        step_sorted = step[order]
        keep = np.ones(n, bool)
        keep[:-1] = step_sorted[1:] != step_sorted[:-1]
        idx = order[keep]
        rec.duplicate_steps = int(n - idx.size)
        columns = {k: v[idx] for k, v in columns.items()}
        attempt = attempt[idx]
    rec.steps, rec.attempt = columns, attempt
    if rec.duplicate_steps:
        rec.problems.append(f"{rec.path}: {rec.duplicate_steps} step record(s) written again (requeue); kept the latest")
    if rec.partial_lines:
        rec.problems.append(f"{rec.path}: {rec.partial_lines} partial line(s) ignored (a rank stopped mid-write)")
    return rec


def _step_values(record: dict[str, Any]) -> tuple[list[int], list[float]] | str:
    """A step record's numbers (missing/null: -1 or NaN), or what is wrong with one of them."""
    ints, floats = [], []
    try:
        for name in STEP_INTS:
            value = record.get(name)
            ints.append(-1 if value is None else int(value))
            if not _INT64[0] <= ints[-1] <= _INT64[1]:
                raise OverflowError
        for name in STEP_FLOATS:
            value = record.get(name)
            floats.append(np.nan if value is None else float(value))
    except (TypeError, ValueError, OverflowError):
        return f"step record field {name!r} = {str(value)[:40]!r} is not a 64-bit number; record ignored"
    return ints, floats


def read_rank_file_slow(path: str | Path) -> RankRecords:
    """Line-by-line `json.loads` reader: the reference for the fast path and its fallback."""
    path = Path(path)
    rec = RankRecords(path=path, rank=rank_of(path))
    with open(path, "rb") as f:
        data = f.read()
    int_rows: list[list[int]] = []
    float_rows: list[list[float]] = []
    attempts: list[int] = []
    attempt = 0
    for lineno, line in enumerate(data.split(NEWLINE), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            rec.partial_lines += 1
            continue
        if record.get("kind") != "step":
            _add_other(rec, record, f"{path}:{lineno}")
            if record.get("kind") == "header":
                attempt = int(record.get("attempt") or 0)
            continue
        values = _step_values(record)
        if isinstance(values, str):
            rec.problems.append(f"{path}:{lineno}: {values}")
            continue
        if rec.mem_source is None:
            rec.mem_source = record.get("mem_source")
        int_rows.append(values[0])
        float_rows.append(values[1])
        attempts.append(attempt)
    ints = np.array(int_rows, np.int64).reshape(-1, len(STEP_INTS))
    floats = np.array(float_rows, np.float64).reshape(-1, len(STEP_FLOATS))
    columns = {n: ints[:, i].copy() for i, n in enumerate(STEP_INTS)}
    columns |= {n: floats[:, i].copy() for i, n in enumerate(STEP_FLOATS)}
    return _finish(rec, columns, np.asarray(attempts, np.int64))


@dataclass
class _Split:
    """A file split by byte searches: its few non-step records, and its step lines as one buffer."""

    rec: RankRecords
    step_pieces: list[memoryview]  # the runs of step lines, not copied until the batch is joined
    segment_rows: list[tuple[int, int]]  # (attempt, number of step lines) in file order

    @property
    def size(self) -> int:
        return sum(piece.nbytes for piece in self.step_pieces)


def _line_bounds(data: bytes, pos: int) -> tuple[int, int]:
    start = data.rfind(NEWLINE, 0, pos) + 1
    end = data.find(NEWLINE, pos)
    return start, (len(data) if end < 0 else end)


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _arrow_only_literal(data: bytes, start: int, end: int) -> bool:
    """Whether data[start:end] holds `Inf` or `-NaN`."""
    return any(data.find(rare, start, end) >= 0 and data.find(literal, start, end) >= 0
               for rare, literal in _ARROW_ONLY_LITERALS)


def _split(path: Path) -> _Split | None:
    """Split a file into its non-step lines (found by their `"kind":"..."` tag) and the rest.

    None when the file is not canonical; the Arrow parse then checks that the rest is all step lines.
    Newlines are counted once, incrementally, for both the line numbers in messages and the rows.
    """
    rec = RankRecords(path=path, rank=rank_of(path))
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(NEWLINE):
        tail_start = data.rfind(NEWLINE) + 1
        if _is_record(data[tail_start:]):
            return None  # a complete last record without a newline: let the slow path file it
        rec.partial_lines += 1
        data = data[:tail_start]
    spans = []
    for tag in _OTHER_TAGS:
        pos = data.find(tag)
        while pos >= 0:
            spans.append(_line_bounds(data, pos))
            pos = data.find(tag, pos + 1)
    spans.sort()
    if len(set(spans)) != len(spans):
        return None
    pieces, segment_rows = [], []
    attempt, cursor, cursor_line = 0, 0, 1
    for start, end in spans:
        lineno = cursor_line + data.count(NEWLINE, cursor, start)
        try:
            record = json.loads(data[start:end])
        except ValueError:
            return None
        if not isinstance(record, dict) or record.get("kind") not in _OTHER_KINDS:
            return None  # the tag sat inside another record
        chunk_end, rows = start, lineno - cursor_line
        if record["kind"] == "header" and rows:
            # A requeued rank first ends the line its crash cut short: that line precedes this header.
            before = max(cursor, data.rfind(NEWLINE, cursor, start - 1) + 1)
            last = data[before:start - 1]
            if not last.strip() or not _is_record(last):
                rec.partial_lines += bool(last.strip())
                chunk_end, rows = before, rows - 1
        if rows:
            pieces.append((cursor, chunk_end))
            segment_rows.append((attempt, rows))
        _add_other(rec, record, f"{path}:{lineno}")
        if record["kind"] == "header":
            attempt = int(record.get("attempt") or 0)
        cursor, cursor_line = end + 1, lineno + 1
    if cursor < len(data):
        pieces.append((cursor, len(data)))
        segment_rows.append((attempt, data.count(NEWLINE, cursor)))
    if pieces:
        if any(_arrow_only_literal(data, start, end) for start, end in pieces):
            return None
        start = pieces[0][0]
        try:
            first = json.loads(data[start:data.find(NEWLINE, start)])
        except ValueError:
            return None
        rec.mem_source = first.get("mem_source") if isinstance(first, dict) else None
        if rec.mem_source is None:
            return None  # the reference takes the first step that names it: let it search
    view = memoryview(data)
    return _Split(rec, [view[start:end] for start, end in pieces], segment_rows)


def _columns(table: pa.Table) -> dict[str, np.ndarray]:
    """The batch's step columns as numpy arrays (null: -1 for integers, NaN for floats)."""
    out = {name: table.column(name).fill_null(-1).to_numpy() for name in STEP_INTS}
    for name in STEP_FLOATS:
        out[name] = table.column(name).to_numpy().astype(np.float64, copy=False)
    return out


def _parse_batch(splits: list[_Split]) -> Iterator[RankRecords]:
    """Parse the step lines of several files in one Arrow call; a file that fails goes the slow way."""
    rows = [sum(n for _, n in s.segment_rows) for s in splits]
    buffer = b"".join(piece for s in splits for piece in s.step_pieces)
    if not buffer:
        for s in splits:
            yield _finish(s.rec, _empty_steps(), np.zeros(0, np.int64))
        return
    try:
        table = pa_json.read_json(io.BytesIO(buffer), _READ, _PARSE)
        kind = table.column("kind")
        if (table.num_rows != sum(rows) or table.column("step").null_count or kind.null_count
                or not pc.all(pc.equal(kind, "step")).as_py()):
            raise ValueError("a line that is not a step record (or a blank line) among the step lines")
    except (pa.ArrowInvalid, ValueError):
        if len(splits) == 1:
            yield read_rank_file_slow(splits[0].rec.path)
            return
        for s in splits:
            yield from _parse_batch([s])
        return
    del buffer
    columns = _columns(table)
    lo = 0
    for s, n in zip(splits, rows):
        attempt = np.repeat([a for a, _ in s.segment_rows], [k for _, k in s.segment_rows]).astype(np.int64)
        yield _finish(s.rec, {k: v[lo:lo + n] for k, v in columns.items()}, attempt)
        lo += n


def read_rank_files(paths: Iterable[str | Path], batch_bytes: int = 32 << 20) -> Iterator[RankRecords]:
    """Read rank files in order, parsing step lines in batches of about `batch_bytes` (bounded memory)."""
    batch: list[_Split] = []
    size = 0
    for path in paths:
        split = _split(Path(path))
        if split is None:
            yield from _flush(batch)
            batch, size = [], 0
            yield read_rank_file_slow(path)
            continue
        batch.append(split)
        size += split.size
        if size >= batch_bytes:
            yield from _flush(batch)
            batch, size = [], 0
    yield from _flush(batch)


def _flush(batch: list[_Split]) -> Iterator[RankRecords]:
    if batch:
        yield from _parse_batch(batch)


def read_rank_file(path: str | Path) -> RankRecords:
    """One rank file through the fast path (falling back to the line-by-line reader when needed)."""
    return next(read_rank_files([path]))
