"""Allreduce probe: message sizes, record checks, and real 2-rank probes under mpirun (mpi4py) and horovodrun --gloo."""
from __future__ import annotations

import json

import numpy as np
import pytest
from _requirements import require_horovod, require_mpirun

from cellavie_hpc.errors import DataError, UserError
from cellavie_hpc.launch import comm_probe as cp

NPROC = 2


def test_message_sizes():
    assert cp.message_sizes(31_050_124) == [4096 * 4 ** k for k in range(7)] + [31_050_124]
    assert cp.message_sizes(4096) == [4096]
    assert cp.message_sizes(70_001, 4096, 16) == [4096, 65536, 70_000]  # whole fp32 elements
    with pytest.raises(UserError, match="min_bytes"):
        cp.message_sizes(1000)


def _fake_rank(run_dir, rank, world=2, sizes=(4096, 16384), completed=True):
    path = cp.comm_file(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [{"kind": "comm_header", "comm_schema_version": cp.COMM_SCHEMA_VERSION, "engine": "mpi4py",
              "transport": "mpi", "rank": rank, "world_size": world, "model": "unet", "gradient_bytes": max(sizes),
              "sizes": list(sizes)}]
    lines += [{"kind": "comm", "message_bytes": s, "times_s": [1e-5 * (rank + 1), 2e-5], "check_ok": True} for s in sizes]
    if completed:
        lines.append({"kind": "comm_final", "status": "completed", "sizes": len(sizes), "wall_s": 1.0})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_read_comm_run_takes_the_slowest_rank_and_names_problems(tmp_path):
    _fake_rank(tmp_path, 0)
    _fake_rank(tmp_path, 1)
    run = cp.read_comm_run(tmp_path)
    assert run.label == "mpi4py/mpi" and run.world_size == 2 and run.check_ok
    np.testing.assert_allclose(run.times_s, [[2e-5, 2e-5], [2e-5, 2e-5]])
    _fake_rank(tmp_path, 1, completed=False)
    with pytest.raises(DataError, match=r"rank-00001.jsonl: rank 1 did not complete"):
        cp.read_comm_run(tmp_path)
    cp.comm_file(tmp_path, 1).unlink()
    with pytest.raises(DataError, match=r"rank\(s\) \[1\] of 2 are missing"):
        cp.read_comm_run(tmp_path)
    with pytest.raises(DataError, match="no rank-XXXXX.jsonl"):
        cp.read_comm_run(tmp_path / "empty")


def _assert_complete(run, sizes, transport):
    assert run.world_size == NPROC and run.transport == transport and run.check_ok
    assert sorted(p.name for p in (run.run_dir / "comm").iterdir()) == ["rank-00000.jsonl", "rank-00001.jsonl"]
    assert run.message_bytes.tolist() == sizes and run.times_s.shape == (len(sizes), 8)
    assert np.all(run.times_s > 0)
    # Large messages are bandwidth-bound: 64x the bytes must take longer. Compared on the lower envelope
    # (fastest call), which other jobs sharing the cores can only raise; small messages are latency noise.
    fastest = run.times_s.min(axis=1)
    assert fastest[-1] > fastest[-2], fastest


def test_mpi4py_probe_under_mpirun(tmp_path):
    require_mpirun()
    args = ["--gradient-bytes", str(16 << 20), "--min-bytes", "4096", "--factor", "64", "--repeats", "8",
            "--warmup", "2"]
    run = cp.launch_local("mpi4py", "mpirun", tmp_path, NPROC, args, timeout_s=120)
    _assert_complete(run, [4096, 262144, 16 << 20], "mpi")
    fit = cp.fit_run(run, repeats=20)
    assert fit.alpha_s >= 0 and 1e7 < fit.bandwidth_bytes_per_s < 1e12 and fit.gradient_bytes == 16 << 20


@pytest.mark.horovod
@pytest.mark.slow
def test_horovod_probe_under_horovodrun_gloo(tmp_path):
    require_horovod()
    args = ["--gradient-bytes", str(16 << 20), "--min-bytes", "4096", "--factor", "64", "--repeats", "8",
            "--warmup", "2"]
    run = cp.launch_local("horovod", "horovodrun", tmp_path, NPROC, args, timeout_s=240)
    _assert_complete(run, [4096, 262144, 16 << 20], "gloo")
    header = json.loads(cp.comm_file(tmp_path, 1).read_text().splitlines()[0])
    assert header["engine"] == "horovod" and header["rank"] == 1 and header["versions"]["horovod"]
