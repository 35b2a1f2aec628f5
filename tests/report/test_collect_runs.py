"""Collect: hand-made runs whose throughput, shares, stragglers and status are known by hand."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import records_factory as rf
from cellavie_hpc.errors import DataError
from cellavie_hpc.records.reader import SchemaVersionError
from cellavie_hpc.report import stats
from cellavie_hpc.report.collect import collect, collect_runs, combine_repeats


def _run(collection, name):
    return collection.runs.set_index("run_dir").loc[name]


def test_throughput_shares_and_straggler_by_hand(tmp_path):
    # 2 ranks, 10 steps of 8 samples; steps 0-1 are warm-up (5 s). Rank 0: 0.1 s/step, rank 1: 0.2 s/step.
    rf.write_run(tmp_path / "two", world_size=2, steps=10, step_time_s=lambda r, s: 0.1 * (r + 1))
    run = _run(collect_runs([tmp_path], progress=False), "two")
    assert run["complete"] and run["status"] == "completed" and run["steps"] == 10
    assert run["warmup_steps_excluded"] == 2 and run["steps_measured"] == 8
    assert run["global_samples"] == 2 * 8 * 8
    assert run["throughput_samples_per_s"] == pytest.approx(128 / 1.6)  # slowest rank: 8 x 0.2 s
    assert run["throughput_per_gpu_samples_per_s"] == pytest.approx(40.0)
    assert run["step_time_median_s"] == pytest.approx(0.2)  # per step, the slowest rank
    assert (run["input_wait_share"], run["compute_share"], run["exchange_share"]) == pytest.approx((0.1, 0.7, 0.2))
    assert run["straggler_rank"] == 1
    assert run["straggler_ratio"] == pytest.approx(1.28 / 0.96)  # busy 0.8*1.6 over median of (0.64, 1.28)
    assert run["achieved_flops_per_s"] == pytest.approx(1e9 * 80.0)
    assert run["time_to_first_step_s"] == pytest.approx(2.0 + 5.0)
    assert run["mem_peak_bytes_max"] == 2 << 30 and run["mem_source"] == "device"


def test_missing_and_stopped_ranks_are_named_and_excluded(tmp_path):
    rf.write_run(tmp_path / "ok", world_size=2, steps=6)
    rf.write_run(tmp_path / "holes", world_size=4, steps=6, ranks=[0, 1, 3], stop_at={3: 4})
    rf.write_run(tmp_path / "failed", world_size=2, steps=6, status=lambda r: "failed" if r == 1 else "completed")
    c = collect_runs([tmp_path], progress=False)
    holes, failed = _run(c, "holes"), _run(c, "failed")
    assert not holes["complete"] and holes["status"] == "incomplete"
    assert holes["missing_ranks"] == "2" and holes["unfinished_ranks"] == "3"
    assert failed["status"] == "failed" and failed["failed_ranks"] == "1"
    messages = [p["message"] for p in c.problems if p["severity"] == "error"]
    assert "rank(s) 2 of world size 4: no records (or no header)" in messages
    assert "rank(s) 3 of world size 4: no final record (stopped)" in messages
    assert "rank(s) 1 of world size 2: a failed/preempted final record" in messages
    points = combine_repeats(c.runs)
    assert points["run_ids"].tolist() == ["ok"]
    assert set(combine_repeats(c.runs, include_incomplete=True)["run_ids"].str.split(",").sum()) == \
        {"ok", "holes", "failed"}


def test_compile_steps_detected_and_warmup_override(tmp_path):
    # The header declares no warm-up, but steps 0-2 take 5 s: detected as compile steps.
    rf.write_run(tmp_path / "r", world_size=1, steps=12, warmup_steps=3, header_warmup_steps=0)
    run = _run(collect_runs([tmp_path], progress=False), "r")
    assert run["warmup_steps_excluded"] == 3 and run["throughput_samples_per_s"] == pytest.approx(80.0)
    forced = _run(collect_runs([tmp_path], warmup_steps=6, progress=False), "r")
    assert forced["warmup_steps_excluded"] == 6 and forced["global_samples"] == 6 * 8


def test_measured_mask_per_attempt():
    step = np.arange(10)
    attempt = np.array([0] * 5 + [1] * 5)
    times = np.array([9, 1, 1, 1, 1, 8, 1, 1, 1, 1.0])  # a recompile after the requeue at step 5
    assert stats.measured_mask(step, attempt, times, 0).tolist() == [False] + [True] * 4 + [False] + [True] * 4
    assert stats.steps_per_record(np.array([9, 19, 29])).tolist() == [10, 10, 10]


def test_nan_loss_and_requeue_reported(tmp_path):
    run_dir = tmp_path / "nan"
    rf.append_records(run_dir, 0, [rf.header("nan", 0, 1, warmup_steps=0)] + [
        rf.step(s, wall_s=0.1, input_wait_s=0.0, compute_s=0.1, exchange_s=None, samples=8, t_unix=rf.T0_UNIX + s,
                loss=None if s >= 3 else 0.5) for s in range(6)] + [rf.final(6, 48, 0.6)])
    c = collect_runs([tmp_path], progress=False)
    run = _run(c, "nan")
    assert run["complete"] and run["nan_loss_steps"] == 3 and np.isnan(run["exchange_share"])
    assert any("loss is NaN/inf in 3 step(s), first at step 3" in p["message"] for p in c.problems)


def test_repeats_combined_median_min_max(tmp_path):
    for rep, t in enumerate((0.1, 0.2, 0.125)):
        rf.write_run(tmp_path / f"rep{rep}", world_size=1, steps=6, step_time_s=t,
                     point={"model": "unet", "nodes": 1, "repeat": rep})
    points = combine_repeats(collect_runs([tmp_path], progress=False).runs)
    assert len(points) == 1
    p = points.iloc[0]
    assert p["repeats"] == 3 and p["throughput_samples_per_s"] == pytest.approx(64.0)
    assert (p["throughput_min"], p["throughput_max"]) == pytest.approx((40.0, 80.0))


def test_sweep_json_names_points_without_records(tmp_path):
    rf.write_run(tmp_path / "runs" / "p0", world_size=1, steps=4)
    (tmp_path / "sweep.json").write_text(json.dumps({"sweep": {"name": "s"}, "points": [
        {"run_dir": "runs/p0", "point": {"nodes": 1}, "status": "done"},
        {"run_dir": "runs/p1", "point": {"nodes": 64}, "status": "failed"}]}))
    c, paths = collect([tmp_path], tmp_path / "res", progress=False)
    ghost = _run(c, "runs/p1")
    assert ghost["status"] == "failed" and not ghost["complete"] and ghost["point.nodes"] == 64
    summary = json.loads(paths["summary"].read_text())
    assert summary["runs"] == 2 and summary["complete"] == 1 and summary["sweeps"][str(tmp_path)]["sweep"]["name"] == "s"
    assert [r["run_dir"] for r in summary["incomplete_runs"]] == ["runs/p1"]
    for name in ("runs", "ranks", "points"):
        assert pd.read_parquet(tmp_path / "res" / f"{name}.parquet").shape == \
            pd.read_csv(tmp_path / "res" / f"{name}.csv").shape
    assert len(pd.read_parquet(tmp_path / "res" / "ranks.parquet")) == 1


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(DataError, match="no records found under"):
        collect_runs([tmp_path], progress=False)
    rf.append_records(tmp_path / "old", 0, [rf.header("old", 0, 1) | {"schema_version": 0}])
    with pytest.raises(SchemaVersionError, match="rank-00000.jsonl:1: schema_version 0"):
        collect_runs([tmp_path], progress=False)


def test_huge_and_uneven_step_numbers_keep_the_slowest_rank_per_step(tmp_path):
    """Step numbers near 2**62 (a resumed counter) must not size an array by the step number."""
    base = 2**62
    for rank, (wall, steps) in enumerate(((0.1, range(6)), (0.3, range(4)))):  # rank 1 logged fewer steps
        records = [rf.header("huge", rank, 2, warmup_steps=0)]
        records += [rf.step(base + s, wall_s=wall, input_wait_s=0.0, compute_s=wall, exchange_s=0.0, samples=8,
                            t_unix=rf.T0_UNIX + s) for s in steps]
        rf.append_records(tmp_path / "huge", rank, records + [rf.final(6, 48, 0.6)])
    run = _run(collect_runs([tmp_path], progress=False), "huge")
    assert run["steps_measured"] == 6
    # Per step the slowest rank: 0.3 s for the four steps both ranks logged, then 0.1 s.
    assert run["step_time_median_s"] == pytest.approx(0.3) and run["step_time_p10_s"] == pytest.approx(0.1)


def _startup_run(run_dir, rank, *, process_start=None, startup_total=None):
    """One rank: header at T0, first step ending at T0 + 5 s, optional process start and final startup_s."""
    extra = {} if process_start is None else {"process_start_unix": process_start}
    end = rf.final(2, 16, 6.0)
    if startup_total is not None:
        end["startup_s"] = {"import": 3.0, "backend": 0.5, "data": 1.0, "build": 2.0, "first_step": 1.0,
                            "total": startup_total}
    rf.append_records(run_dir, rank, [rf.header(run_dir.name, rank, 2, warmup_steps=0, **extra)] + [
        rf.step(s, wall_s=1.0, input_wait_s=0.0, compute_s=1.0, exchange_s=None, samples=8,
                t_unix=rf.T0_UNIX + 5 + s) for s in range(2)] + [end])


def test_time_to_first_step_prefers_startup_breakdown_then_process_start(tmp_path):
    _startup_run(tmp_path / "header", 0)
    _startup_run(tmp_path / "header", 1)
    _startup_run(tmp_path / "process", 0, process_start=rf.T0_UNIX - 20)
    _startup_run(tmp_path / "process", 1, process_start=rf.T0_UNIX - 30)  # the slowest rank
    _startup_run(tmp_path / "startup", 0, process_start=rf.T0_UNIX - 20, startup_total=12.5)
    _startup_run(tmp_path / "startup", 1, startup_total=7.5)
    c = collect_runs([tmp_path], progress=False)
    got = {name: (_run(c, name)["time_to_first_step_s"], _run(c, name)["startup_source"])
           for name in ("header", "process", "startup")}
    assert got == {"header": (5.0, "header"), "process": (35.0, "process_start"), "startup": (12.5, "startup_s")}
    ranks = c.ranks.set_index(["run_dir", "rank"])
    assert ranks.loc[("process", 0), "time_to_first_step_s"] == 25.0
    assert ranks.loc[("startup", 1), ["time_to_first_step_s", "startup_source"]].tolist() == [7.5, "startup_s"]


def test_tf32_runs_get_their_own_precision(tmp_path):
    config = {"model": {"name": "unet"}, "train": {"precision": "fp32", "tf32": True, "xla": False}, "data": {"patch": 128}}
    rf.write_run(tmp_path / "tf32", world_size=1, point={"precision": "tf32"}, config=config)
    rf.write_run(tmp_path / "fp32", world_size=1)
    runs = collect_runs([tmp_path], progress=False)
    assert (_run(runs, "tf32")["precision"], _run(runs, "fp32")["precision"]) == ("tf32", "fp32")
