"""Figures: valid PNG and PDF files, and the drawn data equals the table handed to the plot function."""
from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from cellavie_hpc.report import plots

SCALING = pd.DataFrame({
    "backend": "horovod", "scaling": "weak", "series": ["unet b8/GPU"] * 3 + ["detector b4/GPU"] * 3,
    "baseline_gpus": 1, "gpus": [1, 2, 4] * 2, "speedup": [1, 1.9, 3.6, 1, 1.8, 3.0],
    "speedup_min": [1, 1.8, 3.5, 1, 1.7, 2.9], "speedup_max": [1, 2.0, 3.7, 1, 1.9, 3.1],
    "efficiency": [1, 0.95, 0.9, 1, 0.9, 0.75], "efficiency_min": [1, 0.9, 0.875, 1, 0.85, 0.725],
    "efficiency_max": [1, 1.0, 0.925, 1, 0.95, 0.775], "ideal_speedup": [1, 2, 4] * 2,
})


def _drawn(fig):
    """Label -> (x, y) of every plotted series: error-bar containers and plain lines (the ideal)."""
    ax = fig.axes[0]
    drawn = {line.get_label(): (line.get_xdata(), line.get_ydata()) for line in ax.get_lines()}
    for container in ax.containers:
        line = container.lines[0]
        drawn[container.get_label()] = (line.get_xdata(), line.get_ydata())
    return drawn


@pytest.mark.parametrize("metric", ["speedup", "efficiency"])
def test_scaling_plot_draws_the_table(tmp_path, metric):
    table = plots.scaling_data(SCALING, metric)
    fig = plots.plot_scaling(table, metric)
    drawn = _drawn(fig)
    for label, group in table.groupby("label"):
        np.testing.assert_array_equal(drawn[label][0], group["gpus"])
        np.testing.assert_array_equal(drawn[label][1], group["y"])
    np.testing.assert_array_equal(drawn["ideal"][1], [1, 2, 4] if metric == "speedup" else [1, 1, 1])
    assert table["y"].tolist() == SCALING.sort_values(["series", "gpus"])[metric].tolist()
    png, pdf = plots.save_figure(fig, tmp_path / metric)
    raw = png.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and mpimg.imread(png).shape[0] > 400  # 200 dpi
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000


def test_sweep_and_breakdown_plots_draw_the_table(tmp_path):
    points = pd.DataFrame({"model": "unet", "backend": "horovod", "world_size": 1, "patch": 128,
                           "batch_per_gpu": [4, 8, 16], "throughput_samples_per_s": [50.0, 90.0, 120.0],
                           "throughput_min": [45.0, 85.0, 115.0], "throughput_max": [55.0, 95.0, 125.0],
                           "mem_peak_bytes_max": [1 << 30, 2 << 30, 4 << 30]})
    table = plots.sweep_data(points, "batch_per_gpu", "mem_peak_gib")
    assert table["y"].tolist() == [1.0, 2.0, 4.0] and table["x"].tolist() == [4.0, 8.0, 16.0]
    (label,) = table["label"].unique()
    x, y = _drawn(plots.plot_sweep(table, "batch_per_gpu", "mem_peak_gib"))[label]
    np.testing.assert_array_equal(y, table["y"])
    assert plots.sweep_data(points, "patch", "throughput_samples_per_s").empty  # patch never varies

    # Another sweep axis (here the input pipeline) splits the curves instead of merging them into medians;
    # a point's own id never does.
    axis = pd.concat([points.assign(**{"point.pipeline": "serial"}), points.assign(**{"point.pipeline": "cached"})])
    axis["point.id"] = [f"p{i}" for i in range(len(axis))]
    axis.loc[axis["point.pipeline"] == "cached", "throughput_samples_per_s"] *= 2
    split = plots.sweep_data(axis, "batch_per_gpu", "throughput_samples_per_s")
    assert sorted(split["label"].unique()) == ["unet horovod p128 1 GPUs pipeline=cached",
                                               "unet horovod p128 1 GPUs pipeline=serial"]
    cached = split[split["label"].str.endswith("cached")]
    assert cached["y"].tolist() == [100.0, 180.0, 240.0]

    neck = pd.DataFrame({"model": "unet", "backend": "horovod", "gpus": [1, 4], "batch_per_gpu": 8, "run_id": ["a", "b"],
                         "step_time_median_s": [0.1, 0.2], "input_wait_share": [0.1, 0.25],
                         "compute_share": [0.9, 0.5], "exchange_share": [0.0, 0.25], "other_share": [0.0, 0.0]})
    data = plots.breakdown_data(neck)
    assert data[["input_wait_s", "compute_s", "exchange_s"]].to_numpy() == pytest.approx(
        np.array([[0.01, 0.09, 0.0], [0.05, 0.1, 0.05]]))
    fig = plots.plot_breakdown(data)
    widths = np.array([p.get_width() for p in fig.axes[0].patches]).reshape(4, 2)  # parts x runs
    np.testing.assert_allclose(widths.T, data[["input_wait_s", "compute_s", "exchange_s", "other_s"]].to_numpy())
    png, pdf = plots.save_figure(fig, tmp_path / "breakdown")
    assert png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:4] == b"%PDF"
