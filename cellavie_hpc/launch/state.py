"""The sweep directory: what was submitted (sweep.json) and where each point stands, readable days later.

Layout of SWEEP_DIR::

    sweep.yaml            the sweep as submitted (after --scale/--set): `--resume` needs nothing else
    sweep.json            every point: axes, run dir, config, command, submissions (job id, array index)
    dataset/              the generated data set, when the sweep asks for one
    configs/<point>.yaml  the `cellavie train` configuration of each point
    scripts/<point>.sbatch  an equivalent plain batch script per point, to reproduce one by hand
    scripts/logs/         the logs of those scripts when run by hand
    runs/<point>/         RUN_DIR: records/rank-*.jsonl (training), launch/task-*.jsonl (this package)
    submitit/             submitit's pickles and the task logs (%j_%t_log.out/err)
    results/, report/     written by the collect-and-report step

A point's status comes first from its records (every rank ended `completed`: done; a `failed` final:
failed), then from the scheduler (sacct, else squeue; a local run: its controller process) for
pending/running, and a job the scheduler says has ended without complete records is failed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from cellavie_hpc.errors import DataError, UserError
from cellavie_hpc.records.schema import rank_file_name

SWEEP_JSON = "sweep.json"
SUBMITIT_DIR = "submitit"
SWEEP_YAML = "sweep.yaml"
FORMAT = 1
STATUSES = ("unsubmitted", "pending", "running", "done", "failed")
#: Scheduler states of a job that may still run (sacct/squeue names).
ACTIVE = {"PENDING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending", "REQUEUE_FED": "pending",
          "SUSPENDED": "pending", "RESIZING": "pending", "CONFIGURING": "running", "RUNNING": "running",
          "COMPLETING": "running", "STAGE_OUT": "running", "SIGNALING": "running"}


def config_path(sweep_dir: str | Path, point_id: str) -> Path:
    return Path(sweep_dir) / "configs" / f"{point_id}.yaml"


def run_dir_of(sweep_dir: str | Path, point_id: str) -> Path:
    return Path(sweep_dir) / "runs" / point_id


def script_path(sweep_dir: str | Path, point_id: str) -> Path:
    return Path(sweep_dir) / "scripts" / f"{point_id}.sbatch"


def dataset_dir(sweep_dir: str | Path) -> Path:
    return Path(sweep_dir) / "dataset"


@dataclass
class Submission:
    """One submission of a point: a Slurm job (array task) or a local submitit job (its controller pid)."""

    cluster: str
    job_id: str
    array_job_id: str | None = None
    array_index: int | None = None
    submitted_unix: float = field(default_factory=time.time)

    @property
    def scheduler_id(self) -> str:
        """The id sacct/squeue/--dependency know the job by (the array's id for an array task)."""
        return self.array_job_id or self.job_id.split("_")[0]


@dataclass
class PointEntry:
    index: int
    id: str
    point: dict[str, Any]
    run_dir: str          # relative to the sweep directory
    config: str           # relative to the sweep directory
    command: list[str]
    ranks: int
    shape: str
    submissions: list[Submission] = field(default_factory=list)
    status: str = "unsubmitted"

    @property
    def attempts(self) -> int:
        return len(self.submissions)


@dataclass
class SweepState:
    name: str
    fingerprint: str
    cluster: str
    dataset: str | None
    points: list[PointEntry]
    collect_jobs: list[dict[str, Any]] = field(default_factory=list)
    created_unix: float = field(default_factory=time.time)
    format: int = FORMAT

    def entry(self, point_id: str) -> PointEntry:
        for e in self.points:
            if e.id == point_id:
                return e
        raise KeyError(point_id)


def load_state(sweep_dir: str | Path) -> SweepState:
    """Read SWEEP_DIR/sweep.json; DataError naming the file when it is missing or damaged."""
    path = Path(sweep_dir) / SWEEP_JSON
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found: {sweep_dir} is not a sweep directory (written by `cellavie sweep submit`)")
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err
    try:
        if raw.get("format") != FORMAT:
            raise DataError(f"{path}: format {raw.get('format')!r}, this version reads format {FORMAT}")
        points = [PointEntry(**{**p, "submissions": [Submission(**s) for s in p.get("submissions", [])]})
                  for p in raw["points"]]
        return SweepState(**{**raw, "points": points})
    except (KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{path}: not a sweep state ({type(err).__name__}: {err})") from err


def save_state(state: SweepState, sweep_dir: str | Path) -> None:
    """Write sweep.json atomically (a reader never sees half a file)."""
    path = Path(sweep_dir) / SWEEP_JSON
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- records ---

@dataclass(frozen=True)
class RunProgress:
    """What a run's rank files say: how many ranks completed, failed, or started without ending."""

    ranks: int
    completed: int = 0
    failed: int = 0
    preempted: int = 0
    unfinished: int = 0

    @property
    def done(self) -> bool:
        return self.completed == self.ranks

    @property
    def started(self) -> bool:
        return self.completed + self.failed + self.preempted + self.unfinished > 0


def _last_state(path: Path) -> str | None:
    """'header' when the latest of the header/final records is a header (the rank is running or died),
    else the final status; None without either. Byte searches: no full parse of the step lines."""
    data = path.read_bytes()
    header_at = data.rfind(b'"kind":"header"')
    final_at = data.rfind(b'"kind":"final"')
    if final_at > header_at:
        start = data.rfind(b"\n", 0, final_at) + 1
        end = data.find(b"\n", final_at)
        try:
            return json.loads(data[start:end if end >= 0 else None]).get("status")
        except ValueError:
            return "failed"
    return "header" if header_at >= 0 else None


def run_progress(run_dir: str | Path, ranks: int) -> RunProgress:
    counts = {"completed": 0, "failed": 0, "preempted": 0, "unfinished": 0}
    for rank in range(ranks):
        path = Path(run_dir) / "records" / rank_file_name(rank)
        state = _last_state(path) if path.exists() else None
        if state in ("completed", "failed", "preempted"):
            counts[state] += 1
        elif state == "header":
            counts["unfinished"] += 1
    return RunProgress(ranks=ranks, **counts)


# -------------------------------------------------------------------------------------- scheduler ---

def _run(cmd: list[str]) -> subprocess.CompletedProcess | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _expand_ids(job_id: str) -> list[str]:
    """`123_[0-3%2]` or `123_[1,4]` (pending array ranges) into `123_0`...; other ids unchanged."""
    main, sep, rest = job_id.partition("_[")
    if not sep:
        return [job_id]
    out = []
    for part in rest.rstrip("]").split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        out += [f"{main}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def sacct_states(job_ids: Iterable[str]) -> dict[str, str] | None:
    """{job or array task id: state} from sacct; None when sacct is absent or accounting is off."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    proc = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)])
    if proc is None or proc.returncode != 0:
        return None
    states: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        job, _, state = line.partition("|")
        for one in _expand_ids(job.strip()):
            states[one] = state.split()[0] if state.strip() else "UNKNOWN"
    return states


def squeue_states(job_ids: Iterable[str]) -> dict[str, str] | None:
    """{id: state} of the jobs still known to slurmctld; None without squeue. Absent ids have ended."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    proc = _run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(ids)])
    if proc is None:
        return None
    if proc.returncode != 0:
        return {} if "Invalid job id" in proc.stderr else None
    return {job.strip(): state.strip() for job, _, state in (ln.partition("|") for ln in proc.stdout.splitlines())}


def _local_alive(pid: str) -> bool:
    """A local submitit job is alive while its controller process (`submitit.local._local`) is."""
    try:
        return b"submitit" in Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class PointStatus:
    index: int
    id: str
    status: str
    job_id: str | None
    attempts: int
    ranks: int
    ranks_done: int
    detail: str


def point_statuses(sweep_dir: str | Path, state: SweepState | None = None, use_sacct: bool = True,
                   use_scheduler: bool = True) -> list[PointStatus]:
    """The status of every point (see the module docstring); `use_sacct=False` is the sacct-free path."""
    sweep_dir = Path(sweep_dir)
    state = state or load_state(sweep_dir)
    last = {e.id: e.submissions[-1] for e in state.points if e.submissions}
    slurm_ids = [s.scheduler_id for s in last.values() if s.cluster == "slurm"]
    sched: dict[str, str] | None = None
    source = "none"
    if use_scheduler and slurm_ids:
        sched = sacct_states(slurm_ids) if use_sacct else None
        source = "sacct"
        if sched is None:
            sched, source = squeue_states(slurm_ids), "squeue"
        elif any(i not in sched for i in slurm_ids):  # just submitted: not in the accounting database yet
            sched.update(squeue_states(i for i in slurm_ids if i not in sched) or {})
    out = []
    for e in state.points:
        prog = run_progress(sweep_dir / e.run_dir, e.ranks)
        sub = last.get(e.id)
        job_state: str | None = None
        if sub is not None and sub.cluster == "local":
            job_state = "RUNNING" if use_scheduler and _local_alive(sub.job_id) else "ENDED"
        elif sub is not None and sched is not None:
            job_state = sched.get(sub.job_id) or sched.get(sub.scheduler_id)
            if job_state is None and source == "squeue":
                job_state = "ENDED"  # no longer in the queue
        ranks_note = f"{prog.completed}/{prog.ranks} ranks completed"
        if prog.done:
            status, detail = "done", ranks_note
        elif sub is None:
            status, detail = "unsubmitted", "never submitted"
        elif job_state in ACTIVE:
            status, detail = ACTIVE[job_state], f"{job_state.lower()} ({source}); {ranks_note}"
        elif prog.failed:
            status, detail = "failed", f"{prog.failed} rank(s) ended 'failed'; {ranks_note}"
        elif job_state is not None:
            status, detail = "failed", f"job ended ({job_state}) without complete records; {ranks_note}"
        elif prog.started:
            status, detail = "running", f"records unfinished, scheduler unknown; {ranks_note}"
        else:
            status, detail = "pending", "no records yet, scheduler unknown"
        out.append(PointStatus(e.index, e.id, status, sub.job_id if sub else None, e.attempts, e.ranks,
                               prog.completed, detail))
    return out


def refresh_statuses(sweep_dir: str | Path, **kwargs: Any) -> list[PointStatus]:
    """Compute the statuses and store them in sweep.json (the collector names failed points from it)."""
    state = load_state(sweep_dir)
    statuses = point_statuses(sweep_dir, state, **kwargs)
    for e, s in zip(state.points, statuses):
        e.status = s.status
    save_state(state, sweep_dir)
    return statuses


def format_statuses(statuses: list[PointStatus]) -> str:
    """A fixed-width table, then counts per status."""
    rows = [("point", "status", "job", "tries", "detail")]
    rows += [(s.id, s.status, s.job_id or "-", str(s.attempts), s.detail) for s in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    counts = {k: sum(s.status == k for s in statuses) for k in STATUSES}
    lines.append(", ".join(f"{n} {k}" for k, n in counts.items() if n) + f" (of {len(statuses)} points)")
    return "\n".join(lines)
