"""How much of Horovod's allreduce time overlaps the backward pass, read from its timeline.

`train.horovod.timeline: true` makes Horovod (rank 0, the coordinator) write a Chrome trace to
`RUN_DIR/horovod_timeline.json`: one trace "process" per tensor name, and per exchange of that
tensor a `NEGOTIATE_ALLREDUCE` phase (from its submission until every rank has submitted it; instant
events named after each rank mark the submissions while negotiation is not cached) followed by an
`ALLREDUCE` phase (fusion-buffer copies and the transfer itself).

The trace holds no compute events, so compute is inferred from the submissions: within one step rank 0
submits each gradient as soon as the backward pass produces it, so until its last submission of the step
the rank is still computing that step. The overlap share is the part of the allreduce time (the union of
`ALLREDUCE` phases, fused tensors counted once) that falls between rank 0's first and last submission of
the same step. The step's tensors are those exchanged the most common number of times (> 1), the k-th
exchange of each belonging to step k; the others (set-up, checkpoint averaging, barriers) are left out. With one grouped allreduce after the backward pass the
gradients are submitted together and the share is about zero; per-tensor allreduce can overlap.
"""
from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from cellavie_hpc.errors import DataError

TIMELINE_FILE = "horovod_timeline.json"


@dataclasses.dataclass(frozen=True)
class Exchange:
    """One exchange of one tensor: rank 0's submission and the allreduce phase (microseconds since trace start)."""

    tensor: str
    occurrence: int
    submitted_us: float
    start_us: float
    end_us: float
    shape: str | None


@dataclasses.dataclass(frozen=True)
class TimelineSummary:
    """Per-step figures over the analysed steps (the first `skip_steps` excluded: tracing, uncached negotiation)."""

    steps: int
    tensors_per_step: float
    messages_per_step: float  # distinct allreduce executions: tensors_per_step / messages_per_step = fusion
    allreduce_s_per_step: float
    compute_window_s_per_step: float
    overlap_share: float  # of the allreduce time, the share during rank 0's compute of the same step
    overlap_share_by_step: tuple[float, ...]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The trace's events; also reads a trace cut short (Horovod closes the JSON array only at shutdown)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise DataError(f"{path}: cannot read the Horovod timeline ({err}); run with train.horovod.timeline=true") from err
    if not text.startswith("["):
        raise DataError(f"{path}: not a Chrome trace (expected a JSON array of events)")
    body = text.rstrip("]").rstrip().rstrip(",")
    try:
        events = json.loads(body + "]")
    except ValueError:
        # A partial last event: drop everything after the last complete one.
        cut = body.rfind("}")
        while cut > 0:
            try:
                events = json.loads(body[:cut + 1] + "]")
                break
            except ValueError:
                cut = body.rfind("}", 0, cut)
        else:
            raise DataError(f"{path}: no complete timeline event") from None
    return [e for e in events if isinstance(e, dict)]


def exchanges(events: Iterable[dict[str, Any]]) -> list[Exchange]:
    """Every allreduce of every tensor, in trace order per tensor."""
    names: dict[int, str] = {}
    stacks: dict[int, list[tuple[str, float]]] = defaultdict(list)
    submitted: dict[int, float] = {}
    count: dict[str, int] = defaultdict(int)
    out: list[Exchange] = []
    for e in events:
        pid, ph = e.get("pid"), e.get("ph")
        if ph == "M":
            if e.get("name") == "process_name" and "name" in (e.get("args") or {}):
                names[pid] = e["args"]["name"]
            continue
        ts = float(e.get("ts", 0.0))
        if ph == "B":
            stacks[pid].append((e.get("name", ""), ts))
            if e.get("name") == "NEGOTIATE_ALLREDUCE":
                submitted[pid] = ts  # rank 0's submission when negotiation is cached (no rank markers)
        elif ph == "X" and e.get("name") == "0" and stacks[pid] and stacks[pid][-1][0] == "NEGOTIATE_ALLREDUCE":
            submitted[pid] = ts
        elif ph == "E" and stacks[pid]:
            phase, start = stacks[pid].pop()
            if phase == "ALLREDUCE":
                tensor = names.get(pid, str(pid))
                out.append(Exchange(tensor, count[tensor], submitted.pop(pid, start), start, ts,
                                    (e.get("args") or {}).get("shape")))
                count[tensor] += 1
    return out


def _union_length(intervals: list[tuple[float, float]], lo: float = -np.inf, hi: float = np.inf) -> float:
    """Length of the union of intervals clipped to [lo, hi]."""
    total, end = 0.0, -np.inf
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in intervals):
        if b <= a:
            continue
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def _messages(intervals: list[tuple[float, float]]) -> int:
    """Allreduce executions: Horovod runs them one after the other, and the tensors of one fused execution
    all start before any of them ends (each tensor's phase is logged separately, microseconds apart)."""
    count, first_end = 0, -np.inf
    for start, end in sorted(intervals):
        if start >= first_end:
            count += 1
            first_end = end
        else:
            first_end = min(first_end, end)
    return count


def summarize(found: list[Exchange], skip_steps: int = 1) -> TimelineSummary:
    """Fusion, allreduce time and its overlap with compute, per step (see the module docstring)."""
    per_tensor: dict[str, int] = defaultdict(int)
    for x in found:
        per_tensor[x.tensor] += 1
    repeated = [n for n in per_tensor.values() if n > 1]
    step_count = max(set(repeated), key=repeated.count) if repeated else 0
    by_step: dict[int, list[Exchange]] = defaultdict(list)
    for x in found:
        if per_tensor[x.tensor] == step_count:
            by_step[x.occurrence].append(x)
    steps = [s for s in sorted(by_step) if s >= skip_steps]
    if not steps:
        raise DataError(f"the timeline holds {len(by_step)} step(s) of repeated allreduces; need more than "
                        f"skip_steps={skip_steps} (train longer)")
    tensors, messages, comm, window, shares = [], [], [], [], []
    for s in steps:
        xs = by_step[s]
        intervals = [(x.start_us, x.end_us) for x in xs]
        lo, hi = min(x.submitted_us for x in xs), max(x.submitted_us for x in xs)
        total = _union_length(intervals)
        tensors.append(len(xs))
        messages.append(_messages(intervals))
        comm.append(total * 1e-6)
        window.append((hi - lo) * 1e-6)
        shares.append(_union_length(intervals, lo, hi) / total if total > 0 else 0.0)
    comm_arr = np.asarray(comm)
    overall = float(np.sum(np.asarray(shares) * comm_arr) / comm_arr.sum()) if comm_arr.sum() > 0 else 0.0
    return TimelineSummary(len(steps), float(np.mean(tensors)), float(np.mean(messages)), float(np.mean(comm)),
                           float(np.mean(window)), overall, tuple(shares))


def summarize_run(run_dir: str | Path, skip_steps: int = 1) -> TimelineSummary:
    """`summarize` of `RUN_DIR/horovod_timeline.json`."""
    return summarize(exchanges(read_events(Path(run_dir) / TIMELINE_FILE)), skip_steps)
