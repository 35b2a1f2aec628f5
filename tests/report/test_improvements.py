"""Improvements: ratios of medians and their bootstrap intervals by hand, missing baselines, per-variant projections."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import records_factory as rf
from cellavie_hpc.cli import main
from cellavie_hpc.report import calibration, plots
from cellavie_hpc.report.collect import collect, collect_runs, combine_repeats
from cellavie_hpc.report.improvements import improvements_table, projected_improvements, ratio_of_medians
from cellavie_hpc.report.render import build_report

BATCH = 8
#: Step time (s) per variant: fp16 is 20% faster per step at every world size; accum4 equal to the baseline.
STEP_S = {"baseline": 0.100, "fp16": 0.080, "accum4": 0.100}
JITTER = (1.00, 1.05, 0.95)  # per repeat: medians are the middle value


def _point(backend, world, variant, repeat, index):
    return {"model": "unet", "backend": backend, "nodes": 1, "gpus_per_node": world, "batch_per_gpu": BATCH,
            "variant": variant, "repeat": repeat, "index": index, "world_size": world, "study": "improvements",
            "id": f"p{index:03d}-{backend}-unet-1x{world}-{variant}-r{repeat}"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """horovod at 1, 2, 4 GPUs (fp16, accum4); the 4-GPU baseline crashed (rank 3 missing)."""
    root = tmp_path_factory.mktemp("improvements")
    index = 0
    for world in (1, 2, 4):
        for repeat, jitter in enumerate(JITTER):
            for variant, t in STEP_S.items():
                step = t * jitter * (1 + 0.1 * (world - 1))
                ranks = [0, 1, 2] if (world, variant) == (4, "baseline") else None
                rf.write_run(root / "runs" / f"{index}", world_size=world, steps=8, step_time_s=step, ranks=ranks,
                             per_replica_batch=BATCH, point=_point("horovod", world, variant, repeat, index))
                index += 1
    return root


def test_ratio_of_medians_and_its_interval_by_hand():
    # Each median of 3 resampled values is 10 (p=7/27), 11 (13/27) or 12 (7/27), on both sides independently:
    # P(ratio = 10/12) = (7/27)^2 = 6.7% > 2.5%, so the 95% interval is exactly [10/12, 12/10].
    ratio, low, high = ratio_of_medians(np.array([10.0, 12.0, 11.0]), np.array([11.0, 10.0, 12.0]))
    assert ratio == 1.0 and low == pytest.approx(10 / 12) and high == pytest.approx(12 / 10)
    ratio, low, high = ratio_of_medians(np.array([15.0, 15.0]), np.array([10.0, 10.0, 10.0]))
    assert (ratio, low, high) == (1.5, 1.5, 1.5)  # no spread: the interval is the ratio


def test_improvements_table_from_records(sweep):
    runs = collect_runs([sweep], progress=False).runs
    table = improvements_table(runs).set_index(["gpus", "variant"])
    for world in (1, 2):
        base = [BATCH * world / (STEP_S["baseline"] * j * (1 + 0.1 * (world - 1))) for j in JITTER]
        fp16 = [BATCH * world / (STEP_S["fp16"] * j * (1 + 0.1 * (world - 1))) for j in JITTER]
        row = table.loc[(world, "fp16")]
        assert row["repeats"] == 3 and row["baseline_repeats"] == 3
        assert row["throughput_samples_per_s"] == pytest.approx(np.median(fp16))
        assert (row["throughput_min"], row["throughput_max"]) == pytest.approx((min(fp16), max(fp16)))
        assert row["ratio"] == pytest.approx(np.median(fp16) / np.median(base)) and row["ratio"] == pytest.approx(1.25)
        # every fp16 repeat beats every baseline repeat: the interval excludes 1
        assert min(fp16) / max(base) - 1e-9 <= row["ratio_ci_low"] < 1.25 < row["ratio_ci_high"] \
            <= max(fp16) / min(base) + 1e-9
        assert row["effect"] == "faster"
        accum = table.loc[(world, "accum4")]
        assert accum["ratio"] == pytest.approx(1.0) and accum["effect"] == "unresolved"
        assert accum["ratio_ci_low"] < 1 < accum["ratio_ci_high"]
        assert table.loc[(world, "baseline"), "ratio"] == 1.0
        assert row["exchange_share"] == pytest.approx(0.2) and row["input_wait_share"] == pytest.approx(0.1)
    # The 4-GPU baseline did not complete: no ratio (not one against another baseline), and the note says why.
    crashed = table.loc[(4, "fp16")]
    assert np.isnan(crashed["ratio"]) and crashed["effect"] == "no ratio"
    assert "no completed baseline run of horovod at 4 GPU(s)" in crashed["note"]
    assert (4, "baseline") not in table.index
    assert (table["source"] == "measured").all()


def test_each_variant_is_a_calibrated_series(sweep):
    points = combine_repeats(collect_runs([sweep], progress=False).runs)
    assert sorted(points["variant"].unique()) == ["accum4", "baseline", "fp16"]
    cals = calibration.calibrate(points, repeats=20)
    assert sorted(c.series["variant"] for c in cals) == ["accum4", "baseline", "fp16"]
    assert {c.label for c in cals} == {"unet horovod fp32 no-xla p128 " + v for v in ("accum4", "baseline", "fp16")}


def test_projection_per_variant_is_labelled_projected():
    # Noise-free points from two known models: fp16 halves the bandwidth term gamma.
    params = {"baseline": [0.01, 0.004, 0.0005, 0.04], "fp16": [0.01, 0.004, 0.0005, 0.02]}
    rows = [{"model": "unet", "backend": "horovod", "precision": "fp32", "xla": False, "patch": 64, "variant": v,
             "world_size": n, "batch_per_gpu": 8,
             "throughput_samples_per_s": n * 8 / calibration.predict_step_time(p, n, 8)[0]}
            for v, p in params.items() for n in (1, 2, 4, 8)]
    cals = calibration.calibrate(pd.DataFrame(rows), repeats=30)
    table = projected_improvements(cals)
    assert (table["source"] == "projected").all() and set(table["gpus"]) == {1, 8, 64, 512}
    at512 = table[(table["gpus"] == 512)].set_index("variant")
    true = {v: 512 * 8 / calibration.predict_step_time(p, 512, 8)[0] for v, p in params.items()}
    assert at512.loc["fp16", "throughput_samples_per_s"] == pytest.approx(true["fp16"], rel=1e-6)
    assert at512.loc["fp16", "ratio"] == pytest.approx(true["fp16"] / true["baseline"], rel=1e-6)
    assert at512.loc["fp16", "ratio_p5"] == pytest.approx(at512.loc["fp16", "ratio"], rel=1e-6)  # exact data
    assert at512.loc["fp16", "extrapolated"]
    assert not table.set_index(["variant", "gpus"]).loc[("fp16", 8), "extrapolated"]
    assert at512.loc["baseline", "ratio"] == 1.0 and at512.loc["baseline", "note"] == "reference"
    alone = projected_improvements([c for c in cals if c.series["variant"] == "fp16"])
    assert alone["ratio"].isna().all() and alone["note"].str.contains("no calibrated baseline").all()
    assert projected_improvements([c for c in cals if c.series["variant"] == "baseline"]).empty


def test_report_has_the_improvements_section_and_plot(sweep, tmp_path, capsys):
    collect([sweep], tmp_path / "results", progress=False)
    written = build_report(tmp_path / "results", tmp_path / "report", bootstrap_repeats=20)
    tables = tmp_path / "report" / "tables"
    measured = pd.read_csv(tables / "improvements.csv")
    assert len(measured) == 3 * 3 - 1 and (measured["source"] == "measured").all()
    projected = pd.read_csv(tables / "improvements_projection.csv")
    assert (projected["source"] == "projected").all() and projected["gpus"].max() == 512
    assert set(projected["variant"]) == {"baseline", "fp16", "accum4"}
    assert r"\toprule" in (tables / "improvements.tex").read_text()
    md = (tmp_path / "report" / "report.md").read_text()
    measured_at, projected_at = md.index("## Improvements (measured)"), md.index("## Improvements projected")
    assert measured_at < md.index("improvement_ratio.png") < projected_at
    assert "| measured | unet | horovod | study=improvements" not in md  # one study: no setting label
    projected_md = md[projected_at:md.index("## Environment")]
    assert "| projected |" in projected_md and "| measured |" not in projected_md
    assert "no completed baseline run of horovod at 4 GPU(s)" in md
    assert tmp_path / "report" / "figures" / "improvement_ratio.png" in written["figures"]
    assert main(["plan", str(tmp_path / "results"), "--tiles", "1000", "--gpus", "2", "--bootstrap", "5"]) == 2
    assert "3 calibrated series match" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "results"), "--tiles", "1000", "--gpus", "2", "--bootstrap", "5",
                 "--variant", "fp16"]) == 0
    assert "p128 fp16: 1,000 samples" in capsys.readouterr().out

    data = plots.improvement_data(improvements_table(collect_runs([sweep], progress=False).runs))
    fig = plots.plot_improvements(data)
    assert [ax.get_title() for ax in fig.axes] == ["horovod"]
    drawn = {c.get_label(): c.lines[0] for c in fig.axes[0].containers}
    for label, group in data.groupby("label"):
        np.testing.assert_array_equal(drawn[label].get_xdata(), group["x"])
        np.testing.assert_allclose(group["x"], group["gpus"], rtol=0.05)  # nudged apart, not moved
        np.testing.assert_allclose(np.asarray(drawn[label].get_ydata(), float), group["ratio"])
    assert set(drawn) == {"accum4", "fp16"} and data["gpus"].tolist() == [1, 2, 1, 2]  # no ratio at 4: not drawn
