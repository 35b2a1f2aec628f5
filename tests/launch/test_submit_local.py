"""The embedded default: a sweep through submitit's LocalExecutor with real processes, no Slurm.

One sweep, run once per module: a single-rank point and a 2-rank MultiWorkerMirrored point (one
local task per rank, TF_CONFIG on loopback), then collect and report, then a re-submit that finds
nothing to do.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from cellavie_hpc.errors import ConfigError, UserError
from cellavie_hpc.launch.state import load_state, point_statuses
from cellavie_hpc.launch.submit import submit_sweep
from cellavie_hpc.launch.task import port_base, tf_config

SWEEP = {
    "name": "local",
    "dataset": {"generate": {"images": 3, "size": 128, "seed": 0}},
    "base": {"model": {"name": "unet", "preset": "tiny"}, "data": {"patch": 32, "eval_images": 1},
             "train": {"batch_per_replica": 2, "steps": 3, "log_every": 1, "warmup_record_steps": 1,
                       "intra_op_threads": 1, "inter_op_threads": 1}},
    "points": [{"backend": "single"}, {"backend": "multiworker", "gpus_per_node": 2}],
    "cluster": {"time_min": 5, "signal_delay_s": 30, "local_parallelism": 2},
}


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local sweep")
    path = tmp / "local.yaml"
    path.write_text(yaml.safe_dump(SWEEP))
    out = tmp / "it's here"
    proc = subprocess.run([sys.executable, "-m", "cellavie_hpc", "sweep", "submit", str(path), "--cluster", "local",
                           "--out", str(out)], capture_output=True, text=True, timeout=500)
    return path, out, proc


@pytest.mark.slow
def test_local_sweep_runs_every_rank_then_collects_and_reports(local_sweep):
    _, out, proc = local_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_state(out)
    assert [e.ranks for e in state.points] == [1, 2]
    for e in state.points:
        assert e.submissions[-1].cluster == "local" and e.submissions[-1].array_index is None
        for rank in range(e.ranks):
            lines = [json.loads(ln) for ln in (out / e.run_dir / "records" / f"rank-{rank:05d}.jsonl").open()]
            assert lines[0]["world_size"] == e.ranks and lines[0]["rank"] == rank
            assert lines[-1]["kind"] == "final" and lines[-1]["status"] == "completed" and lines[-1]["steps"] == 3
    assert [s.status for s in point_statuses(out)] == ["done", "done"]
    assert json.loads((out / "sweep.json").read_text())["points"][1]["status"] == "done"
    assert (out / "results").is_dir() and (out / "report").is_dir() and f"report: {out / 'report'}" in proc.stdout


@pytest.mark.slow
def test_submitting_again_finds_nothing_to_do(local_sweep):
    path, out, proc = local_sweep
    assert proc.returncode == 0
    result = submit_sweep(path, out=out, cluster="local")
    assert result.submitted == [] and set(result.skipped.values()) == {"done"}
    changed = dict(SWEEP, points=[{"backend": "single", "steps": 4}])
    other = path.with_name("other.yaml")
    other.write_text(yaml.safe_dump(changed))
    with pytest.raises(UserError, match="holds another sweep"):
        submit_sweep(other, out=out, cluster="local")


def test_multi_node_points_cannot_run_locally(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(dict(SWEEP, points=[{"backend": "horovod", "nodes": 2, "gpus_per_node": 1}])))
    with pytest.raises(ConfigError, match=r"point 0 .*'nodes'.*local executor"):
        submit_sweep(path, out=tmp_path / "o", cluster="local", dry_run=True)
    assert not (tmp_path / "o").exists()


def test_ports_and_tf_config_agree_across_ranks():
    assert port_base("12345") == port_base("12345_7".split("_")[0]) == 20000 + 345 * 16
    assert port_base(1) - port_base(0) == 16 and 20000 <= port_base(10**9 + 1999) <= 65000 - 16
    configs = [json.loads(tf_config(r, 2, 30000)) for r in range(2)]
    assert configs[0]["cluster"] == configs[1]["cluster"] == {"worker": ["localhost:30000", "localhost:30001"]}
    assert [c["task"]["index"] for c in configs] == [0, 1]
