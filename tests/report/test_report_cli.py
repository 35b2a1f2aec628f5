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
