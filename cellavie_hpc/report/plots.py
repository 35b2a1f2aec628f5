"""Publication figures. Each `*_data` function builds the exact table a plot draws; each `plot_*`
function takes that table and returns the figure, so tests can compare drawn data with the table.

One style everywhere (`STYLE`): serif text at paper sizes, labelled axes with units, grid, legend,
ideal-scaling reference lines, min/max error bars over repeats. `save_figure` writes PNG (200 dpi)
and vector PDF.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the back-end must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cellavie_hpc.report.efficiency import series_label  # noqa: E402

STYLE = {
    "font.family": "serif", "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 7,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.35, "grid.linestyle": ":",
    "figure.figsize": (4.8, 3.4), "figure.dpi": 100, "savefig.bbox": "tight", "lines.linewidth": 1.4,
    "lines.markersize": 4.5, "errorbar.capsize": 2.5, "pdf.fonttype": 42,
}
PNG_DPI = 200
_METRICS = {"speedup": ("Speedup (relative to baseline)", "ideal_speedup"), "efficiency": ("Scaling efficiency", None)}
Y_LABELS = {"throughput_samples_per_s": "Throughput (samples/s)", "mem_peak_gib": "Peak memory per GPU (GiB)"}
X_LABELS = {"batch_per_gpu": "Batch per GPU (samples)", "patch": "Patch size (pixels)", "gpus": "GPUs"}
_PARTS = (("input_wait_s", "input wait"), ("compute_s", "compute"), ("exchange_s", "gradient exchange"),
          ("other_s", "other"))


def _log2(ax: plt.Axes, which: str) -> None:
    """Log-2 scale labelled with plain numbers (1, 2, 4, ...), not powers."""
    getattr(ax, f"set_{which}scale")("log", base=2)
    getattr(ax, f"{which}axis").set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))


def save_figure(fig: plt.Figure, stem: str | Path) -> list[Path]:
    """Write `stem.png` (200 dpi) and `stem.pdf` (vector), close the figure, return both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=PNG_DPI, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def scaling_data(scaling: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per series and GPU count: the metric (`speedup` or `efficiency`), its min/max and the ideal."""
    if metric not in _METRICS:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(_METRICS)}")
    if scaling.empty:
        return pd.DataFrame(columns=["backend", "scaling", "label", "baseline_gpus", "gpus", "y", "y_min", "y_max",
                                     "ideal"])
    ideal = scaling["ideal_speedup"] if metric == "speedup" else pd.Series(1.0, index=scaling.index)
    return pd.DataFrame({
        "backend": scaling["backend"], "scaling": scaling["scaling"], "label": scaling["series"],
        "baseline_gpus": scaling["baseline_gpus"].astype(int),
        "gpus": scaling["gpus"].astype(int), "y": scaling[metric].astype(float),
        "y_min": scaling[f"{metric}_min"].astype(float), "y_max": scaling[f"{metric}_max"].astype(float),
        "ideal": ideal.astype(float),
    }).sort_values(["label", "gpus"]).reset_index(drop=True)


def plot_scaling(table: pd.DataFrame, metric: str, title: str = "") -> plt.Figure:
    """Speedup or efficiency against GPUs (log2 axis), one line per series, ideal as a dashed line."""
    ylabel, _ = _METRICS[metric]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots()
        for label, group in table.groupby("label", sort=True):
            err = np.vstack([group["y"] - group["y_min"], group["y_max"] - group["y"]]).clip(min=0)
            ax.errorbar(group["gpus"], group["y"], yerr=err, marker="o", label=label)
        if not table.empty:
            ideal = table[table["baseline_gpus"] == table["baseline_gpus"].min()]
            ideal = ideal.sort_values("gpus").drop_duplicates("gpus")
            ax.plot(ideal["gpus"], ideal["ideal"], "k--", linewidth=0.9, label="ideal")
            _log2(ax, "x")
            if metric == "speedup":
                _log2(ax, "y")
            ax.legend(loc="best")
        if metric == "efficiency":
            ax.set_ylim(0, max(1.1, float(table["y_max"].max()) * 1.05) if not table.empty else 1.1)
        ax.set_xlabel("GPUs (world size)")
        ax.set_ylabel(ylabel)
        ax.set_title(title or f"{metric.capitalize()} vs GPUs (measured)")
    return fig


_SWEEP_KEYS = ("model", "backend", "precision", "xla", "patch", "batch_per_gpu", "world_size")
#: Point fields that name or place a point rather than set an axis of the sweep.
_NOT_AXES = ("id", "index", "repeat", "seed", "time_min", "tasks_per_node", "gpus_per_node", "nodes", "global_batch")


def sweep_data(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """`y` against `x` for the groups of points that differ only in `x` (empty when `x` never varies)."""
    if points.empty or x not in points:
        return pd.DataFrame(columns=["label", "x", "y", "y_min", "y_max"])
    frame = points.copy()
    frame["mem_peak_gib"] = frame["mem_peak_bytes_max"].astype(float) / float(1 << 30)
    others = [k for k in _SWEEP_KEYS if k in frame and k != x]
    # Any other sweep axis (pipeline, steps per execution, data-set size, study, ...) also splits the
    # groups, so that points differing in it are never merged into one median.
    axes = [c for c in frame if c.startswith("point.") and c[6:] not in (*_SWEEP_KEYS, *_NOT_AXES, x)]
    keys = others + axes
    frame[keys] = frame[keys].astype(object).where(frame[keys].notna(), "")
    varying = [c for c in axes if frame[c].nunique() > 1]
    pieces = []
    for _, group in frame.groupby(keys, sort=True):
        if group[x].nunique() < 2:
            continue
        agg = group.groupby(x).agg(y=(y, "median"),
                                   y_min=("throughput_min" if y == "throughput_samples_per_s" else y, "min"),
                                   y_max=("throughput_max" if y == "throughput_samples_per_s" else y, "max"))
        agg = agg.reset_index().rename(columns={x: "x"})
        first = group.iloc[0]
        label = series_label(first, tuple(others)) + (" GPUs" if "world_size" in others else "")
        label += "".join(f" {c[6:]}={first[c]}" for c in varying if first[c] != "")
        agg.insert(0, "label", label)
        pieces.append(agg)
    if not pieces:
        return pd.DataFrame(columns=["label", "x", "y", "y_min", "y_max"])
    out = pd.concat(pieces, ignore_index=True)
    out["x"] = out["x"].astype(float)
    return out


def plot_sweep(table: pd.DataFrame, x: str, y: str) -> plt.Figure:
    """A measured quantity against batch or patch size, one line per group, min/max error bars."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots()
        for label, group in table.groupby("label", sort=True):
            err = np.vstack([group["y"] - group["y_min"], group["y_max"] - group["y"]]).clip(min=0)
            ax.errorbar(group["x"], group["y"], yerr=err, marker="o", label=label)
        _log2(ax, "x")
        ax.set_xlabel(X_LABELS.get(x, x))
        ax.set_ylabel(Y_LABELS.get(y, y))
        x_name = X_LABELS.get(x, x).split(" (")[0]
        ax.set_title(f"{Y_LABELS.get(y, y).split(' (')[0]} vs {x_name[:1].lower()}{x_name[1:]} (measured)")
        if not table.empty:
            ax.legend(loc="best")
    return fig


def breakdown_data(bottleneck: pd.DataFrame) -> pd.DataFrame:
    """Seconds per step in input wait, compute, exchange and other, per run (median step time x share)."""
    if bottleneck.empty:
        return pd.DataFrame(columns=["label"] + [p for p, _ in _PARTS])
    t = bottleneck["step_time_median_s"].astype(float)
    out = pd.DataFrame({"label": bottleneck["model"].astype(str) + " " + bottleneck["backend"].astype(str)
                        + " " + bottleneck["gpus"].astype(str) + "g b" + bottleneck["batch_per_gpu"].astype(str)
                        + " (" + bottleneck["run_id"].astype(str) + ")"})
    for part in ("input_wait", "compute", "exchange", "other"):
        out[f"{part}_s"] = (t * bottleneck[f"{part}_share"].astype(float).fillna(0.0)).to_numpy()
    return out.reset_index(drop=True)


def plot_breakdown(table: pd.DataFrame) -> plt.Figure:
    """Stacked horizontal bars of the step time of each run."""
    height = max(2.4, 0.28 * len(table) + 1.2)
    with plt.rc_context(STYLE | {"figure.figsize": (5.6, height)}):
        fig, ax = plt.subplots()
        left = np.zeros(len(table))
        for column, name in _PARTS:
            values = table[column].to_numpy(float)
            ax.barh(table["label"], values, left=left, label=name)
            left += values
        ax.invert_yaxis()
        ax.set_xlabel("Time per step (s, median)")
        ax.set_title("Step-time breakdown (measured)")
        ax.legend(loc="best")
        ax.grid(axis="y", visible=False)
    return fig


def improvement_data(improvements: pd.DataFrame) -> pd.DataFrame:
    """Per back-end, variant (and setting) and world size: the measured ratio to the baseline and its interval.

    `x` is the world size nudged by a few per cent per line (log axis) so that intervals at one size stay apart.
    """
    columns = ["backend", "label", "gpus", "x", "ratio", "ci_low", "ci_high"]
    if improvements.empty:
        return pd.DataFrame(columns=columns)
    rows = improvements[(improvements["variant"] != "baseline") & improvements["ratio"].notna()]
    label = rows["variant"].astype(str) + rows["setting"].fillna("").map(lambda s: f" ({s})" if s else "")
    table = pd.DataFrame({
        "backend": rows["backend"].astype(str), "label": label, "gpus": rows["gpus"].astype(int),
        "ratio": rows["ratio"].astype(float), "ci_low": rows["ratio_ci_low"].astype(float),
        "ci_high": rows["ratio_ci_high"].astype(float),
    }).sort_values(["backend", "label", "gpus"]).reset_index(drop=True)
    position = table.groupby("backend")["label"].transform(lambda s: s.rank(method="dense") - 1)
    lines = table.groupby("backend")["label"].transform("nunique")
    table["x"] = table["gpus"] * 2.0 ** (0.05 * (position - (lines - 1) / 2))
    return table[columns]


def plot_improvements(table: pd.DataFrame, title: str = "") -> plt.Figure:
    """Ratio to the baseline against GPUs (log2 axes), one panel per back-end, one line per variant,
    bars: the ratio's confidence interval; the dashed line at 1 is "no effect"."""
    backends = sorted(table["backend"].unique()) or [""]
    width, height = STYLE["figure.figsize"]
    with plt.rc_context(STYLE | {"figure.figsize": (width * 0.75 * len(backends) + 1.2, height)}):
        fig, axes = plt.subplots(1, len(backends), sharey=True, squeeze=False)
        for ax, backend in zip(axes[0], backends):
            for label, group in table[table["backend"] == backend].groupby("label", sort=True):
                err = np.vstack([group["ratio"] - group["ci_low"], group["ci_high"] - group["ratio"]]).clip(min=0)
                ax.errorbar(group["x"], group["ratio"], yerr=err, marker="o", label=label)
            ax.axhline(1.0, color="k", linestyle="--", linewidth=0.9, label="baseline")
            if not table.empty:
                _log2(ax, "x")
                _log2(ax, "y")  # a ratio: 0.5 and 2 are the same distance from 1
                ax.set_xticks(sorted(table["gpus"].unique()))
            ax.set_xlabel("GPUs (world size)")
            ax.set_title(backend)
            ax.legend(loc="best")
        axes[0][0].set_ylabel("Throughput / baseline")
        fig.suptitle(title or "Improvement over the baseline (measured; bars: 95% CI)")
    return fig
