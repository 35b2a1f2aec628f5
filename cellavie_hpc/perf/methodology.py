"""The single-device methodology: throughput and memory as one factor at a time moves, through the real engine.

What is varied: data-set size (images), patch size, batch size, precision (fp32, tf32, mixed_float16,
mixed_bfloat16), XLA, input-pipeline settings (named `PIPELINES`) and steps per execution. A
`Methodology` is a reference point plus axes; each axis is a *study*: the reference with only that
axis changed (the reference value included, so each study is a complete curve). Alternatively the
points of a sweep file (`jobs/single_gpu.yaml`) run as they are.

How each point runs: a fresh `cellavie train` process on an ordinary training configuration, so the
numbers are the engine's own per-rank records (`records/rank-00000.jsonl`) and the memory peak (RSS on a
CPU, the allocator peak on a GPU) belongs to that point alone. TF32 is not a `train.precision`: `tf32`
points train as fp32 with `train.tf32: true`, every other point with TF32 *off*, because TensorFlow
enables it by default on Ampere and later GPUs, which would make `fp32` silently TF32.

Reading the results: `summarize` goes through `report.collect` (the same definitions as every
report: warm-up steps excluded, throughput = measured samples / measured wall time, median and
min/max over repeats). `OUT/results` is a collector results directory, so `cellavie report` draws
the throughput/memory vs batch and patch curves from it.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from cellavie_hpc.errors import ConfigError

PRECISIONS = ("fp32", "tf32", "mixed_float16", "mixed_bfloat16")
#: Input-pipeline settings by name (data.cache, data.prefetch, data.parallel_reads): each measured, none assumed.
PIPELINES: dict[str, dict[str, Any]] = {
    "serial": {"cache": False, "prefetch": 0, "parallel_reads": 1},      # one read at a time, no overlap
    "parallel": {"cache": False, "prefetch": -1, "parallel_reads": -1},  # autotuned parallel reads + prefetch
    "cached": {"cache": True, "prefetch": -1, "parallel_reads": -1},     # + whole images kept in memory
}
AXES = ("images", "patch", "batch", "precision", "xla", "pipeline", "steps_per_execution")


@dataclasses.dataclass(frozen=True)
class BenchPoint:
    """One measured configuration on one device (`images`: data-set size, None = all images)."""

    study: str = "reference"
    model: str = "unet"
    preset: str = "tiny"
    patch: int = 64
    batch: int = 8
    precision: str = "fp32"
    xla: bool = False
    pipeline: str = "cached"
    steps_per_execution: int = 1
    images: int | None = None
    steps: int = 24
    warmup_steps: int = 4
    repeat: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.pipeline not in PIPELINES:
            raise ConfigError(f"pipeline {self.pipeline!r} is not one of {', '.join(PIPELINES)}")
        if self.steps <= self.warmup_steps:
            raise ConfigError(f"steps ({self.steps}) must exceed warmup_steps ({self.warmup_steps}): "
                              "nothing would be measured")

    @property
    def run_id(self) -> str:
        parts = [self.study, self.model, self.preset, f"p{self.patch}", f"b{self.batch}", self.precision,
                 "xla" if self.xla else "noxla", self.pipeline, f"spe{self.steps_per_execution}",
                 f"i{self.images or 'all'}", f"r{self.repeat}"]
        return "-".join(parts)

    def point(self) -> dict[str, Any]:
        """The sweep point written into every record header (what the collector groups by)."""
        return {"study": self.study, "model": self.model, "preset": self.preset, "patch": self.patch,
                "batch_per_gpu": self.batch, "precision": self.precision, "xla": self.xla,
                "pipeline": self.pipeline, "steps_per_execution": self.steps_per_execution,
                "images": self.images, "repeat": self.repeat}

    def training_config(self, dataset: str | Path) -> dict[str, Any]:
        """The `cellavie train` configuration of this point (tf32 trains as fp32 with TF32 allowed)."""
        return {
            "run": {"name": self.run_id, "seed": self.seed + self.repeat, "point": self.point()},
            "data": {"dataset": str(dataset), "patch": self.patch, "max_images": self.images,
                     **PIPELINES[self.pipeline]},
            "model": {"name": self.model, "preset": self.preset},
            "train": {"backend": "single", "batch_per_replica": self.batch, "steps": self.steps,
                      "precision": "fp32" if self.precision == "tf32" else self.precision,
                      "tf32": self.precision == "tf32", "xla": self.xla,
                      "steps_per_execution": self.steps_per_execution, "warmup_record_steps": self.warmup_steps,
                      "log_every": 1, "checkpoint_every": 0, "progress_every": 1000},
        }


@dataclasses.dataclass(frozen=True)
class Methodology:
    """A reference point and, per axis, the values to measure one factor at a time."""

    reference: BenchPoint
    axes: dict[str, tuple[Any, ...]]
    repeats: int = 2

    def points(self) -> list[BenchPoint]:
        unknown = [a for a in self.axes if a not in AXES]
        if unknown:
            raise ConfigError(f"unknown methodology axis {unknown[0]!r}; axes: {', '.join(AXES)}")
        out = []
        for axis, values in self.axes.items():
            for value in values:
                for repeat in range(self.repeats):
                    out.append(dataclasses.replace(self.reference, study=axis, repeat=repeat, **{axis: value}))
        return out


def default_methodology(quick: bool = False) -> Methodology:
    """The full study (base U-Net) or, with `quick`, the tiny U-Net on short runs (minutes on a laptop)."""
    if quick:
        ref = BenchPoint(preset="tiny", patch=64, batch=8, steps=16, warmup_steps=4, images=6)
        return Methodology(ref, {"batch": (4, 8, 16), "patch": (32, 64), "precision": PRECISIONS,
                                 "xla": (False, True), "pipeline": tuple(PIPELINES),
                                 "steps_per_execution": (1, 4), "images": (3, 6)}, repeats=1)
    ref = BenchPoint(preset="base", patch=128, batch=16, steps=60, warmup_steps=10, images=16)
    return Methodology(ref, {"batch": (4, 8, 16, 32, 64), "patch": (64, 128, 256), "precision": PRECISIONS,
                             "xla": (False, True), "pipeline": tuple(PIPELINES),
                             "steps_per_execution": (1, 4, 16), "images": (4, 8, 16)}, repeats=3)


def dataset_size_for(points: Sequence[BenchPoint]) -> tuple[int, int]:
    """(images, pixels per side) of a synthetic data set large enough for every point's patch and images."""
    images = max([p.images or 2 for p in points] + [2])
    size = max(256, 4 * max(p.patch for p in points))
    return images, size


