"""Fixtures for tests that need a real Slurm cluster (see cluster/README.rst).

``slurm_cluster`` (session scope) checks that Slurm answers (``sinfo`` exits 0
and the node is usable).  Otherwise the test is skipped with the reason --
or FAILS when the environment sets ``CELLAVIE_REQUIRE_SLURM=1`` (CI, after
``make cluster-up``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from collections.abc import Sequence

import pytest

REQUIRE_ENV = "CELLAVIE_REQUIRE_SLURM"
# Node states in which jobs can run (sinfo %T; a trailing '*' = not responding).
USABLE_STATES = {"idle", "mixed", "allocated", "completing"}
# Job states after which a job will not run again (sacct/squeue spelling).
TERMINAL_STATES = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
}


def slurm_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") == "1"


def skip_or_fail(reason: str) -> None:
    """Skip with *reason*, or fail when CELLAVIE_REQUIRE_SLURM=1."""
    if slurm_required():
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1, so this is an error)", pytrace=False)
    pytest.skip(reason)


def run(args: Sequence[str], *, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, capture text output, raise with its output on failure."""
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    """What the tests know about the running cluster."""

    partition: str
    node: str
    node_state: str
    gres: str
    #: Environment for job submission: os.environ plus what Open MPI needs to
    #: run as root (jobs inherit the submitter's environment).
    env: dict

    # Helpers for tests (so that they need not import this conftest).
    run = staticmethod(run)
    skip_or_fail = staticmethod(skip_or_fail)

    def job_state(self, job_id: str) -> str:
        """State of *job_id* from sacct (allocation line), '' if not known yet."""
        proc = run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"], check=False, timeout=30)
        lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
        # "CANCELLED by 0" -> "CANCELLED"
        return lines[-1].split()[0] if lines else ""

    def wait_job(self, job_id: str, timeout: float = 120) -> str:
        """Poll sacct until *job_id* reaches a terminal state; return it."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in TERMINAL_STATES:
                return state
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} not finished after {timeout} s (last state {state!r})")


def probe_slurm() -> SlurmCluster:
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        skip_or_fail("Slurm not installed (no sinfo on PATH); run `make cluster-up`")
    try:
        proc = run([sinfo, "-h", "-N", "-o", "%N|%P|%T|%G"], check=False, timeout=20)
    except subprocess.TimeoutExpired:
        skip_or_fail("sinfo timed out; is slurmctld running? run `make cluster-up`")
    if proc.returncode != 0:
        skip_or_fail(f"sinfo failed (rc {proc.returncode}): {proc.stderr.strip()}; run `make cluster-up`")
    rows = [ln.split("|") for ln in proc.stdout.splitlines() if ln.count("|") == 3]
    usable = [r for r in rows if r[2].rstrip("*~#!%$@^-+") in USABLE_STATES and not r[2].endswith("*")]
    if not usable:
        skip_or_fail(f"no usable Slurm node (sinfo: {proc.stdout.strip()!r}); run `make cluster-up`")
    # Prefer the default partition (sinfo marks it with '*').
    usable.sort(key=lambda r: not r[1].endswith("*"))
    node, partition, state, gres = usable[0]
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return SlurmCluster(partition=partition.rstrip("*"), node=node, node_state=state, gres=gres, env=env)


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """A reachable Slurm cluster, else skip (or fail with CELLAVIE_REQUIRE_SLURM=1)."""
    return probe_slurm()
