"""The methodology runs points through the real engine and leaves standard records the collector reads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellavie_hpc.cli import main as cli_main
from cellavie_hpc.errors import ConfigError
from cellavie_hpc.perf import methodology as m
from cellavie_hpc.records.schema import validate
from cellavie_hpc.train.config import resolve

ROOT = Path(__file__).resolve().parents[2]


def test_each_axis_is_a_study_around_the_reference_point():
    ref = m.BenchPoint(batch=8, patch=64)
    points = m.Methodology(ref, {"batch": (4, 8), "precision": m.PRECISIONS}, repeats=2).points()
    assert len(points) == (2 + 4) * 2
    batch_study = [p for p in points if p.study == "batch"]
    assert sorted({p.batch for p in batch_study}) == [4, 8] and {p.precision for p in batch_study} == {"fp32"}
    assert {p.precision for p in points if p.study == "precision"} == set(m.PRECISIONS)
    assert len({p.run_id for p in points}) == len(points)  # repeats and studies never share a run directory


def test_points_are_valid_training_configurations(tmp_path):
    for precision in m.PRECISIONS:
        for pipeline, settings in m.PIPELINES.items():
            point = m.BenchPoint(precision=precision, pipeline=pipeline, steps_per_execution=4, images=3)
            config = resolve(point.training_config(tmp_path))  # the engine's own validation
            assert config.train.precision == ("fp32" if precision == "tf32" else precision)
            assert config.train.tf32 == (precision == "tf32")
            assert (config.data.cache, config.data.prefetch, config.data.parallel_reads) == tuple(settings.values())
            assert config.train.steps_per_execution == 4 and config.data.max_images == 3
            assert config.run.point["precision"] == precision and config.run.point["pipeline"] == pipeline


def test_bad_points_and_axes_are_refused():
    with pytest.raises(ConfigError, match="precision 'fp8'"):
        m.BenchPoint(precision="fp8")
    with pytest.raises(ConfigError, match="nothing would be measured"):
        m.BenchPoint(steps=3, warmup_steps=3)
    with pytest.raises(ConfigError, match="unknown methodology axis 'bach'"):
        m.Methodology(m.BenchPoint(), {"bach": (1,)}).points()


def test_the_single_gpu_sweep_file_runs_as_one_device_points(tmp_path):
    configs = m.sweep_configs(ROOT / "jobs" / "single_gpu.yaml", tmp_path, scale="smoke")
    assert len(configs) == 2 * 2 * 1 * 2 * 2  # batch x patch x precision x xla x repeats of the smoke scale
    assert not any(c["train"].get("tf32") for c in configs)
    assert {(c["train"]["batch_per_replica"], c["data"]["patch"], c["train"]["xla"]) for c in configs} == {
        (b, p, x) for b in (2, 4) for p in (32, 64) for x in (False, True)}
    assert (tmp_path / "dataset" / "manifest.json").exists()


def test_bench_cli_rejects_a_scale_without_a_sweep(tmp_path, capsys):
    assert cli_main(["bench", "--out", str(tmp_path), "--scale", "smoke"]) == 2
    assert "--sweep" in capsys.readouterr().err


@pytest.mark.slow
def test_points_train_through_the_engine_and_the_collector_reads_them(tmp_path):
    ref = m.BenchPoint(patch=32, batch=4, steps=6, warmup_steps=2, images=3)
    method = m.Methodology(ref, {"precision": ("fp32", "tf32")}, repeats=1)
    dataset = m.ensure_dataset(tmp_path, *m.dataset_size_for(method.points()))
    runs = m.run_points(m.methodology_configs(method, dataset), tmp_path / "runs", progress=False)
    assert [r.returncode for r in runs] == [0, 0], [r.error for r in runs]
    for run in runs:
        lines = (run.run_dir / "records" / "rank-00000.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert all(validate(r) == [] for r in records)
        assert [r["kind"] for r in records].count("step") == 6 and records[-1]["status"] == "completed"
        assert records[0]["point"]["study"] == "precision" and records[0]["warmup_steps"] == 2
    points = m.summarize(tmp_path / "runs", tmp_path / "results")
    assert sorted(points["point.precision"]) == ["fp32", "tf32"]
    assert (points["throughput_samples_per_s"] > 0).all() and (points["mem_peak_bytes_max"] > 2**20).all()
    assert (points["train_flops_per_s"] == 3 * points["achieved_flops_per_s"]).all()
    assert ((points["input_wait_share"] >= 0) & (points["input_wait_share"] < 1)).all()
    assert (tmp_path / "results" / "points.parquet").exists()
    table = m.format_table(points)
    assert "tf32" in table and "samples/s" in table.splitlines()[0]
