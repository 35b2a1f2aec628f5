"""`cellavie collect`, then `report`, then `plan` on a hand-made sweep directory (the real CLI entry point)."""
from __future__ import annotations

import json

import matplotlib.image as mpimg
import pandas as pd
import pytest

import records_factory as rf
from cellavie_hpc.cli import main


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    for n in (1, 2, 4):
        for rep in range(2):
            # step time 0.1 s on one GPU, +0.02 s per doubling beyond it; repeat 1 is 5% slower
            t = (0.1 + 0.02 * {1: 0, 2: 1, 4: 2}[n]) * (1.05 if rep else 1.0)
            rf.write_run(root / f"n{n}" / f"rep{rep}", world_size=n, steps=8, step_time_s=t, images_per_epoch=50,
                         point={"model": "unet", "backend": "horovod", "nodes": 1, "gpus_per_node": n, "repeat": rep})
    rf.write_run(root / "n4" / "crashed", world_size=4, steps=8, ranks=[0, 1, 2],
                 point={"model": "unet", "backend": "horovod", "nodes": 1, "gpus_per_node": 4, "repeat": 2})
    rf.append_raw(root / "n4" / "crashed", 2, '{"kind":"step","ste')
    (root / "sweep.json").write_text(json.dumps({"sweep": {"name": "cli-test"}, "points": []}))
    return root


def test_collect_report_plan(sweep, tmp_path, capsys):
    results, report = tmp_path / "results", tmp_path / "report"
    assert main(["collect", str(sweep), "--out", str(results), "--quiet"]) == 0
    out = capsys.readouterr()
    assert "7 runs (6 complete)" in out.out and "n4/crashed: rank(s) 3 of world size 4" in out.err
    runs = pd.read_parquet(results / "runs.parquet").set_index("run_dir")
    assert runs.loc["n4/crashed", "status"] == "incomplete" and runs.loc["n4/crashed", "partial_lines"] == 1
    assert runs.loc["n2/rep0", "throughput_samples_per_s"] == pytest.approx(16 / 0.12)

    assert main(["report", str(results), "--out", str(report), "--bootstrap", "20"]) == 0
    scaling = pd.read_csv(report / "tables" / "scaling.csv")
    weak = scaling[scaling["scaling"] == "weak"].set_index("gpus")
    assert weak.loc[4, "efficiency"] == pytest.approx((32 / 0.14) / (4 * 80.0))  # medians of the repeats
    for name in ("scaling", "bottleneck", "projection", "calibration", "incomplete"):
        for ext in ("csv", "tex", "md"):
            assert (report / "tables" / f"{name}.{ext}").stat().st_size > 0
    assert r"\toprule" in (report / "tables" / "scaling.tex").read_text()
    png = report / "figures" / "efficiency_weak_horovod.png"
    assert mpimg.imread(png).ndim == 3 and (report / "figures" / "efficiency_weak_horovod.pdf").read_bytes()[:4] == b"%PDF"
    md = (report / "report.md").read_text()
    html = (report / "report.html").read_text()
    for doc in (md, html):
        assert "n4/crashed" in doc and "cli-test" in doc and "2.21.0" in doc and "Projections (projected" in doc
    assert "data:image/png;base64," in html and "figures/efficiency_weak_horovod.png" in md
    calibration = json.loads((report / "calibration.json").read_text())
    assert calibration["series"][0]["samples_per_image"] == pytest.approx(6400 / 50)

    assert main(["plan", str(results), "--images", "5000", "--deadline", "30m", "--epochs", "2"]) == 0
    answer = capsys.readouterr().out
    assert "640,000 samples x 2 epoch(s) within 0.50 h" in answer and "GPU(s)" in answer
    assert main(["plan", str(results), "--tiles", "1000", "--gpus", "2"]) == 0
    assert "on 2 GPU(s)" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "runs.parquet: not found; run `cellavie collect" in capsys.readouterr().err
    assert main(["collect", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2
    assert "no such sweep directory" in capsys.readouterr().err


def test_plan_with_measured_allreduce_fit(sweep, tmp_path, capsys):
    """--comm replaces the fitted exchange by the measured one: a 0.5 s allreduce latency slows 4 GPUs down."""
    import re

    from cellavie_hpc.report.comm_model import CommFit, write_comm_fits

    results = tmp_path / "results"
    assert main(["collect", str(sweep), "--out", str(results), "--quiet"]) == 0
    slow = CommFit(engine="slow-ring", algorithm="ring", alpha_s=0.5, inv_bandwidth_s_per_byte=0.0, alpha_std_s=0.0,
                   inv_bandwidth_std_s_per_byte=0.0, bandwidth_p5_bytes_per_s=1e9, bandwidth_p95_bytes_per_s=1e9,
                   points=4, world_sizes=(2, 4), rms_rel_error=0.0, max_rel_error=0.0, gradient_bytes=1e6)
    fits = write_comm_fits([slow, CommFit(**{**slow.__dict__, "engine": "other"})], tmp_path / "comm.json")
    capsys.readouterr()

    def hours(*extra):
        assert main(["plan", str(results), "--tiles", "1e6", "--gpus", "4", "--bootstrap", "10", *extra]) == 0
        out = capsys.readouterr().out
        return float(re.search(r"GPU\(s\): ([0-9.]+) h", out).group(1)), out

    fitted, out = hours()
    assert "exchange term: fitted" in out
    measured, out = hours("--comm", str(fits), "--comm-engine", "slow-ring")
    assert "exchange term: measured: slow-ring" in out
    # 1e6 samples / 4 GPUs / 8 per step = 31,250 steps, each with a 2(N-1) x 0.5 s = 3 s ring exchange; t0 + c b
    # are refitted under it (non-negative, so at most the fitted model's whole step time).
    exchange_h = 31_250 * 3.0 / 3600
    assert exchange_h - 0.01 <= measured <= exchange_h + fitted + 0.01 and fitted < 2.0
    assert main(["plan", str(results), "--tiles", "1000", "--gpus", "4", "--comm", str(fits)]) == 2
    assert "engines in the file: slow-ring, other" in capsys.readouterr().err
    assert main(["plan", str(results), "--tiles", "1000", "--gpus", "4", "--comm-engine", "x"]) == 2
    assert "--comm-engine needs --comm FILE" in capsys.readouterr().err
