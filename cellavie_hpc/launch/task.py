"""What a submitit task runs: `cellavie train` for one sweep point, as a child process of the task.

Under Slurm each task of the job is one rank (srun starts `tasks_per_node` tasks per node; Horovod's
MPI world comes from `srun --mpi=pmix`, which the child inherits; MultiWorkerMirrored resolves the
cluster from the Slurm variables with a port base derived from the job id so that two jobs sharing a
node do not collide). Locally (submitit's LocalExecutor) a Horovod point runs its ranks under
`mpirun` from one task, and a MultiWorkerMirrored point gets one task per rank with a `TF_CONFIG`.

Preemption: Slurm sends submitit's signal (USR2) `signal_delay_s` before the time limit. Every task
forwards SIGUSR1 (`STOP_SIGNAL`) to its training process, which checkpoints at the next step, writes a `preempted`
final record and exits (`train.signals.PREEMPTED_EXIT`); task 0's `checkpoint()` waits for that and
submitit requeues the job, which resumes in the same RUN_DIR. The training process itself ignores
USR2, so the signal reaches it only as the SIGUSR1 it knows how to handle.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from cellavie_hpc.errors import UserError
from cellavie_hpc.launch import job_env
from cellavie_hpc.launch.mpirun import local_mpirun, root_environment
from cellavie_hpc.train.signals import PREEMPTED_EXIT, STOP_SIGNALS

#: What the training process is sent to stop: one of its stop signals that srun and mpirun forward to ranks.
STOP_SIGNAL = signal.SIGUSR1
assert STOP_SIGNAL in STOP_SIGNALS

#: Port bases: PORT_FLOOR + (job id % PORT_JOBS) * PORTS_PER_JOB, i.e. 20000..51984, one rank per port.
PORT_FLOOR, PORT_JOBS, PORTS_PER_JOB = 20000, 2000, 16


def port_base(job_id: str | int) -> int:
    """A port base that every task of one job agrees on and that differs between the jobs that can
    share a node (consecutive job ids are PORTS_PER_JOB ports apart)."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return PORT_FLOOR + (int(digits) % PORT_JOBS) * PORTS_PER_JOB


def tf_config(rank: int, ranks: int, base: int, host: str = "localhost") -> str:
    """TF_CONFIG of rank `rank` among `ranks` workers on one host (the local executor's cluster)."""
    return job_env.tf_config([f"{host}:{base + i}" for i in range(ranks)], rank)


def train_argv(python: list[str], config: str, run_dir: str, overrides: list[str] = ()) -> list[str]:
    """`python -m cellavie_hpc train CONFIG [overrides] --run-dir RUN_DIR`: the one command of every rank."""
    return [*python, "-m", "cellavie_hpc", "train", config, *overrides, "--run-dir", run_dir]


