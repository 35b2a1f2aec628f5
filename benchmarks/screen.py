"""Screening throughput: the batched, pipelined chain against a naive per-image pipeline, side by side.

    python benchmarks/screen.py [--models MODELS_DIR] [--dataset DATASET] [--images 3] [--size 1024] [--repeats 3]

Both pipelines run the same networks and maths (`ScreenOptions` vs `ScreenOptions.naive()`: one tile /
one cell crop per eager call, no prefetch, no XLA) over the same images, after one warm-up image each
(XLA compilation is not counted). Without --models an untrained tiny chain is used: the weights do not
change the work done. Prints cells/s of both as medians of repeats, their ratio, the projected time for
10^6 cells, and the environment. A GPU measurement through the Keras JAX back-end runs only when a GPU
is visible; otherwise the table says so.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _untrained_chain(root: Path) -> Path:
    import keras

    from cellavie_hpc.models.registry import build_model
    from cellavie_hpc.screen.models_dir import ChainSpec, NetworkEntry, save_chain

    keras.utils.set_random_seed(0)
    spec = ChainSpec(classifier=NetworkEntry(name="classifier", file="classifier.keras", patch=64))
    save_chain(root, spec, {"classifier": build_model("classifier", "tiny", 64, 1)})
    return root


def _timed(chain, ds, images) -> tuple[float, int]:
    t0 = time.perf_counter()
    cells = sum(r.n_cells for r in chain.screen(ds, images))
    return time.perf_counter() - t0, cells


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="MODELS_DIR (default: an untrained tiny chain)")
    parser.add_argument("--dataset", help="data set to screen (default: synthetic, generated here)")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import tensorflow as tf

    from cellavie_hpc.data.dataset import open_dataset
    from cellavie_hpc.data.synthetic import generate_dataset
    from cellavie_hpc.screen.chain import ScreenOptions, ScreeningChain
    from cellavie_hpc.train.environment import cpu_name, git_commit, versions

    with tempfile.TemporaryDirectory(prefix="cellavie-bench-screen-") as tmp:
        tmp = Path(tmp)
        if args.dataset:
            dataset = Path(args.dataset)
        else:
            dataset = tmp / "sample"
            generate_dataset(dataset, images=args.images + 1, size=args.size, parasitemia=1e-3, seed=11,
                             workers=None, progress=False)
        models = Path(args.models) if args.models else _untrained_chain(tmp / "models")
        ds = open_dataset(dataset)
        if len(ds.images) < 2:
            raise SystemExit(f"{dataset}: need at least 2 images (one warm-up, one timed)")
        timed = list(range(1, min(len(ds.images), args.images + 1)))
        options = ScreenOptions()
        rows = {}
        for label, opts, repeats in (("naive (1 tile/crop per call, no prefetch, no XLA)", options.naive(), 1),
                                     ("chain (batched, prefetch, XLA if GPU)", options, args.repeats)):
            chain = ScreeningChain(models, opts)
            _timed(chain, ds, [0])                       # warm-up: tracing, XLA compile, kernel caches
            runs = [_timed(chain, ds, timed) for _ in range(repeats)]
            wall = statistics.median(r[0] for r in runs)
            rows[label] = (runs[0][1], wall, runs[0][1] / wall, repeats)
        (base_cells, base_wall, base_rate, _), (cells, wall, rate, _) = rows.values()
        print(f"screening throughput, {len(timed)} images of {ds.images[1].height}x{ds.images[1].width} "
              f"(median of repeats after one warm-up image)")
        print(f"{'pipeline':<52} {'repeats':>7} {'cells':>7} {'wall_s':>8} {'cells/s':>9}")
        for label, (c, w, r, n) in rows.items():
            print(f"{label:<52} {n:>7} {c:>7} {w:>8.2f} {r:>9.1f}")
        print(f"ratio chain / naive: {rate / base_rate:.2f}x (goal >= 5x)")
        print(f"projected time for 10^6 cells: chain {1e6 / rate / 3600:.2f} h, naive {1e6 / base_rate / 3600:.2f} h "
              "(one process on this machine)")
        if tf.config.list_physical_devices("GPU"):
            print("GPU visible: run `KERAS_BACKEND=jax python benchmarks/screen.py` for the JAX back-end figure")
        else:
            print("no GPU available: the Keras JAX back-end GPU measurement was not run")
        v = versions()
        print("environment: " + ", ".join(f"{k} {v[k]}" for k in v) + f"; cpu {cpu_name()} x{os.cpu_count()}; "
              f"git {git_commit()}; keras backend {os.environ.get('KERAS_BACKEND', 'tensorflow')}; "
              f"python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
