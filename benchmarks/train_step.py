"""Training throughput: a plain `model.fit` baseline vs the project's engine, side by side in one run.

Per model, in one process, repeats interleaved (baseline, optimised, baseline, ...) so
that load on the machine hits all candidates alike:

* baseline  - `model.fit` of the same model and loss, fp32, no XLA, fed by a Python generator that
              reads the whole hologram/truth images with tifffile for every tile and crops in NumPy.
* optimised - `cellavie_hpc.train.loop.train` (tf.data batched window reads, parallel, prefetched,
              whole images cached) with the switches given: precision, XLA, steps per execution.
              Defaults: what measured fastest on this 2-core AVX512_BF16 CPU (fp32, XLA off, one step
              per call; benchmarks/RESULTS.md has the on/off measurements). On a GPU pass
              `--precision mixed_float16 --xla`.

Rates are samples/s over the steps after `--warmup` (tracing/compilation excluded), median over
repeats, with min-max; the engine's rates and input-wait share (time blocked in `next(iterator)`
over wall time) come from its own records through the collector. `--portable` measures the models
with `perf.portable` on the installed Keras back-end instead (synthetic batches, no input pipeline:
the GPU-machine path): baseline = fp32 without jit, optimised = `--precision` with jit
(`--portable --precision mixed_bfloat16` on CPUs with AVX512_BF16, `mixed_float16` on GPUs).

    python benchmarks/train_step.py [--models unet,refocus,detector,classifier] [--repeats 3]
        [--steps 16] [--patch 64] [--batch 16] [--precision fp32] [--xla/--no-xla]
        [--steps-per-execution 1] [--portable]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

MODELS = ("refocus", "unet", "detector", "classifier")
#: Model options for both candidates: the engine's pipeline feeds the refocus model its phase target only.
OPTIONS = {"refocus": {"defocus_head": False}}


def naive_batches(ds, spec, tiles: np.ndarray, batch: int, seed: int):
    """Endless batches: per tile, read whole images with tifffile, crop in NumPy, targets from `spec`."""
    import tensorflow as tf
    import tifffile

    rng = np.random.default_rng(seed)
    p = spec.patch
    while True:
        for start in range(0, len(tiles) - batch + 1, batch):
            xs, ys = [], []
            for image, y, x in tiles[rng.permutation(len(tiles))[:batch]].tolist():
                truth = {k: tifffile.imread(ds.path(image, "truth"), key=i)[y:y + p, x:x + p]
                         for i, k in enumerate(("phase", "instance", "cls"))}
                if spec.input_kind == "field":
                    pages = tifffile.imread(ds.path(image, "field"), key=range(ds.angles))
                    pages = pages.reshape(ds.angles, *pages.shape[-3:])[:, y:y + p, x:x + p]  # (A, p, p, 2)
                    xs.append(pages.transpose(1, 2, 0, 3).reshape(p, p, 2 * ds.angles).astype(np.float32))
                else:
                    xs.append(truth["phase"][..., None].astype(np.float32))
                target = spec.targets.from_truth({"phase": tf.constant(truth["phase"], tf.float32),
                                                  "instance": tf.constant(truth["instance"].astype(np.int32)),
                                                  "cls": tf.constant(truth["cls"].astype(np.int32))})
                ys.append({k: np.asarray(v) for k, v in target.items()})
            yield np.stack(xs), {k: np.stack([t[k] for t in ys]) for k in ys[0]}


def baseline_rate(ds, model_name: str, preset: str, patch: int, batch: int, steps: int, warmup: int,
                  tiles: np.ndarray, seed: int) -> dict:
    """samples/s of `model.fit` (fp32, no XLA) on the naive generator, over the batches after `warmup`."""
    import keras

    from cellavie_hpc.models.registry import build_model, model_spec
    from cellavie_hpc.perf.portable import SpecTrainer

    keras.backend.clear_session()
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(seed)
    channels = 2 * ds.angles if model_name == "refocus" else 1
    options = OPTIONS.get(model_name, {})
    spec = model_spec(model_name, preset, patch, channels, **options)
    trainer = SpecTrainer(build_model(model_name, preset, patch, channels, **options), spec.loss)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    ends: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, step, logs=None):
            ends.append(time.perf_counter())

    trainer.fit(naive_batches(ds, spec, tiles, batch, seed), steps_per_epoch=warmup + steps, epochs=1, verbose=0, callbacks=[Clock()])
    wall = ends[-1] - ends[warmup - 1]
    return {"samples_per_s": batch * (len(ends) - warmup) / wall}


def engine_rate(dataset: Path, model_name: str, preset: str, patch: int, batch: int, steps: int, warmup: int,
                run_dir: Path, seed: int, precision: str = "fp32", xla: bool = False, spe: int = 1) -> dict:
    """samples/s and input-wait share of the engine's `train()`, read from its records by the collector."""
    import keras

    from cellavie_hpc.report.collect import collect_run
    from cellavie_hpc.train import config as train_config
    from cellavie_hpc.train.loop import train

    keras.backend.clear_session()
    config = train_config.resolve({
        "run": {"name": run_dir.name, "seed": seed},
        "data": {"dataset": str(dataset), "patch": patch, "cache": True, "prefetch": -1, "parallel_reads": -1,
                 "eval_images": 0},
        "model": {"name": model_name, "preset": preset, "options": OPTIONS.get(model_name, {})},
        "train": {"batch_per_replica": batch, "steps": warmup + steps, "warmup_record_steps": warmup,
                  "precision": precision, "xla": xla, "steps_per_execution": spe, "progress_every": 10_000},
    })
    train(config, run_dir, resume="never", progress=None)
    row, _, _ = collect_run(run_dir)
    return {"samples_per_s": float(row["throughput_samples_per_s"]), "input_wait_share": float(row["input_wait_share"])}


