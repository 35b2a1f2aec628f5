"""Data at scale: start-up contention, read amplification, shard imbalance, staged and pre-tiled reads.

One command, four tables, all measured in this run on a synthetic data set (task refocus, 2 angles):

1. time to first batch per rank when R = 1, 2, 4, 8 real processes start at once on the same files
   (page cache of the files dropped first), and the time for those ranks to stage their locality shards
   to /dev/shm together (one copy per file per node, the others reuse it);
2. bytes fetched and decoded per byte used, tiled vs strip TIFF copies of the same data, patch 256/512;
3. imbalance between ranks when images differ in size: count- vs cost-balanced vs locality sharding
   (max/median per rank of tiles, bytes decoded and distinct file bytes), tiled and strip layouts;
4. pipeline tiles/s reading the original files (cold and warm page cache) vs staged on /dev/shm vs the
   pre-tiled cache (cold and warm), as ratios, medians of repeats.

    python benchmarks/data_at_scale.py [--images 4] [--size 1024] [--repeats 3] [--ranks 1,2,4,8]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from queue import Empty

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from pipeline import environment  # noqa: E402  (benchmarks/pipeline.py: versions, CPU, git commit)

ANGLES = 2
BATCH = 8
MIB = 1 << 20


def evict(paths) -> None:
    """Drop these files from the page cache so the next read comes from the disk (what a remote file
    system costs is at least this); tmpfs files (/dev/shm) cannot be dropped."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def data_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".tif", ".json", ".tiles"))


def first_batch_s(dataset, tiles, patch: int) -> float:
    """Seconds from nothing to the first (inputs, targets) batch of `build_pipeline` (tracing included)."""
    from cellavie_hpc.data.pipeline import build_pipeline

    start = time.perf_counter()
    inputs, _ = next(iter(build_pipeline(dataset, tiles, "refocus", BATCH, patch, parallel_reads=2,
                                         drop_remainder=False)))
    inputs.numpy()
    return time.perf_counter() - start


# --- 1. start-up of R ranks at once ------------------------------------------------------------------

def _rank_main(root: str, stage_root: str, rank: int, world: int, patch: int, barrier, queue) -> None:
    import tensorflow  # noqa: F401  (imported before the barrier: start-up, not data, is not timed)

    from cellavie_hpc.data.dataset import open_dataset
    from cellavie_hpc.data.pipeline import task_plan
    from cellavie_hpc.data.sharding import shard
    from cellavie_hpc.data.staging import stage_dataset

    barrier.wait()
    start = time.perf_counter()
    ds = open_dataset(root)
    plan = task_plan(ds, "refocus", patch)
    direct = time.perf_counter() - start + first_batch_s(ds, shard(plan, world, rank, seed=0).tiles, patch)
    barrier.wait()
    start = time.perf_counter()
    mine = shard(plan, world, rank, seed=0, locality=True).tiles
    _, report = stage_dataset(ds, mine, stage_root, 1 << 40, progress=False)
    queue.put((rank, direct, time.perf_counter() - start, report.bytes_copied, report.bytes_reused))


