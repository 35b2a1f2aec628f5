"""The one local `mpirun` command line: every place that starts MPI ranks on this host builds it here.

Used by the local executor's Horovod points (`launch/task.py`), the allreduce probe
(`launch/comm_probe.py`) and the exchange benchmark, so that they measure and run under the same policy:

* `--oversubscribe` only when there are more ranks than usable cores, or inside a Slurm allocation
  (there Open MPI takes its slots from the allocation's task count, not from the cores, and would refuse
  two local ranks in a one-task job). Open MPI refuses to start more ranks than slots without it, but
  with it idle ranks yield their core in every wait, which the comm probe measured as a scheduler slice
  added to each message on a busy host.
* `--use-hwthread-cpus`: slots are hardware threads, the unit `usable_cores` counts (Open MPI counts
  physical cores by default, which would refuse 2 ranks on 1 core with 2 threads).
* `--bind-to none`: several local jobs share the host; Open MPI's default binding would pin each job's
  rank 0 to the same core.
* TCP on the loopback interface only (shared memory between local ranks anyway): a host's other
  interfaces (containers, VPNs) can make Open MPI hang while it probes them. Shared memory without the
  CMA single-copy path, which needs ptrace rights that containers often lack.

Open MPI refuses to run as root unless told so by `OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)`: `root_environment`
gives those variables, only to a root process.
"""
from __future__ import annotations

import os
import shutil

from cellavie_hpc.errors import UserError

LOOPBACK = ["--mca", "btl", "self,vader,tcp", "--mca", "btl_tcp_if_include", "lo",
            "--mca", "oob_tcp_if_include", "lo", "--mca", "btl_vader_single_copy_mechanism", "none"]


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask: what a Slurm cgroup or taskset leaves it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity mask
        return os.cpu_count() or 1


def local_mpirun(nproc: int, cores: int | None = None, in_slurm: bool | None = None) -> list[str]:
    """`mpirun -np NPROC ...` for `nproc` ranks on this host (`cores`: usable cores, measured when None;
    `in_slurm`: inside a Slurm allocation, from SLURM_JOB_ID when None); append the rank's command to it."""
    if nproc < 1:
        raise UserError(f"local mpirun: {nproc} ranks; need at least 1")
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise UserError(f"{nproc} local MPI ranks need Open MPI's mpirun on PATH (apt-get install openmpi-bin)")
    in_slurm = "SLURM_JOB_ID" in os.environ if in_slurm is None else in_slurm
    crowded = ["--oversubscribe"] if in_slurm or nproc > (usable_cores() if cores is None else cores) else []
    return [mpirun, "-np", str(nproc), *crowded, "--use-hwthread-cpus", "--bind-to", "none", *LOOPBACK]


def root_environment(euid: int | None = None) -> dict[str, str]:
    """The variables that let Open MPI run as root, for a root process (`euid`, this process's when None); else {}."""
    euid = os.geteuid() if euid is None else euid
    return {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"} if euid == 0 else {}