def environment_line() -> str:
    import keras

    from cellavie_hpc.perf.portable import device

    versions = f"python {platform.python_version()}, keras {keras.__version__} ({keras.backend.backend()}"
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        versions += f" {tf.__version__}"
    elif keras.backend.backend() == "jax":
        import jax

        versions += f" {jax.__version__}"
    from cellavie_hpc.train.environment import cpu_name, git_commit  # no TensorFlow needed for either

    return (f"{versions}), numpy {np.__version__}; CPU {cpu_name()} x{os.cpu_count()}; device {device()['name']}; "
            f"git {git_commit() or 'unknown'}; load average {os.getloadavg()[0]:.1f}")


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} [{min(values):.1f}-{max(values):.1f}]"


def run_engine_bench(args) -> list[tuple]:
    from cellavie_hpc.data.dataset import open_dataset
    from cellavie_hpc.data.pipeline import task_plan
    from cellavie_hpc.data.synthetic import generate_dataset

    work = Path(tempfile.mkdtemp(prefix="cellavie-train-step-"))
    generate_dataset(work / "ds", images=args.images, size=args.size, parasitemia=0.05, seed=2, workers=1,
                     progress=False)
    ds = open_dataset(work / "ds")
    rows = []
    for name in args.models:
        plan = task_plan(ds, name, args.patch)
        tiles = plan.tiles  # the engine trains on every image too (eval_images: 0)
        inside = ((tiles[:, 1] >= 0) & (tiles[:, 2] >= 0) & (tiles[:, 1] + args.patch <= args.size)
                  & (tiles[:, 2] + args.patch <= args.size))
        tiles = tiles[inside]
        rates: dict[str, list[float]] = {"baseline": [], "optimised": []}
        waits: list[float] = []
        for r in range(args.repeats):
            sys.stderr.write(f"train_step: {name} repeat {r + 1}/{args.repeats}\n")
            common = (name, args.preset, args.patch, args.batch, args.steps, args.warmup)
            rates["baseline"].append(baseline_rate(ds, *common, tiles, r)["samples_per_s"])
            out = engine_rate(work / "ds", *common, work / f"{name}-o{r}", r, args.precision, args.xla,
                              args.steps_per_execution)
            rates["optimised"].append(out["samples_per_s"])
            waits.append(out["input_wait_share"])
        ratio = statistics.median(rates["optimised"]) / statistics.median(rates["baseline"])
        rows.append((name, spread(rates["baseline"]), spread(rates["optimised"]), f"{ratio:5.2f}x",
                     f"{100 * statistics.median(waits):5.2f} %"))
    return [("model", "baseline samples/s", "optimised samples/s", "ratio", "input wait (optimised)")] + rows


def run_portable_bench(args) -> list[tuple]:
    from cellavie_hpc.perf import portable

    rows = []
    for name in args.models:
        base, best = [], []
        for r in range(args.repeats):
            sys.stderr.write(f"train_step --portable: {name} repeat {r + 1}/{args.repeats}\n")
            base.append(portable.measure(name, args.preset, args.patch, args.batch, "fp32", False, args.steps,
                                         args.warmup).samples_per_s)
            best.append(portable.measure(name, args.preset, args.patch, args.batch, args.precision, True,
                                         args.steps, args.warmup).samples_per_s)
        rows.append((name, spread(base), spread(best), f"{statistics.median(best) / statistics.median(base):5.2f}x"))
    return [("model", "fp32 no-jit samples/s", f"{args.precision} jit", "ratio")] + rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
    parser.add_argument("--preset", default="tiny", choices=("tiny", "base"))
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out at the start of each run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--images", type=int, default=6, help="synthetic data-set size (images)")
    parser.add_argument("--size", type=int, default=512, help="image side, pixels")
    parser.add_argument("--precision", default="fp32",
                        choices=("fp32", "mixed_float16", "mixed_bfloat16"), help="optimised run's precision")
    parser.add_argument("--xla", action=argparse.BooleanOptionalAction, default=False,
                        help="optimised run: XLA-compile the step (measured slower on this CPU; on for GPUs)")
    parser.add_argument("--steps-per-execution", type=int, default=1, help="optimised run: steps per call")
    parser.add_argument("--portable", action="store_true", help="perf.portable on the installed Keras back-end")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or args.repeats < 1 or args.steps < 1 or args.warmup < 1:
        parser.error(f"models among {', '.join(MODELS)}; repeats, steps and warmup >= 1 (got {args.models})")
    start = time.perf_counter()
    rows = run_portable_bench(args) if args.portable else run_engine_bench(args)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    print(f"train_step ({'portable' if args.portable else 'engine'}): preset {args.preset}, patch {args.patch}, "
          f"batch {args.batch}, {args.steps} measured steps after {args.warmup}, median [min-max] of "
          f"{args.repeats} repeats; optimised = {args.precision}, xla={args.xla}, "
          f"steps_per_execution={args.steps_per_execution}")
    for row in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
    print(environment_line())
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
