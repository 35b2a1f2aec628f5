"""Render the report: tables as CSV, LaTeX (booktabs) and Markdown; `report.md` and a self-contained
`report.html` built from one list of blocks, so both documents always say the same thing.
"""
from __future__ import annotations

import base64
import html
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from cellavie_hpc import __version__
from cellavie_hpc.errors import UserError
from cellavie_hpc.report import bottleneck, calibration, efficiency, improvements, plots
from cellavie_hpc.report.collect import load_results
from cellavie_hpc.report.comm_model import CommFit

Fmt = Callable[[Any], str]


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def fmt_num(digits: int) -> Fmt:
    return lambda v: "–" if _is_missing(v) else f"{float(v):,.{digits}f}"


def fmt_pct(v: Any) -> str:
    return "–" if _is_missing(v) else f"{100 * float(v):.1f}%"


def fmt_text(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return "–" if _is_missing(v) or v == "" else str(v)


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    fmt: Fmt = fmt_text


def formatted(frame: pd.DataFrame, columns: list[Column]) -> list[list[str]]:
    cols = [c for c in columns if c.key in frame]
    return [[c.fmt(row[c.key]) for c in cols] for _, row in frame.iterrows()]


def _titles(frame: pd.DataFrame, columns: list[Column]) -> list[str]:
    return [c.title for c in columns if c.key in frame]


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def latex_table(frame: pd.DataFrame, columns: list[Column], caption: str, label: str) -> str:
    """A `booktabs` table (needs \\usepackage{booktabs}); text columns left, numbers right."""
    rows = formatted(frame, columns)
    titles = _titles(frame, columns)
    align = "".join("l" if c.fmt is fmt_text else "r" for c in columns if c.key in frame)
    lines = [r"\begin{table}[htbp]", r"\centering", rf"\caption{{{latex_escape(caption)}}}", rf"\label{{{label}}}",
             rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(latex_escape(t) for t in titles) + r" \\",
             r"\midrule"]
    lines += [" & ".join(latex_escape(v) for v in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def markdown_table(frame: pd.DataFrame, columns: list[Column]) -> str:
    titles = _titles(frame, columns)
    right = [c.fmt is not fmt_text for c in columns if c.key in frame]
    esc = lambda s: str(s).replace("|", r"\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(t) for t in titles) + " |",
             "|" + "|".join("---:" if r else ":---" for r in right) + "|"]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in formatted(frame, columns)]
    return "\n".join(lines) + "\n"


def html_table(frame: pd.DataFrame, columns: list[Column]) -> str:
    right = [c.fmt is not fmt_text for c in columns if c.key in frame]
    head = "".join(f"<th>{html.escape(t)}</th>" for t in _titles(frame, columns))
    body = "".join("<tr>" + "".join(f'<td class="{"num" if r else "txt"}">{html.escape(v)}</td>'
                                    for v, r in zip(row, right)) + "</tr>\n" for row in formatted(frame, columns))
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"


SCALING_COLUMNS = [
    Column("source", "Source"), Column("scaling", "Scaling"), Column("series", "Series"), Column("gpus", "GPUs"),
    Column("nodes", "Nodes"), Column("batch_per_gpu", "Batch/GPU"), Column("global_batch", "Global batch"),
    Column("repeats", "Repeats"), Column("throughput_samples_per_s", "Throughput (samples/s)", fmt_num(1)),
    Column("throughput_per_gpu", "Per GPU (samples/s)", fmt_num(1)), Column("speedup", "Speedup", fmt_num(2)),
    Column("efficiency", "Efficiency", fmt_pct), Column("epoch_time_s", "Epoch (s)", fmt_num(1)),
]
BOTTLENECK_COLUMNS = [
    Column("source", "Source"), Column("run_id", "Run"), Column("model", "Model"), Column("backend", "Back-end"),
    Column("gpus", "GPUs"), Column("batch_per_gpu", "Batch/GPU"), Column("step_time_median_s", "Step (s)", fmt_num(4)),
    Column("step_time_iqr_s", "IQR (s)", fmt_num(4)), Column("input_wait_share", "Input wait", fmt_pct),
    Column("compute_share", "Compute", fmt_pct), Column("exchange_share", "Exchange", fmt_pct),
    Column("other_share", "Other", fmt_pct), Column("straggler_rank", "Slowest rank"),
    Column("straggler_ratio", "Slowest/median", fmt_num(2)), Column("stragglers", "Stragglers (>1.1x)"),
    Column("mem_peak_gib", "Peak mem/GPU (GiB)", fmt_num(2)), Column("mem_source", "Mem source"),
]
PROJECTION_COLUMNS = [
    Column("source", "Source"), Column("series", "Series"), Column("gpus", "GPUs"),
    Column("batch_per_gpu", "Batch/GPU", fmt_num(0)),
    Column("throughput_samples_per_s", "Throughput (samples/s)", fmt_num(1)),
    Column("throughput_p5", "p5", fmt_num(1)), Column("throughput_p95", "p95", fmt_num(1)),
    Column("speedup", "Speedup", fmt_num(2)), Column("efficiency", "Efficiency", fmt_pct),
    Column("epoch_time_s", "Epoch (s)", fmt_num(1)), Column("extrapolated", "Beyond measured"),
]
CALIBRATION_COLUMNS = [
    Column("series", "Series"), Column("points", "Points"), Column("measured_gpus", "Measured GPUs"),
    Column("t0_s", "t0 (ms)", fmt_num(3)), Column("compute_s_per_sample", "c (ms/sample)", fmt_num(4)),
    Column("alpha_s", "alpha (ms)", fmt_num(4)), Column("gamma_s", "gamma (ms)", fmt_num(3)),
    Column("fit_rms_rel_error", "Fit RMS error", fmt_pct), Column("heldout_error", "Held-out error", fmt_pct),
]
IMPROVEMENT_COLUMNS = [
    Column("source", "Source"), Column("model", "Model"), Column("backend", "Back-end"), Column("setting", "Setting"),
    Column("variant", "Variant"), Column("gpus", "GPUs"), Column("repeats", "Repeats"),
    Column("throughput_samples_per_s", "Throughput (samples/s, median)", fmt_num(1)),
    Column("throughput_min", "min", fmt_num(1)), Column("throughput_max", "max", fmt_num(1)),
    Column("ratio", "vs baseline", fmt_num(2)), Column("ratio_ci_low", "95% CI low", fmt_num(2)),
    Column("ratio_ci_high", "95% CI high", fmt_num(2)), Column("effect", "Effect"),
    Column("input_wait_share", "Input wait", fmt_pct), Column("compute_share", "Compute", fmt_pct),
    Column("exchange_share", "Exchange", fmt_pct), Column("time_to_first_step_s", "Start-up (s)", fmt_num(1)),
    Column("note", "Note"),
]
IMPROVEMENT_PROJECTION_COLUMNS = [
    Column("source", "Source"), Column("series", "Series"), Column("gpus", "GPUs"),
    Column("batch_per_gpu", "Batch/GPU", fmt_num(0)),
    Column("throughput_samples_per_s", "Throughput (samples/s)", fmt_num(1)),
    Column("throughput_p5", "p5", fmt_num(1)), Column("throughput_p95", "p95", fmt_num(1)),
    Column("ratio", "vs baseline", fmt_num(2)), Column("ratio_p5", "p5", fmt_num(2)),
    Column("ratio_p95", "p95", fmt_num(2)), Column("measured_gpus", "Measured GPUs"),
    Column("extrapolated", "Beyond measured"), Column("note", "Note"),
]
INCOMPLETE_COLUMNS = [
    Column("run_dir", "Run directory"), Column("run_id", "Run"), Column("status", "Status"),
    Column("missing_ranks", "Missing ranks"), Column("unfinished_ranks", "Unfinished ranks"),
    Column("failed_ranks", "Failed ranks"), Column("error", "Error"),
]


def write_table(frame: pd.DataFrame, columns: list[Column], stem: Path, caption: str) -> dict[str, Path]:
    """CSV (all columns, full precision), LaTeX and Markdown (the displayed columns) of one table."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(stem.with_suffix(".csv"), index=False)
    stem.with_suffix(".tex").write_text(latex_table(frame, columns, caption, f"tab:{stem.name}"))
    stem.with_suffix(".md").write_text(markdown_table(frame, columns))
    return {ext: stem.with_suffix(f".{ext}") for ext in ("csv", "tex", "md")}


def environment(runs: pd.DataFrame) -> pd.DataFrame:
    """Distinct values of versions, devices, commits and jobs across the runs (from the record headers)."""
    keys = ["device_kind", "device_name", "git_commit", "config_hash", "job_id"]
    keys += sorted(c for c in runs if c.startswith("version."))
    rows = []
    for key in keys:
        if key in runs:
            values = sorted({str(v) for v in runs[key].dropna() if v != ""})
            if values:
                rows.append({"what": key.replace("version.", ""), "value": ", ".join(values[:6])
                             + (f" (+{len(values) - 6} more)" if len(values) > 6 else "")})
    return pd.DataFrame(rows, columns=["what", "value"])


ENV_COLUMNS = [Column("what", "Item"), Column("value", "Value")]


@dataclass
class Block:
    """One piece of the report: heading, paragraph, table, figure or verbatim text."""

    kind: str
    text: str = ""
    frame: pd.DataFrame | None = None
    columns: list[Column] | None = None
    path: Path | None = None
    level: int = 2


def to_markdown(blocks: list[Block], root: Path) -> str:
    out = []
    for b in blocks:
        if b.kind == "heading":
            out.append("#" * b.level + " " + b.text + "\n")
        elif b.kind == "para":
            out.append(b.text + "\n")
        elif b.kind == "table":
            out.append(markdown_table(b.frame, b.columns))
        elif b.kind == "figure":
            rel = b.path.relative_to(root)
            out.append(f"![{b.text}]({rel.as_posix()})\n\n*{b.text}* ([PDF]({rel.with_suffix('.pdf').as_posix()}))\n")
        elif b.kind == "code":
            out.append("```\n" + b.text.rstrip() + "\n```\n")
    return "\n".join(out)


_CSS = ("body{font-family:Georgia,serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.85em}th,td{padding:3px 8px}"
        "thead th{border-top:2px solid #000;border-bottom:1px solid #000}tbody tr:last-child td{border-bottom:2px solid #000}"
        "td.num{text-align:right;font-variant-numeric:tabular-nums}td.txt{text-align:left}"
        "figure{margin:1em 0}img{max-width:100%}pre{background:#f6f6f6;padding:0.8em;overflow-x:auto;font-size:0.8em}")


def to_html(blocks: list[Block], title: str) -> str:
    """A single HTML file: figures embedded as base64 PNG, so it can be mailed or archived alone."""
    out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if b.kind == "heading":
            out.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif b.kind == "para":
            out.append(f"<p>{html.escape(b.text)}</p>")
        elif b.kind == "table":
            out.append(html_table(b.frame, b.columns))
        elif b.kind == "figure":
            data = base64.b64encode(b.path.read_bytes()).decode()
            out.append(f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
        elif b.kind == "code":
            out.append(f"<pre>{html.escape(b.text)}</pre>")
    out.append("</body></html>\n")
    return "\n".join(out)


def _calibration_frame(cals: list[calibration.SeriesCalibration]) -> pd.DataFrame:
    rows = []
    for c in cals:
        held = [abs(h["rel_error"]) for h in c.heldout]
        rows.append({"series": c.label, "points": c.points, "measured_gpus": ",".join(map(str, c.measured_gpus)),
                     **{k: 1e3 * v for k, v in c.params.items()}, "fit_rms_rel_error": c.fit_rms_rel_error,
                     "heldout_error": max(held) if held else float("nan")})
    return pd.DataFrame(rows)


def build_report(results: str | Path, out: str | Path, bootstrap_repeats: int = 200,
                 comm: CommFit | None = None) -> dict[str, Any]:
    """`cellavie report`: every table, figure and document from a results directory."""
    results, out = Path(results), Path(out)
    runs, points, summary = load_results(results)
    ranks = pd.read_parquet(results / "ranks.parquet") if (results / "ranks.parquet").exists() else None
    if runs.empty:
        raise UserError(f"{results}: the results table has no runs; nothing to report")
    out.mkdir(parents=True, exist_ok=True)
    tables, figures = out / "tables", out / "figures"
    written: dict[str, Any] = {"tables": {}, "figures": []}

    scaling = efficiency.scaling_table(points)
    neck = bottleneck.bottleneck_table(runs[runs["complete"].fillna(False).astype(bool)]
                                       if not summary.get("include_incomplete") else runs, ranks)
    cals = calibration.calibrate(points, repeats=bootstrap_repeats, comm=comm)
    projection = calibration.projection_table(cals)
    gains = improvements.improvements_table(runs)
    gains_projected = improvements.projected_improvements(cals)
    calibration.write_calibration(cals, out / "calibration.json")
    incomplete = pd.DataFrame(summary.get("incomplete_runs") or [])

    for name, frame, columns, caption in (
        ("scaling", scaling, SCALING_COLUMNS, "Measured scaling: throughput, speedup and efficiency per series"),
        ("bottleneck", neck, BOTTLENECK_COLUMNS, "Measured step-time breakdown, stragglers and peak memory per run"),
        ("calibration", _calibration_frame(cals), CALIBRATION_COLUMNS, "Fitted step-time model per series"),
        ("projection", projection, PROJECTION_COLUMNS, "Projected (not measured) scaling from the fitted model"),
        ("improvements", gains, IMPROVEMENT_COLUMNS,
         "Measured effect of each variant: throughput over repeats and ratio to the baseline (bootstrap 95% CI)"),
        ("improvements_projection", gains_projected, IMPROVEMENT_PROJECTION_COLUMNS,
         "Projected (not measured) throughput per back-end and variant, and ratio to the baseline"),
        ("incomplete", incomplete, INCOMPLETE_COLUMNS, "Incomplete and failed runs (excluded from efficiency)"),
    ):
        written["tables"][name] = write_table(frame, columns, tables / name, caption)

    figs: list[tuple[str, Path]] = []
    for metric in ("speedup", "efficiency"):
        for (kind, backend), part in plots.scaling_data(scaling, metric).groupby(["scaling", "backend"], sort=True):
            stem = figures / f"{metric}_{kind}_{backend}"
            title = f"{kind.capitalize()} scaling {metric}, {backend} (measured)"
            plots.save_figure(plots.plot_scaling(part, metric, title), stem)
            figs.append((f"{kind.capitalize()}-scaling {metric} against GPUs, back-end {backend} "
                         "(measured; bars: min/max of repeats)", stem))
    for x in ("batch_per_gpu", "patch"):
        for y in ("throughput_samples_per_s", "mem_peak_gib"):
            data = plots.sweep_data(points, x, y)
            if not data.empty:
                stem = figures / f"{'throughput' if y.startswith('throughput') else 'memory'}_vs_{x}"
                plots.save_figure(plots.plot_sweep(data, x, y), stem)
                figs.append((f"{plots.Y_LABELS[y]} against {plots.X_LABELS[x].lower()} (measured)", stem))
    if not neck.empty:
        stem = figures / "step_breakdown"
        plots.save_figure(plots.plot_breakdown(plots.breakdown_data(neck)), stem)
        figs.append(("Median step time split into input wait, compute, gradient exchange and other (measured)", stem))
    gain_figs: list[tuple[str, Path]] = []
    ratios = plots.improvement_data(gains)
    if not ratios.empty:
        stem = figures / "improvement_ratio"
        plots.save_figure(plots.plot_improvements(ratios), stem)
        gain_figs.append(("Throughput of each variant over the baseline of its back-end against GPUs "
                          "(measured; bars: bootstrap 95% CI of the ratio of medians)", stem))
    written["figures"] = [s.with_suffix(ext) for ext in (".png", ".pdf") for _, s in figs + gain_figs]

    blocks = _blocks(results, summary, runs, points, scaling, neck, cals, projection, incomplete, figs,
                     _improvement_blocks(gains, gains_projected, gain_figs))
    (out / "report.md").write_text(to_markdown(blocks, out))
    (out / "report.html").write_text(to_html(blocks, "cellavie-hpc scaling report"))
    written["documents"] = [out / "report.md", out / "report.html", out / "calibration.json"]
    return written


def _improvement_blocks(gains: pd.DataFrame, projected: pd.DataFrame, figs: list[tuple[str, Path]]) -> list[Block]:
    """The Improvements section: measured ratios (with their figure), then the projected ones, apart."""
    b = [Block("heading", "Improvements (measured)")]
    if gains.empty:
        return b + [Block("para", "No run names a variant other than the baseline (sweep axis `variant`): "
                                  "nothing to compare.")]
    b += [Block("para", "Each variant against the baseline of the same back-end, world size and sweep axes, "
                        "run interleaved repeat by repeat. Throughput: median (min-max) over the repeats; ratio: "
                        f"median over median, with a bootstrap {improvements.CONFIDENCE:.0%} interval "
                        f"({improvements.CI_RESAMPLES} resamples of each side's repeats). Effect 'faster'/'slower' "
                        "only when the interval excludes 1, else 'unresolved'. Shares of step time are medians over "
                        "the repeats (exchange: a separate timed all-reduce of the gradients, when recorded)."),
          Block("table", frame=gains, columns=IMPROVEMENT_COLUMNS)]
    missing = gains[gains["note"].str.startswith("no completed baseline")]
    if not missing.empty:
        b.append(Block("para", f"{len(missing)} row(s) have no ratio: their baseline did not complete (see Note)."))
    b += [Block("figure", text, path=stem.with_suffix(".png")) for text, stem in figs]
    b += [Block("heading", "Improvements projected (projected from the model, not measured)")]
    if projected.empty:
        b.append(Block("para", "No (back-end, variant) series could be calibrated (it needs a single-GPU point or "
                               "three measured points)."))
    else:
        b += [Block("para", "Throughput of each calibrated (back-end, variant) series from its fitted step-time model "
                            "(see Calibration) at its measured batch per GPU, and its ratio to the baseline series of "
                            "the same back-end; p5-p95 over paired bootstrap fits. Rows beyond the measured world "
                            "sizes are extrapolations of the model."),
              Block("table", frame=projected, columns=IMPROVEMENT_PROJECTION_COLUMNS)]
        multi = projected["measured_gpus"].map(lambda g: sum(int(n) > 1 for n in str(g).split(",")))
        weak = sorted(set(projected.loc[multi < 2, "series"]))
        if weak:
            b.append(Block("para", f"{len(weak)} series were measured at fewer than two multi-GPU world sizes: their "
                                   "exchange terms (alpha, gamma) are weakly constrained, so their projections far "
                                   "beyond the measured sizes, and the ratios there, are not predictions."))
    return b


def _blocks(results: Path, summary: dict, runs: pd.DataFrame, points: pd.DataFrame, scaling: pd.DataFrame,
            neck: pd.DataFrame, cals: list, projection: pd.DataFrame, incomplete: pd.DataFrame,
            figs: list[tuple[str, Path]], gains: list[Block]) -> list[Block]:
    b = [Block("heading", "cellavie-hpc scaling report", level=1),
         Block("para", f"From {results} ({summary.get('runs', len(runs))} runs, {summary.get('complete', 0)} complete, "
                       f"{len(points)} sweep points); generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by cellavie-hpc "
                       f"{__version__}. Every table says whether its figures are measured or projected; the two are "
                       "never mixed. Warm-up and compile steps are excluded from every measured figure.")]
    b += [Block("heading", "Incomplete and failed runs")]
    if incomplete.empty:
        b.append(Block("para", "None: every run had all its ranks complete."))
    else:
        b += [Block("para", f"{len(incomplete)} run(s) are incomplete or failed and are excluded from the efficiency "
                            "figures" + (" (included on request: --include-incomplete)." if summary.get("include_incomplete")
                                         else ".")),
              Block("table", frame=incomplete, columns=INCOMPLETE_COLUMNS)]
    b += [Block("heading", "Scaling (measured)")]
    if scaling.empty:
        b.append(Block("para", "No series was measured at two or more world sizes with all else fixed."))
    else:
        b += [Block("para", "Weak scaling keeps the batch per GPU fixed, strong scaling the global batch. "
                            "Speedup and efficiency are relative to the smallest world size of each series."),
              Block("table", frame=scaling, columns=SCALING_COLUMNS)]
    b += [Block("figure", text, path=stem.with_suffix(".png")) for text, stem in figs if "GPUs" in text]
    b += [Block("heading", "Bottlenecks (measured)"),
          Block("para", "Shares of the measured step time per run (summed over ranks); the slowest rank is the one "
                        "with the most input-wait + compute time, stragglers exceed the median rank by 10%.")]
    b += [Block("table", frame=neck, columns=BOTTLENECK_COLUMNS)] if not neck.empty else \
        [Block("para", "No complete run with measured steps.")]
    b += [Block("figure", text, path=stem.with_suffix(".png")) for text, stem in figs if "GPUs" not in text]
    b += [Block("heading", "Calibration (fitted model)"),
          Block("para", "Step time T(N, b) = t0 + c*b + alpha*2(N-1) + gamma*2(N-1)/N (ring all-reduce; "
                        "gamma = beta x gradient bytes), non-negative least squares on relative error, bootstrap "
                        "over points for uncertainty; held-out: fit without the largest world size, predict it.")]
    if cals:
        b += [Block("table", frame=_calibration_frame(cals), columns=CALIBRATION_COLUMNS)]
        b += [Block("para", f"{c.label}: parameter std (bootstrap, ms) "
                            + ", ".join(f"{k}={1e3 * v:.4f}" for k, v in c.params_std.items())
                            + (f". {c.heldout_note}" if c.heldout_note else "")) for c in cals]
        b += [Block("heading", "Projections (projected from the model, not measured)"),
              Block("table", frame=projection, columns=PROJECTION_COLUMNS)]
    else:
        b.append(Block("para", "No series has a single-GPU point or three measured points: nothing calibrated."))
    b += gains
    b += [Block("heading", "Environment (from the record headers)"),
          Block("table", frame=environment(runs), columns=ENV_COLUMNS), Block("heading", "Sweep")]
    sweeps = summary.get("sweeps") or {}
    if sweeps:
        b += [Block("code", f"# {name}/sweep.json\n" + json.dumps(content, indent=2)) for name, content in sweeps.items()]
    else:
        b.append(Block("para", "No sweep.json was found next to the runs; the points are those of the records."))
    problems = summary.get("problems") or []
    b += [Block("heading", f"Collection problems ({len(problems)})")]
    if problems:
        b.append(Block("code", "\n".join(f"[{p['severity']}] {p.get('run') or ''}: {p['message']}" for p in problems)))
    return b
