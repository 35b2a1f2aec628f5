"""Sweeps on the real one-node Slurm (`make cluster-up`): arrays, records, status, GPUs, requeue, dry run.

Both sweeps are submitted once per module and run side by side, so the file takes about as long as
its slowest job: ~2 min on 2 cores, plus the 120 s Slurm holds a requeued job (cluster
`cred_expire`). Horovod points need Horovod (skip, or fail under
CELLAVIE_REQUIRE_HOROVOD=1).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from cellavie_hpc.launch.render import check_script
from cellavie_hpc.launch.state import load_state, point_statuses
from cellavie_hpc.launch.submit import submit_sweep

try:
    from _requirements import require_horovod
except ImportError:
    from tests._requirements import require_horovod

pytestmark = pytest.mark.slurm
BASE = {"model": {"name": "unet", "preset": "tiny"}, "data": {"patch": 32, "eval_images": 1},
        "train": {"batch_per_replica": 2, "steps": 3, "log_every": 1, "warmup_record_steps": 1,
                  "intra_op_threads": 1, "inter_op_threads": 1}}
TIMEOUT_S = 240


def sweep_file(tmp: Path, name: str, points: list, train: dict | None = None, **cluster) -> Path:
    spec = {"name": name, "dataset": {"generate": {"images": 3, "size": 128, "seed": 0}},
            "base": {**BASE, "train": {**BASE["train"], **(train or {})}}, "points": points,
            "cluster": {"partition": "debug", "time_min": 5, "signal_delay_s": 30, "cpus_per_task": 1, **cluster}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def records(run_dir: Path, rank: int) -> list[dict]:
    path = run_dir / "records" / f"rank-{rank:05d}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture(scope="module")
def sweeps(slurm_cluster, tmp_path_factory):
    """Submit the main sweep (arrays, 2-rank back-ends on fake GPUs) and the requeue sweep at once."""
    tmp = tmp_path_factory.mktemp("slurm sweeps")  # a space in every path
    tag = uuid.uuid4().hex[:6]
    main = sweep_file(tmp, f"arr{tag}", [
        {"backend": "single", "repeats": 2},
        {"backend": "horovod", "gpus_per_node": 2},
        {"backend": "multiworker", "gpus_per_node": 2},
    ], gpus="gres", node_gpus=4)
    requeue = sweep_file(tmp, f"rq{tag}", [{"backend": "single"}],
                         train={"steps": 40, "checkpoint_every": 2}, gpus="none")
    out = {name: tmp / name for name in ("main", "requeue")}
    results = {"main": submit_sweep(main, out=out["main"], cluster="slurm"),
               "requeue": submit_sweep(requeue, out=out["requeue"], cluster="slurm")}
    return {"cluster": slurm_cluster, "results": results, "dirs": out, "tag": tag}


def test_preempted_task_checkpoints_requeues_and_completes(sweeps):
    """First in the file: it must signal its job while the job is still running."""
    sweep_dir = sweeps["dirs"]["requeue"]
    entry = load_state(sweep_dir).points[0]
    job = entry.submissions[-1].job_id
    rank_file = sweep_dir / entry.run_dir / "records" / "rank-00000.jsonl"
    wait_until(lambda: rank_file.exists() and rank_file.read_text().count('"kind":"step"') >= 3, TIMEOUT_S,
               "3 step records")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    # Slurm holds a requeued job until its old credential expires (cred_expire, 120 s by default).
    assert sweeps["cluster"].wait_job(job, TIMEOUT_S) == "COMPLETED"
    rec = records(sweep_dir / entry.run_dir, 0)
    finals = [r["status"] for r in rec if r["kind"] == "final"]
    headers = [r for r in rec if r["kind"] == "header"]
    assert finals == ["preempted", "completed"] and len(headers) == 2
    assert headers[1]["attempt"] > headers[0]["attempt"] and headers[1]["slurm"]["restart_count"] == 1
    assert rec[-1]["steps"] == 40
    events = [json.loads(ln)["event"] for ln in (sweep_dir / entry.run_dir / "launch" / "task-00000.jsonl").open()]
    assert events[:2] == ["start", "checkpoint"] and events[-2:] == ["start", "end"]


def test_arrays_complete_with_ids_recorded_and_status(sweeps):
    sweep_dir = sweeps["dirs"]["main"]
    state = load_state(sweep_dir)
    subs = {e.id: e.submissions[-1] for e in state.points}
    single = [subs[e.id] for e in state.points if e.point["backend"] == "single"]
    assert len(single) == 2 and single[0].array_job_id == single[1].array_job_id is not None
    assert sorted(s.array_index for s in single) == [0, 1]
    assert {s.job_id for s in single} == {f"{single[0].array_job_id}_0", f"{single[0].array_job_id}_1"}
    for e in state.points:
        check_script((sweep_dir / "scripts" / f"{e.id}.sbatch").read_text())
    for sub_file in (sweep_dir / "submitit").glob("*_submission.sh"):
        check_script(sub_file.read_text(), str(sub_file))  # what submitit generated passes the same checks
    collect_id = sweeps["results"]["main"].collect_job
    collect_script = (sweep_dir / "submitit" / f"{collect_id}_submission.sh").read_text()
    depends = re.search(r"--dependency=afterany:([0-9:]+)", collect_script).group(1).split(":")
    assert sorted(depends) == sorted({e.submissions[-1].scheduler_id for e in state.points})
    for e in single:
        wait_until(lambda: sweeps["cluster"].job_state(e.job_id) in ("COMPLETED", "FAILED"), TIMEOUT_S, e.job_id)
    for e in state.points:
        if e.point["backend"] == "single":
            rec = records(sweep_dir / e.run_dir, 0)
            assert rec[0]["slurm"]["array_job_id"] == single[0].array_job_id and rec[-1]["status"] == "completed"
    statuses = {s.id: s for s in point_statuses(sweep_dir)}
    assert all(statuses[e.id].status == "done" for e in state.points if e.point["backend"] == "single")
    no_sacct = {s.id: s for s in point_statuses(sweep_dir, use_sacct=False)}
    assert all(no_sacct[e.id].status == "done" for e in state.points if e.point["backend"] == "single")
    status_cli = subprocess.run([sys.executable, "-m", "cellavie_hpc", "sweep", "status", str(sweep_dir), "--no-sacct"],
                                capture_output=True, text=True)
    assert status_cli.returncode == 0 and "done" in status_cli.stdout


def _two_rank_point(sweeps, backend: str) -> None:
    sweep_dir = sweeps["dirs"]["main"]
    entry = next(e for e in load_state(sweep_dir).points if e.point["backend"] == backend)
    job = entry.submissions[-1].job_id
    state = sweeps["cluster"].wait_job(job, TIMEOUT_S)
    run_dir = sweep_dir / entry.run_dir
    assert state == "COMPLETED", f"{backend} job {job}: {state}; see {sweep_dir / 'submitit'}"
    for rank in (0, 1):
        rec = records(run_dir, rank)
        header, final = rec[0], rec[-1]
        assert (header["rank"], header["world_size"], header["backend"]) == (rank, 2, backend)
        assert final["status"] == "completed" and final["steps"] == 3
    launches = [json.loads(ln) for r in (0, 1) for ln in (run_dir / "launch" / f"task-{r:05d}.jsonl").read_text().splitlines()]
    devices = {e["rank"]: e["cuda_visible_devices"] for e in launches if e["event"] == "start"}
    assert len(devices) == 2 and devices[0] != devices[1] and all(d and "," not in d for d in devices.values())


def test_horovod_two_tasks_under_srun_pmix(sweeps):
    require_horovod()
    _two_rank_point(sweeps, "horovod")


def test_multiworker_two_tasks_from_slurm(sweeps):
    _two_rank_point(sweeps, "multiworker")


def test_dry_run_and_malformed_sweeps_submit_nothing(sweeps, tmp_path):
    name = f"dry{sweeps['tag']}"
    good = sweep_file(tmp_path, name, [{"backend": "single"}])
    out = subprocess.run([sys.executable, "-m", "cellavie_hpc", "sweep", "submit", str(good), "--dry-run",
                          "--cluster", "slurm", "--out", str(tmp_path / "d")], capture_output=True, text=True)
    assert out.returncode == 0 and "nothing submitted" in out.stdout and "#SBATCH --partition=debug" in out.stdout
    bad = sweep_file(tmp_path, name, [{"backend": "mirrored", "nodes": 2}, {"backend": "single"}])
    err = subprocess.run([sys.executable, "-m", "cellavie_hpc", "sweep", "submit", str(bad), "--cluster", "slurm",
                          "--out", str(tmp_path / "b")], capture_output=True, text=True)
    assert err.returncode == 2 and "'nodes'" in err.stderr and "point 0" in err.stderr
    queued = subprocess.run(["squeue", "-h", "-n", name], capture_output=True, text=True).stdout
    accounted = subprocess.run(["sacct", "-X", "-n", "-P", "-S", "now-1hour", "--name", f"{name}-n1t1g1"],
                               capture_output=True, text=True).stdout
    assert queued.strip() == "" and accounted.strip() == ""
    assert not (tmp_path / "d").exists() and not (tmp_path / "b").exists()


def test_resubmit_only_submits_what_did_not_complete(sweeps):
    sweep_dir = sweeps["dirs"]["main"]
    for e in load_state(sweep_dir).points:
        sweeps["cluster"].wait_job(e.submissions[-1].job_id, TIMEOUT_S)
    sweeps["cluster"].wait_job(sweeps["results"]["main"].collect_job, TIMEOUT_S)
    assert (sweep_dir / "results").is_dir() and (sweep_dir / "report").is_dir()
    stored = {p["id"]: p["status"] for p in json.loads((sweep_dir / "sweep.json").read_text())["points"]}
    assert all(stored[e.id] == "done" for e in load_state(sweep_dir).points if e.point["backend"] == "single")
    before = {e.id: e.attempts for e in load_state(sweep_dir).points}
    done = {s.id for s in point_statuses(sweep_dir) if s.status == "done"}
    result = submit_sweep(resume=sweep_dir, dry_run=True)
    assert set(result.submitted) == set(before) - done
    assert set(result.skipped) == done
    assert {e.id: e.attempts for e in load_state(sweep_dir).points} == before  # dry run wrote nothing