def ensure_dataset(out: Path, images: int, size: int, seed: int = 2) -> Path:
    """OUT/dataset, generated once (re-used when a previous bench left a complete one)."""
    from cellavie_hpc.data.dataset import open_dataset
    from cellavie_hpc.data.synthetic import generate_dataset

    path = out / "dataset"
    if (path / "manifest.json").exists():
        ds = open_dataset(path)
        if len(ds.images) >= images and min(min(i.height, i.width) for i in ds.images) >= size:
            return path
        raise ConfigError(f"{path} holds a smaller data set than this bench needs ({images} images of {size} px); "
                          "remove it or choose another --out")
    generate_dataset(path, images=images, size=size, parasitemia=0.05, seed=seed, workers=1, progress=False)
    return path


@dataclasses.dataclass(frozen=True)
class PointRun:
    run_id: str
    run_dir: Path
    returncode: int
    wall_s: float
    error: str | None


def run_point(config: dict[str, Any], run_dir: Path, timeout_s: float = 1800,
              env: dict[str, str] | None = None) -> PointRun:
    """Train one configuration with `cellavie train` in a fresh process (its own memory peak, dtype policy
    and TF32 setting)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "bench-config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "cellavie_hpc", "train", str(config_path), "--run-dir", str(run_dir),
               "--resume", "never"]
    environ = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), **(env or {})}
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=timeout_s)
        code, tail = proc.returncode, proc.stderr.strip().splitlines()[-1:] if proc.returncode else []
    except subprocess.TimeoutExpired:
        code, tail = 124, [f"timed out after {timeout_s:.0f} s"]
    return PointRun(config["run"]["name"], run_dir, code, time.perf_counter() - start, tail[0] if tail else None)


def run_points(points: Iterable[dict[str, Any]], runs_dir: Path, progress: bool = True,
               timeout_s: float = 1800) -> list[PointRun]:
    """Run training configurations into `runs_dir/<run id>`; failures are kept (their records say why)."""
    from cellavie_hpc.progress import Progress

    todo = list(points)
    done = []
    with Progress(len(todo), "bench", unit="points", enabled=progress, interval_s=1.0) as bar:
        for config in todo:
            result = run_point(config, Path(runs_dir) / config["run"]["name"], timeout_s)
            if result.returncode and progress:
                sys.stderr.write(f"bench: {result.run_id} failed (exit {result.returncode}): {result.error}\n")
            done.append(result)
            bar.update()
    return done


def methodology_configs(method: Methodology, dataset: Path) -> list[dict[str, Any]]:
    return [p.training_config(dataset) for p in method.points()]


def sweep_configs(sweep_file: str | Path, out: Path, scale: str | None = None, overrides: Sequence[str] = ()
                  ) -> list[dict[str, Any]]:
    """The points of a sweep file as training configurations, its data set generated into OUT/dataset.

    Only single-device points are accepted: this is the one-device methodology, not a scaling study.
    """
    from cellavie_hpc.launch import sweep

    spec = sweep.load_sweep(sweep_file, scale, overrides)
    if spec.dataset is not None and spec.dataset.path is not None:
        dataset = Path(spec.dataset.path)
    elif spec.dataset is not None:
        g = spec.dataset.generate
        dataset = out / "dataset"
        if not (dataset / "manifest.json").exists():
            from cellavie_hpc.data.synthetic import generate_dataset

            generate_dataset(dataset, images=g.images, size=g.size, parasitemia=g.parasitemia, seed=g.seed,
                             angles=g.angles, workers=1, progress=False)
    else:
        dataset = None
    plan = sweep.plan(spec, str(dataset) if dataset else None, where=str(sweep_file))
    for point in plan.points:
        if point.world_size != 1:
            raise ConfigError(f"{sweep_file}: point {point.id} uses {point.world_size} devices; "
                              "`cellavie bench` measures one device (use `cellavie sweep` for scaling studies)")
    return list(plan.configs)


#: Columns of the bench table: (header, results column, format).
TABLE = (("study", "point.study", "{}"), ("model", "model", "{}"), ("patch", "patch", "{}"),
         ("batch", "batch_per_gpu", "{}"), ("precision", "point.precision", "{}"), ("xla", "xla", "{}"),
         ("pipeline", "point.pipeline", "{}"), ("spe", "point.steps_per_execution", "{}"),
         ("images", "point.images", "{}"), ("n", "repeats", "{}"),
         ("samples/s", "throughput_samples_per_s", "{:.1f}"), ("min", "throughput_min", "{:.1f}"),
         ("max", "throughput_max", "{:.1f}"), ("step ms", "step_time_median_s", "{:.1f}"),
         ("wait %", "input_wait_share", "{:.1f}"), ("peak MiB", "mem_peak_bytes_max", "{:.0f}"),
         ("train GFLOP/s", "train_flops_per_s", "{:.2f}"))
_SCALE = {"step_time_median_s": 1e3, "input_wait_share": 100.0, "mem_peak_bytes_max": 2.0 ** -20,
          "train_flops_per_s": 1e-9}


def summarize(runs_dir: Path, results_dir: Path):
    """Collect the bench runs with the standard collector into `results_dir`; return the points table."""
    from cellavie_hpc.report.collect import collect, combine_repeats

    from cellavie_hpc.models.flops import TRAINING_FACTOR

    collection, _ = collect([runs_dir], results_dir, progress=False)
    points = combine_repeats(collection.runs)
    if "achieved_flops_per_s" in points:  # records hold forward FLOPs per sample; a training step does 3x
        points["train_flops_per_s"] = points["achieved_flops_per_s"].astype(float) * TRAINING_FACTOR
    return points


def format_table(points) -> str:
    """A fixed-width text table of the bench points (one row per point, repeats combined)."""
    import math

    present = [(h, c, f) for h, c, f in TABLE if c in points]
    rows = [[h for h, _, _ in present]]
    sort = [c for c in ("point.study", "model", "patch", "batch_per_gpu") if c in points]
    for _, r in points.sort_values(sort).iterrows() if sort else points.iterrows():
        row = []
        for _, col, fmt in present:
            v = r[col]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                row.append("-")
                continue
            row.append(fmt.format(v * _SCALE.get(col, 1.0)) if col in _SCALE else fmt.format(v))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows)


def run_bench(out: str | Path, *, sweep_file: str | Path | None = None, scale: str | None = None,
              overrides: Sequence[str] = (), quick: bool = False, repeats: int | None = None,
              dataset: str | Path | None = None, progress: bool = True, timeout_s: float = 1800):
    """`cellavie bench`: run the methodology (or a sweep file's points) into OUT and collect it.

    Layout: OUT/dataset (generated unless `dataset`), OUT/runs/<run id>/ (records, config),
    OUT/results/ (the collector's tables; `cellavie report OUT/results` draws the curves),
    OUT/bench.txt (the table returned). Returns (points table, text table, per-point runs).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if sweep_file is not None:
        configs = sweep_configs(sweep_file, out, scale, overrides)
    else:
        method = default_methodology(quick)
        if repeats is not None:
            method = dataclasses.replace(method, repeats=repeats)
        path = Path(dataset) if dataset else ensure_dataset(out, *dataset_size_for(method.points()))
        configs = methodology_configs(method, path)
    runs = run_points(configs, out / "runs", progress, timeout_s)
    points = summarize(out / "runs", out / "results")
    table = format_table(points)
    failed = [r for r in runs if r.returncode]
    if failed:
        table += "\n\nfailed points (their records say why):\n" + "\n".join(
            f"  {r.run_id}: exit {r.returncode} {r.error or ''}" for r in failed)
    (out / "bench.txt").write_text(table + "\n")
    return points, table, runs
