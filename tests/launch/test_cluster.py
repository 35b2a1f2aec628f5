"""Real-behaviour tests of the one-node dev/CI Slurm cluster (``make cluster-up``).

Skipped when Slurm is not reachable, failed instead with CELLAVIE_REQUIRE_SLURM=1.
Jobs are submitted with the test's environment (``slurm_cluster.env``, which
adds OMPI_ALLOW_RUN_AS_ROOT[_CONFIRM]=1) and ``sys.executable`` as interpreter.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest



def run(args, *, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


MPI_SNIPPET = "from mpi4py import MPI; c = MPI.COMM_WORLD; print(c.Get_rank(), c.Get_size(), flush=True)"


def _sbatch_wait(cluster: "SlurmCluster", tmp_path: Path, *args: str, wrap: str) -> tuple[str, str]:
    """Submit a batch job with --wait; return (job id, its stdout text)."""
    out = tmp_path / "job-%j.out"
    proc = run(
        ["sbatch", "--parsable", "--wait", f"--partition={cluster.partition}", f"--chdir={tmp_path}",
         f"--output={out}", "--time=5", *args, f"--wrap={wrap}"],
        env=cluster.env,
        timeout=180,
    )
    job_id = proc.stdout.strip().split(";")[0]
    text = (tmp_path / f"job-{job_id}.out").read_text()
    return job_id, text


def test_node_has_fake_gpus(slurm_cluster: "SlurmCluster") -> None:
    assert "gpu:4" in slurm_cluster.gres, slurm_cluster
    proc = run(["scontrol", "show", "config"])
    config = dict(
        (k.strip(), v.strip()) for k, _, v in (ln.partition("=") for ln in proc.stdout.splitlines()) if _
    )
    assert config["MpiDefault"] == "pmix"
    assert config["AccountingStorageType"] == "accounting_storage/slurmdbd"
    assert config["JobRequeue"] == "1"


def test_srun_mpi4py_two_ranks(slurm_cluster: "SlurmCluster", tmp_path: Path) -> None:
    if run([sys.executable, "-c", "import mpi4py"], check=False).returncode != 0:
        slurm_cluster.skip_or_fail(f"mpi4py not importable by {sys.executable}")
    proc = run(
        ["srun", "--mpi=pmix", "-n", "2", f"--partition={slurm_cluster.partition}", "--time=5",
         sys.executable, "-c", MPI_SNIPPET],
        env=slurm_cluster.env,
        cwd=tmp_path,
    )
    assert sorted(proc.stdout.split("\n")[:-1]) == ["0 2", "1 2"], proc


@pytest.mark.parametrize(
    "gpu_args",
    [("--gpus-per-node=2",), ("--gres=gpu:2",), ("--gpus-per-task=1",)],
    ids=["gpus-per-node", "gres", "gpus-per-task"],
)
def test_sbatch_gpus_two_tasks(slurm_cluster: "SlurmCluster", tmp_path: Path, gpu_args, record_property) -> None:
    job_id, out = _sbatch_wait(
        slurm_cluster, tmp_path, "-n", "2", *gpu_args,
        wrap='srun bash -c \'echo "task=$SLURM_PROCID cvd=$CUDA_VISIBLE_DEVICES"\'',
    )
    lines = sorted(ln for ln in out.splitlines() if ln.startswith("task="))
    record_property("cuda_visible_devices", lines)
    print(gpu_args, lines)
    assert [ln.split()[0] for ln in lines] == ["task=0", "task=1"], out
    per_task = [ln.split("cvd=")[1] for ln in lines]
    assert all(per_task), f"a task saw no CUDA_VISIBLE_DEVICES: {lines}"
    for cvd in per_task:
        assert set(cvd.split(",")) <= {"0", "1", "2", "3"}, cvd
    if gpu_args == ("--gpus-per-task=1",):
        # Slurm binds one GPU per task: each task gets its own device.
        assert len(set(per_task)) == 2 and all("," not in c for c in per_task), lines
    else:
        # --gres/--gpus-per-node: every task sees all the job's GPUs on the node.
        assert all(sorted(c.split(",")) == ["0", "1"] for c in per_task), lines
    assert slurm_cluster.wait_job(job_id) == "COMPLETED"


def test_sacct_reports_completed(slurm_cluster: "SlurmCluster", tmp_path: Path) -> None:
    job_id, _ = _sbatch_wait(slurm_cluster, tmp_path, "-n", "1", wrap="true")
    assert slurm_cluster.wait_job(job_id, timeout=60) == "COMPLETED"


def test_four_tasks_then_dependent_job(slurm_cluster: "SlurmCluster", tmp_path: Path) -> None:
    first = run(
        ["sbatch", "--parsable", "-n", "4", f"--chdir={tmp_path}", "--output=first.out", "--time=5",
         "--wrap=srun bash -c 'echo rank $SLURM_PROCID'; sleep 1"],
        env=slurm_cluster.env,
    ).stdout.strip()
    second = run(
        ["sbatch", "--parsable", "-n", "1", f"--dependency=afterok:{first}", f"--chdir={tmp_path}",
         "--output=second.out", "--time=5", "--wrap=echo dependent"],
        env=slurm_cluster.env,
    ).stdout.strip()
    assert slurm_cluster.wait_job(first) == "COMPLETED"
    assert slurm_cluster.wait_job(second) == "COMPLETED"
    ranks = sorted((tmp_path / "first.out").read_text().split("\n")[:-1])
    assert ranks == [f"rank {i}" for i in range(4)]
    assert (tmp_path / "second.out").read_text().strip() == "dependent"


def test_requeue_restarts_job(slurm_cluster: "SlurmCluster", tmp_path: Path) -> None:
    job_id = run(
        ["sbatch", "--parsable", "-n", "1", "--requeue", f"--chdir={tmp_path}", "--open-mode=append",
         "--output=requeue.out", "--time=5",
         "--wrap=echo restart=$SLURM_RESTART_COUNT; sleep 120"],
        env=slurm_cluster.env,
    ).stdout.strip()
    out = tmp_path / "requeue.out"
    try:
        _wait_for(lambda: out.exists() and "restart=" in out.read_text(), 60, "first run to start")
        run(["scontrol", "requeue", job_id])
        # Slurm holds a requeued job ~2 minutes (Reason=BeginTime).  Release it
        # early, but not within the second of the requeue: slurmd then refuses
        # the launch ("Job credential revoked") and the job FAILS.
        _wait_for(
            lambda: run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False).stdout.strip() == "PENDING",
            30, "requeued job to be pending",
        )
        time.sleep(2)
        run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
        _wait_for(lambda: "restart=1" in out.read_text(), 60, "requeued job to restart")
    finally:
        run(["scancel", job_id], check=False)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ------------------------------------------------------------------ submitit ---

@pytest.fixture
def executor(slurm_cluster: "SlurmCluster", tmp_path: Path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    # submitit's sbatch jobs inherit this process's environment.
    monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT", "1")
    monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    ex = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    ex.update_parameters(timeout_min=5, slurm_partition=slurm_cluster.partition)
    return ex


def _wait_done(job, timeout: float = 120) -> None:
    _wait_for(job.done, timeout, f"submitit job {job.job_id}")


def test_submitit_returns_result(executor, slurm_cluster) -> None:
    job = executor.submit(pow, 2, 10)
    _wait_done(job)
    assert job.result() == 1024
    # submitit's own state comes from sacct, polled lazily; ask sacct directly.
    assert slurm_cluster.wait_job(job.job_id) == "COMPLETED"


def test_submitit_two_tasks_global_rank(executor) -> None:
    def _rank_info() -> tuple[int, int]:
        # Local function: cloudpickle ships it by value (the job cannot import this test module).
        import submitit

        env = submitit.JobEnvironment()
        return env.global_rank, env.num_tasks

    executor.update_parameters(nodes=1, tasks_per_node=2)
    job = executor.submit(_rank_info)
    _wait_done(job)
    assert sorted(job.results()) == [(0, 2), (1, 2)]


def test_submitit_cancelled_job_is_done(executor) -> None:
    # Needs accounting: submitit reads states through sacct.
    job = executor.submit(time.sleep, 300)
    _wait_for(lambda: job.state in ("RUNNING", "PENDING"), 60, "job to be queued")
    job.cancel(check=True)
    _wait_done(job, timeout=60)
    assert job.state.startswith("CANCELLED")
