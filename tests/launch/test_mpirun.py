"""The one local mpirun command line: its arguments either side of the core count, and real launches."""
from __future__ import annotations

import os
import subprocess

import pytest
from _requirements import require_mpirun

from cellavie_hpc.errors import UserError
from cellavie_hpc.launch import comm_probe
from cellavie_hpc.launch.mpirun import LOOPBACK, local_mpirun, root_environment, usable_cores

COMMON = ["--use-hwthread-cpus", "--bind-to", "none", *LOOPBACK]


def test_oversubscribe_only_with_more_ranks_than_cores():
    mpirun = require_mpirun()
    assert local_mpirun(2, cores=4, in_slurm=False) == [mpirun, "-np", "2", *COMMON]
    assert local_mpirun(4, cores=4, in_slurm=False) == [mpirun, "-np", "4", *COMMON]
    assert local_mpirun(5, cores=4, in_slurm=False) == [mpirun, "-np", "5", "--oversubscribe", *COMMON]
    # inside an allocation Open MPI counts the allocation's tasks as slots, not the cores
    assert local_mpirun(2, cores=4, in_slurm=True) == [mpirun, "-np", "2", "--oversubscribe", *COMMON]
    with pytest.raises(UserError, match="0 ranks"):
        local_mpirun(0)


def test_run_as_root_only_for_root():
    assert root_environment(euid=0) == {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    assert root_environment(euid=1000) == {}


def test_comm_probe_launches_through_it(tmp_path):
    require_mpirun()
    [(argv, env)] = comm_probe.local_commands("mpi4py", "mpirun", tmp_path, nproc=3)
    assert argv[:len(local_mpirun(3))] == local_mpirun(3) and env == root_environment()


@pytest.mark.parametrize("extra", [0, 1], ids=["as many ranks as cores", "one rank more than cores"])
def test_every_rank_starts_either_side_of_the_core_count(extra):
    """Open MPI refuses more ranks than slots without --oversubscribe: both cases must really start."""
    require_mpirun()
    nproc = usable_cores() + extra
    proc = subprocess.run([*local_mpirun(nproc), "printenv", "OMPI_COMM_WORLD_SIZE"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **root_environment()})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(nproc)] * nproc
