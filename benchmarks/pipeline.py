"""Input-pipeline throughput: the tf.data pipeline vs a naive reader, side by side in one run.

Naive baseline: for each tile, read the whole hologram and truth images with tifffile and crop in
NumPy, one tile at a time. Candidates: `build_pipeline` (task refocus: field + phase) reading one
tile per Python call, `DEFAULT_READ_BATCH` tiles per call (the default) and from the in-memory image
cache (`cache=True`, warm). Threads = tf.data private pool size and parallel reads. Pipeline rates are
steady state (the first batch, with tracing and start-up, is left out). Prints tiles/s, MB/s of
delivered tensors (median of repeats) and the ratios.

    python benchmarks/pipeline.py [--images 4] [--size 2048] [--repeats 3] [--pixels 3e6]
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
import tifffile  # noqa: E402


def environment() -> str:
    import tensorflow as tf

    from cellavie_hpc.train.environment import cpu_name, git_commit

    return (f"python {platform.python_version()}, tensorflow {tf.__version__}, numpy {np.__version__}, "
            f"tifffile {tifffile.__version__}; CPU {cpu_name()} x{os.cpu_count()}; git {git_commit() or 'unknown'}")


def naive_rate(ds, tiles: np.ndarray, patch: int) -> tuple[float, int]:
    """Tiles/s and bytes delivered reading whole images with tifffile, cropping in NumPy."""
    start = time.perf_counter()
    nbytes = 0
    for image, y, x in tiles.tolist():
        pages = tifffile.imread(ds.path(image, "field"), key=range(ds.angles))
        pages = pages.reshape(ds.angles, *pages.shape[-3:])
        field = pages[:, y:y + patch, x:x + patch]
        phase = tifffile.imread(ds.path(image, "truth"), key=0)[y:y + patch, x:x + patch]
        nbytes += field.astype(np.float32).nbytes + phase.astype(np.float32).nbytes
    return len(tiles) / (time.perf_counter() - start), nbytes // len(tiles)


def pipeline_rate(ds, tiles: np.ndarray, patch: int, threads: int, **kwargs) -> tuple[float, int]:
    import tensorflow as tf

    from cellavie_hpc.data.pipeline import build_pipeline

    data = build_pipeline(ds, tiles, "refocus", batch=8, patch=patch, parallel_reads=threads,
                          drop_remainder=False, **kwargs)
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    data = data.with_options(options)
    batches = iter(data)
    next(batches)  # steady state: leave out pipeline start-up (tracing, first reads)
    start = time.perf_counter()
    count = nbytes = 0
    for inputs, targets in batches:
        count += inputs.shape[0]
        nbytes += inputs.numpy().nbytes + targets.numpy().nbytes
    return count / (time.perf_counter() - start), nbytes // max(count, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pixels", type=float, default=3e6, help="tile pixels per pipeline measurement (tiles repeat)")
    parser.add_argument("--naive-tiles", type=int, default=8, help="tiles per baseline measurement (slow)")
    args = parser.parse_args(argv)

    from cellavie_hpc.data.dataset import open_dataset
    from cellavie_hpc.data.pipeline import clear_image_cache
    from cellavie_hpc.data.sharding import shard
    from cellavie_hpc.data.synthetic import generate_dataset
    from cellavie_hpc.data.tiling import plan_tiles

    print(environment())
    with tempfile.TemporaryDirectory(prefix="cellavie-bench-") as tmp:
        generate_dataset(Path(tmp) / "ds", args.images, args.size, seed=0, workers=min(2, os.cpu_count() or 1),
                         progress=True)
        ds = open_dataset(Path(tmp) / "ds")
        print(f"data set: {args.images} images of {args.size}x{args.size}, {ds.angles} angle(s); task refocus, "
              f"batch 8; medians of {args.repeats} repeats; MB/s of delivered float32 tensors")
        header = (f"{'patch':>5} {'thr':>3} {'naive t/s':>10} {'per-tile t/s':>12} {'batched t/s':>11} "
                  f"{'batched MB/s':>12} {'cached t/s':>10} {'batched/naive':>13} {'batched/per-tile':>16}")
        print(header)
        for patch in (128, 256, 512, 1024):
            plan = plan_tiles([(im.height, im.width) for im in ds.images], patch)
            count = max(24, int(args.pixels / patch**2))
            tiles = np.resize(shard(plan, 1, 0, epoch=0, seed=0).tiles, (count, 3))
            for threads in (1, 2):
                runs = {"naive": [], "tile": [], "batch": [], "cached": []}
                mb = []
                for _ in range(args.repeats):
                    clear_image_cache()
                    runs["naive"].append(naive_rate(ds, tiles[: args.naive_tiles], patch)[0])
                    runs["tile"].append(pipeline_rate(ds, tiles, patch, threads, read_batch=1)[0])
                    rate, nbytes = pipeline_rate(ds, tiles, patch, threads)
                    runs["batch"].append(rate)
                    mb.append(rate * nbytes / 1e6)
                    pipeline_rate(ds, tiles, patch, threads, cache=True)  # warm the image cache
                    runs["cached"].append(pipeline_rate(ds, tiles, patch, threads, cache=True)[0])
                med = {k: statistics.median(v) for k, v in runs.items()}
                print(f"{patch:>5} {threads:>3} {med['naive']:>10.1f} {med['tile']:>12.1f} {med['batch']:>11.1f} "
                      f"{statistics.median(mb):>12.1f} {med['cached']:>10.1f} {med['batch'] / med['naive']:>13.1f} "
                      f"{med['batch'] / med['tile']:>16.2f}", flush=True)
        clear_image_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