def startup_table(root: Path, ranks: list[int], patch: int, shm: Path) -> None:
    print(f"\n(1) R processes start together (page cache of the data set dropped): time to first batch "
          f"(open, plan, pipeline, batch {BATCH} of {patch} px; TF imported before the clock), then all stage "
          f"their locality shard to {shm}")
    print(f"{'R':>3} {'first batch med s':>17} {'max s':>6} {'max/R=1':>7} {'stage med s':>11} {'max s':>6} "
          f"{'MiB copied':>10} {'MiB reused':>10} {'data MiB':>8}")
    ctx = multiprocessing.get_context("spawn")
    base = None
    data_mib = sum(p.stat().st_size for p in data_files(root) if p.suffix == ".tif") / MIB
    for world in ranks:
        evict(data_files(root))
        stage_root = shm / f"stage-R{world}"
        barrier, queue = ctx.Barrier(world), ctx.Queue()
        procs = [ctx.Process(target=_rank_main, args=(str(root), str(stage_root), r, world, patch, barrier, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        rows = []
        while len(rows) < world:
            try:
                rows.append(queue.get(timeout=1))
            except Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed:
                    raise RuntimeError(f"a rank process failed (exit codes {failed}); see its traceback above") from None
        for p in procs:
            p.join()
        shutil.rmtree(stage_root, ignore_errors=True)
        direct = [r[1] for r in rows]
        stage = [r[2] for r in rows]
        base = base or max(direct)
        print(f"{world:>3} {statistics.median(direct):>17.2f} {max(direct):>6.2f} {max(direct) / base:>7.2f} "
              f"{statistics.median(stage):>11.3f} {max(stage):>6.3f} {sum(r[3] for r in rows) / MIB:>10.1f} "
              f"{sum(r[4] for r in rows) / MIB:>10.1f} {data_mib:>8.1f}", flush=True)


# --- 2. read amplification: tiled vs strip ----------------------------------------------------------

def strip_copy(ds, out: Path, compress_field: bool) -> Path:
    """The same data set with every TIFF rewritten in 16-row strips (truth zlib; field raw or zlib)."""
    import tifffile

    from cellavie_hpc.data.dataset import sha256_file
    from cellavie_hpc.data.tiff_io import TiffSource

    shutil.copytree(ds.root, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["images"]:
        for kind in ("field", "truth"):
            meta = entry["files"][kind]
            src = TiffSource(ds.root / meta["path"])
            zlib = kind == "truth" or compress_field
            with tifffile.TiffWriter(out / meta["path"]) as tw:
                for i in range(len(src.pages)):
                    page = src.read(i)
                    tw.write(page, rowsperstrip=16, photometric="minisblack", metadata=None,
                             planarconfig="contig" if page.ndim == 3 else None,
                             **({"compression": "zlib", "compressionargs": {"level": 1}} if zlib else {}))
            meta["bytes"] = (out / meta["path"]).stat().st_size
            meta["sha256"] = sha256_file(out / meta["path"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def read_rate(dataset, tiles, patch: int, repeats: int) -> float:
    """Tiles/s of the pipeline's batched reader alone (no TF), warm page cache, median of repeats."""
    from cellavie_hpc.data.pipeline import _TileReader

    reader = _TileReader(dataset, "refocus", patch, cache=False)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for k in range(0, len(tiles), BATCH):
            reader.read(tiles[k:k + BATCH])
        rates.append(len(tiles) / (time.perf_counter() - start))
    return statistics.median(rates)


def amplification_table(ds, work: Path, repeats: int) -> None:
    from cellavie_hpc.data.dataset import open_dataset
    from cellavie_hpc.data.io_stats import CountingDataset
    from cellavie_hpc.data.pipeline import _TileReader, task_plan

    layouts = {"tiled 256 (as generated)": ds,
               "strip 16 rows, field raw": open_dataset(strip_copy(ds, work / "strip-raw", False)),
               "strip 16 rows, all zlib": open_dataset(strip_copy(ds, work / "strip-zlib", True))}
    print("\n(2) bytes per byte used (field + truth files; task refocus reads field and truth windows), every tile "
          "of the plan once; 'half' = stride patch/2 (windows not aligned to TIFF tiles); reader tiles/s warm")
    print(f"{'layout':<26} {'patch':>5} {'stride':>6} {'file B/used':>11} {'decoded B/used':>14} {'tiles/s':>8} "
          f"{'vs tiled':>8}")
    for patch in (256, 512):
        for stride_name, stride in (("=patch", patch), ("half", patch // 2)):
            tiles = task_plan(ds, "refocus", patch, stride).tiles
            tiled_rate = None
            for name, dataset in layouts.items():
                counting = CountingDataset(dataset)
                _TileReader(counting, "refocus", patch, cache=False).read(tiles)
                total = counting.total()
                rate = read_rate(dataset, tiles, patch, repeats)
                tiled_rate = tiled_rate or rate
                print(f"{name:<26} {patch:>5} {stride_name:>6} {total.file_per_used:>11.2f} "
                      f"{total.decoded_per_used:>14.2f} {rate:>8.1f} {rate / tiled_rate:>8.2f}", flush=True)


# --- 3. imbalance with images of different sizes -----------------------------------------------------

def imbalance_table(images: int, seed: int) -> None:
    from cellavie_hpc.data.io_stats import layout_model, window_io
    from cellavie_hpc.data.pipeline import reflect_indices
    from cellavie_hpc.data.sharding import shard_all
    from cellavie_hpc.data.tiling import plan_tiles

    rng = np.random.default_rng(seed)
    sizes = [(int(h), int(w)) for h, w in rng.integers(8, 65, size=(images, 2)) * 64]   # 512..4096 px
    patch, stride = 256, 192
    plan = plan_tiles(sizes, patch, stride, border="reflect")
    field_px, truth_px = 8 * ANGLES, 9           # bytes per pixel: complex64 per angle; phase + instance + class
    file_bytes = np.array([h * w * (field_px + truth_px) for h, w in sizes], dtype=np.float64)
    print(f"\n(3) {images} images of {min(min(s) for s in sizes)}..{max(max(s) for s in sizes)} px (seed {seed}), "
          f"patch {patch}, stride {stride}, reflect border: {len(plan)} tiles; per rank per epoch: "
          "own tiles (pad repeats excluded; pad % = repeats among tiles read), decoded bytes read, "
          "distinct file bytes touched (what staging copies)")
    print(f"{'layout':<9} {'W':>3} {'sharding':<9} {'tiles max/med':>13} {'pad %':>6} {'decoded max/med':>15} "
          f"{'files max/med':>13} {'files MiB max':>13}")
    for layout_name, kwargs in (("tiled", {"tile": (256, 256)}), ("strip", {"rowsperstrip": 16})):
        models = {}
        costs = np.empty(len(plan))
        for k, (image, y, x) in enumerate(plan.tiles.tolist()):
            h, w = sizes[image]
            model = models.setdefault(image, (layout_model(h, w, field_px, **kwargs), layout_model(h, w, truth_px, **kwargs)))
            rows, cols = reflect_indices(y, patch, h), reflect_indices(x, patch, w)   # the window the reader asks for
            y0, x0 = int(rows.min()), int(cols.min())
            window = (y0, x0, int(rows.max()) + 1 - y0, int(cols.max()) + 1 - x0)
            costs[k] = sum(window_io(m, *window).decoded_bytes for m in model)
        cost_of = {tuple(t): c for t, c in zip(plan.tiles.tolist(), costs)}
        for world in (4, 16):
            for name, kw in (("count", {}), ("cost", {"balance": "cost", "costs": costs}),
                             ("locality", {"locality": True, "balance": "cost", "costs": costs})):
                shares = shard_all(plan, world, seed=seed, **kw)
                tiles = np.array([len(s) - int(s.padded.sum()) for s in shares], dtype=np.float64)
                decoded = np.array([sum(cost_of[t] for t in map(tuple, s.tiles.tolist())) for s in shares])
                touched = np.array([file_bytes[s.images()].sum() for s in shares])
                pad = 100.0 * sum(int(s.padded.sum()) for s in shares) / sum(len(s) for s in shares)
                print(f"{layout_name:<9} {world:>3} {name:<9} {tiles.max() / np.median(tiles):>13.3f} {pad:>6.1f} "
                      f"{decoded.max() / np.median(decoded):>15.3f} {touched.max() / np.median(touched):>13.3f} "
                      f"{touched.max() / MIB:>13.0f}")


# --- 4. pipeline from files vs staged vs pre-tiled cache ---------------------------------------------

def pipeline_pass(dataset, tiles, patch: int) -> float:
    """Tiles/s of one pass of `build_pipeline` over `tiles` (first batch left out: tracing)."""
    import tensorflow as tf

    from cellavie_hpc.data.pipeline import build_pipeline

    data = build_pipeline(dataset, tiles, "refocus", BATCH, patch, parallel_reads=2, drop_remainder=False)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 2
    batches = iter(data.with_options(options))
    next(batches)
    start = time.perf_counter()
    count = sum(int(inputs.shape[0]) for inputs, _ in batches)
    return count / (time.perf_counter() - start)


def routes_table(ds, work: Path, shm: Path, repeats: int) -> None:
    from cellavie_hpc.data.pipeline import task_plan
    from cellavie_hpc.data.staging import stage_dataset
    from cellavie_hpc.data.tile_cache import TileCache

    print(f"\n(4) pipeline tiles/s (refocus, batch {BATCH}, stride patch/2, 2 threads; median of {repeats}): "
          "original files cold (page cache dropped) / warm, staged to /dev/shm, pre-tiled cache cold / warm")
    print(f"{'patch':>5} {'tiles':>5} {'orig cold':>9} {'orig warm':>9} {'staged':>7} {'cache cold':>10} "
          f"{'cache warm':>10} {'staged/cold':>11} {'cache/cold':>10} {'cache/warm':>10} {'stage s':>7} "
          f"{'build s':>7} {'cache MiB':>9}")
    originals = data_files(ds.root)
    for patch in (256, 512):
        plan = task_plan(ds, "refocus", patch, patch // 2)
        order = np.random.default_rng(0).permutation(len(plan))
        tiles = plan.tiles[np.resize(order, max(len(plan), 4 * BATCH))]   # >= 4 batches: one left out, 3 timed
        start = time.perf_counter()
        staged, _ = stage_dataset(ds, tiles, shm / f"stage-{patch}", 1 << 40, progress=False)
        stage_s = time.perf_counter() - start
        start = time.perf_counter()
        cache = TileCache.build(work / f"refocus-{patch}.tiles", ds, plan.tiles, "refocus", patch, progress=False)
        build_s = time.perf_counter() - start
        view = cache.view(ds)
        runs = {k: [] for k in ("cold", "warm", "staged", "cache_cold", "cache_warm")}
        for _ in range(repeats):
            evict(originals)
            runs["cold"].append(pipeline_pass(ds, tiles, patch))
            runs["warm"].append(pipeline_pass(ds, tiles, patch))
            runs["staged"].append(pipeline_pass(staged, tiles, patch))
            evict([cache.path])
            runs["cache_cold"].append(pipeline_pass(view, tiles, patch))
            runs["cache_warm"].append(pipeline_pass(view, tiles, patch))
        m = {k: statistics.median(v) for k, v in runs.items()}
        print(f"{patch:>5} {len(tiles):>5} {m['cold']:>9.1f} {m['warm']:>9.1f} {m['staged']:>7.1f} "
              f"{m['cache_cold']:>10.1f} {m['cache_warm']:>10.1f} {m['staged'] / m['cold']:>11.2f} "
              f"{m['cache_cold'] / m['cold']:>10.2f} {m['cache_warm'] / m['warm']:>10.2f} {stage_s:>7.2f} "
              f"{build_s:>7.2f} {cache.nbytes / MIB:>9.1f}", flush=True)
        assert view.misses == 0, "the cache view read from the files: the benchmark would not measure the cache"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", default="1,2,4,8")
    parser.add_argument("--imbalance-images", type=int, default=24)
    parser.add_argument("--shm", default="/dev/shm", help="node-local memory file system for staging")
    args = parser.parse_args(argv)

    from cellavie_hpc.data.dataset import open_dataset
    from cellavie_hpc.data.synthetic import generate_dataset

    print(environment())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cellavie-scale-") as tmp, \
            tempfile.TemporaryDirectory(prefix="cellavie-scale-", dir=args.shm) as shm_tmp:
        work, shm = Path(tmp), Path(shm_tmp)
        generate_dataset(work / "ds", args.images, args.size, seed=0, angles=ANGLES,
                         workers=min(2, os.cpu_count() or 1), progress=True)
        ds = open_dataset(work / "ds")
        print(f"data set: {args.images} images of {args.size}x{args.size}, {ANGLES} angles, field 256-px tiles raw, "
              f"truth 256-px tiles zlib; data on {work} (local disk), staging on {shm}")
        startup_table(work / "ds", [int(r) for r in args.ranks.split(",")], 256, shm)
        amplification_table(ds, work, args.repeats)
        imbalance_table(args.imbalance_images, seed=1)
        routes_table(ds, work, shm, args.repeats)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
