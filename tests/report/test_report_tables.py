"""Scaling and bottleneck tables against hand-computed efficiency; LaTeX/Markdown rendering."""
from __future__ import annotations

import pandas as pd
import pytest

import records_factory as rf
from cellavie_hpc.report.bottleneck import bottleneck_table
from cellavie_hpc.report.collect import collect_runs, combine_repeats
from cellavie_hpc.report.efficiency import scaling_table
from cellavie_hpc.report.render import Column, fmt_num, fmt_pct, latex_table, markdown_table


@pytest.fixture(scope="module")
def weak_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    # 1 GPU: 0.1 s/step of 8 -> 80/s.  4 GPUs: 0.125 s/step -> 256/s.  A failed 8-GPU run is excluded.
    rf.write_run(root / "n1", world_size=1, steps=6, step_time_s=0.1)
    rf.write_run(root / "n4", world_size=4, steps=6, step_time_s=lambda r, s: 0.125 if r == 2 else 0.1)
    rf.write_run(root / "n8", world_size=8, steps=6, step_time_s=0.1, status=lambda r: "failed" if r == 5 else "completed")
    return collect_runs([root], progress=False)


def test_weak_scaling_efficiency_by_hand(weak_sweep):
    table = scaling_table(combine_repeats(weak_sweep.runs))
    weak = table[table["scaling"] == "weak"].set_index("gpus")
    assert weak.index.tolist() == [1, 4]  # the failed 8-GPU run is not in any efficiency figure
    assert weak.loc[4, "throughput_samples_per_s"] == pytest.approx(256.0)
    assert weak.loc[4, "speedup"] == pytest.approx(3.2)
    assert weak.loc[4, "efficiency"] == pytest.approx(256.0 / (4 * 80.0))
    assert weak.loc[4, "epoch_time_s"] == pytest.approx(6400 / 256.0)
    assert (table["source"] == "measured").all() and weak.loc[1, "efficiency"] == pytest.approx(1.0)
    assert table[table["scaling"] == "strong"].empty  # each global batch was measured at one size only


def test_strong_scaling_is_t1_over_n_tn():
    points = pd.DataFrame({"model": "unet", "backend": "horovod", "world_size": [1, 2, 4], "nodes": 1,
                           "batch_per_gpu": [32, 16, 8], "global_batch": 32,
                           "throughput_samples_per_s": [100.0, 180.0, 300.0], "throughput_min": [90.0, 170.0, 280.0],
                           "throughput_max": [110.0, 190.0, 310.0], "repeats": 2, "samples_per_epoch": 3000})
    strong = scaling_table(points).set_index("gpus")
    t = {n: 3000 / x for n, x in zip((1, 2, 4), (100.0, 180.0, 300.0))}  # epoch times
    assert strong.loc[4, "efficiency"] == pytest.approx(t[1] / (4 * t[4]))
    assert strong.loc[2, "speedup_min"] == pytest.approx(1.7) and strong.loc[2, "speedup_max"] == pytest.approx(1.9)
    assert (strong["scaling"] == "strong").all() and strong["series"].iloc[0].endswith("B32")


def test_bottleneck_names_the_straggler(weak_sweep):
    table = bottleneck_table(weak_sweep.runs[weak_sweep.runs["complete"]], weak_sweep.ranks).set_index("run_id")
    assert table.loc["n4", "straggler_rank"] == 2 and table.loc["n4", "stragglers"] == "2"
    assert table.loc["n4", "straggler_ratio"] == pytest.approx(1.25)
    assert table.loc["n1", "stragglers"] == ""
    assert table.loc["n4", "exchange_share"] == pytest.approx(0.2)
    assert table.loc["n4", "mem_peak_gib"] == pytest.approx(2.0)


def test_latex_booktabs_and_markdown_escape():
    frame = pd.DataFrame({"name": ["a_b & 50%"], "x": [1234.5], "e": [0.875]})
    cols = [Column("name", "Name"), Column("x", "X (samples/s)", fmt_num(1)), Column("e", "Eff.", fmt_pct)]
    tex = latex_table(frame, cols, "Cap #1", "tab:t")
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex and r"\begin{tabular}{lrr}" in tex
    assert r"a\_b \& 50\% & 1,234.5 & 87.5\% \\" in tex and r"\caption{Cap \#1}" in tex
    md = markdown_table(frame, cols).splitlines()
    assert md == ["| Name | X (samples/s) | Eff. |", "|:---|---:|---:|", "| a_b & 50% | 1,234.5 | 87.5% |"]