def _ignore_preempt_signal() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class TrainTask(submitit.helpers.Checkpointable):
    """One rank's share of a point: run the training process, forward preemption, report its end."""

    def __init__(self, point_id: str, config: str, run_dir: str, backend: str, ranks: int, cluster: str,
                 grace_s: float = 60.0):
        self.point_id, self.config, self.run_dir = point_id, config, run_dir
        self.backend, self.ranks, self.cluster, self.grace_s = backend, ranks, cluster, grace_s
        self._proc: subprocess.Popen | None = None
        self._preempted = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_proc=None, _preempted=False)
        return state

    def _argv_and_env(self, env: submitit.JobEnvironment) -> tuple[list[str], dict[str, str]]:
        child_env = dict(os.environ)
        overrides: list[str] = []
        launcher: list[str] = []
        if self.backend == "multiworker":
            base = port_base(env.raw_job_id)
            overrides.append(f"train.port_base={base}")
            if self.cluster == "local":
                child_env["TF_CONFIG"] = tf_config(env.global_rank, env.num_tasks, base)
        if self.backend == "horovod" and self.cluster == "local" and self.ranks > 1:
            try:
                launcher = local_mpirun(self.ranks)
            except UserError as err:
                raise RuntimeError(f"point {self.point_id}: horovod: {err}") from err
            child_env.update(root_environment())
        argv = train_argv([sys.executable], self.config, self.run_dir, overrides)
        return launcher + argv, child_env

    def _log(self, rank: int, event: dict[str, Any]) -> None:
        """Append to RUN_DIR/launch/task-XXXXX.jsonl: which job, host and GPUs ran, and how it ended."""
        path = Path(self.run_dir) / "launch" / f"task-{rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({**event, "time_unix": time.time()}) + "\n")

    def _signal_child(self, signum: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signum)

    def _stop_child(self) -> int | None:
        """Ask the training process to stop and give it `grace_s` to checkpoint; SIGKILL after that."""
        if self._proc is None:
            return None
        self._signal_child(STOP_SIGNAL)
        deadline = time.monotonic() + self.grace_s
        while self._proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        return self._proc.returncode

    def __call__(self) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        rank = env.global_rank
        argv, child_env = self._argv_and_env(env)
        usr_sig = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        previous = signal.getsignal(usr_sig)

        def on_preempt(signum: int, frame: Any) -> None:
            self._preempted = True
            self._signal_child(STOP_SIGNAL)
            if callable(previous):
                previous(signum, frame)  # submitit: task 0 checkpoints (below) and requeues the job

        signal.signal(usr_sig, on_preempt)
        self._log(rank, {"event": "start", "point": self.point_id, "job_id": env.job_id, "rank": rank,
                         "tasks": env.num_tasks, "host": socket.gethostname(), "argv": argv,
                         "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")})
        started = time.monotonic()
        self._proc = subprocess.Popen(argv, env=child_env, preexec_fn=_ignore_preempt_signal)
        while self._proc.poll() is None:  # poll, not wait(): the signal handler may need the process too
            time.sleep(0.2)
        code = self._proc.returncode
        self._log(rank, {"event": "end", "rank": rank, "returncode": code, "preempted": self._preempted,
                         "wall_s": time.monotonic() - started})
        if self._preempted:
            sys.exit(PREEMPTED_EXIT)  # not a result: task 0 requeues the job, which runs every task again
        if code != 0:
            raise RuntimeError(f"point {self.point_id}, task {rank}: `{' '.join(argv)}` exited with status {code}; "
                               f"its output is in this task's log; records in {self.run_dir}/records")
        return {"point": self.point_id, "rank": rank, "returncode": code}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on task 0 when preempted: let the training checkpoint, then requeue as is."""
        code = self._stop_child()
        self._log(submitit.JobEnvironment().global_rank,
                  {"event": "checkpoint", "returncode": code, "requeue": True})
        return submitit.helpers.DelayedSubmission(
            TrainTask(self.point_id, self.config, self.run_dir, self.backend, self.ranks, self.cluster, self.grace_s))


def collect_and_report(sweep_dir: str, python: list[str] | None = None) -> dict[str, str]:
    """The last step of a sweep: store the point statuses, then `cellavie collect` and `cellavie report`.

    Runs as a small Slurm job depending on every array of the sweep (`afterany`), or in-process after a
    local sweep; failed points stay in the results, named, because sweep.json lists them with their status.
    """
    from cellavie_hpc.launch.state import refresh_statuses

    refresh_statuses(sweep_dir)
    python = python or [sys.executable]
    results, report = str(Path(sweep_dir) / "results"), str(Path(sweep_dir) / "report")
    for argv in ([*python, "-m", "cellavie_hpc", "collect", sweep_dir, "--out", results],
                 [*python, "-m", "cellavie_hpc", "report", results, "--out", report]):
        code = subprocess.call(argv)
        if code != 0:
            raise RuntimeError(f"`{' '.join(argv)}` exited with status {code}")
    return {"results": results, "report": report}
