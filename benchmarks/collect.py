"""Benchmark `cellavie collect`: records/s, peak memory, projected time for 200 runs x 256 ranks x 2,000 steps.

    .venv/bin/python benchmarks/collect.py              # 10 x 64 x 2,000 = 1.3 M records, about a minute
    .venv/bin/python benchmarks/collect.py --full       # 200 x 256 x 2,000 = 102 M records (~24 GB of disk)

Writes synthetic schema-1 records (one header, steps, an epoch record every 500 steps, a final record per
rank), then, side by side in one run on the same files, times the line-by-line `json.loads` reader
(baseline) and the chosen reader (byte split + Arrow's C++ JSON parser), as medians of repeats. Finally
`collect_runs` over the whole sweep runs in a fresh process (one core: Arrow threads off) for records/s
and peak RSS, and the projected time for the full size follows from that rate. Times are given as wall
and CPU seconds: on a shared machine (see the load average) the CPU time is the closer estimate of the
wall time on an idle core.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cellavie_hpc.records.reader import read_rank_file_slow, read_rank_files
from cellavie_hpc.records.schema import SCHEMA_VERSION, rank_file_name
from cellavie_hpc.train.environment import cpu_name, git_commit

FULL = (200, 256, 2000)
STEP = ('{"kind":"step","step":%d,"epoch":%d,"t_unix":%.6f,"wall_s":%.6f,"input_wait_s":%.6f,"compute_s":%.6f,'
        '"exchange_s":%.6f,"samples":32,"loss":%.6f,"mem_peak_bytes":%d,"mem_source":"device"}\n')


def write_sweep(root: Path, runs: int, ranks: int, steps: int, seed: int = 0) -> int:
    """Write the synthetic sweep; return the number of step records."""
    rng = np.random.default_rng(seed)
    for run in range(runs):
        run_dir = root / f"run-{run:04d}" / "records"
        run_dir.mkdir(parents=True)
        for rank in range(ranks):
            wall = 0.1 + 0.01 * rng.random(steps)
            wall[:3] = 4.0  # compile steps
            header = {"schema_version": SCHEMA_VERSION, "kind": "header", "run_id": f"run-{run:04d}", "attempt": 0,
                      "point": {"nodes": ranks // 4, "repeat": run}, "model": "unet", "backend": "horovod",
                      "world_size": ranks, "rank": rank, "local_rank": rank % 4, "nodes": max(1, ranks // 4),
                      "node": f"n{rank // 4}", "slurm": {}, "device": {"kind": "gpu", "name": "synthetic", "count": 4},
                      "versions": {}, "git_commit": None, "config_hash": "x", "flops_per_sample": 1e9,
                      "per_replica_batch": 32, "global_batch": 32 * ranks, "warmup_steps": 2, "time_unix": 1.7e9}
            lines = [json.dumps(header, separators=(",", ":")) + "\n"]
            t = 1.7e9
            for s in range(steps):
                t += wall[s]
                lines.append(STEP % (s, s // 500, t, wall[s], 0.1 * wall[s], 0.7 * wall[s], 0.2 * wall[s],
                                     1.0 / (s + 1), 3 << 30))
                if (s + 1) % 500 == 0:
                    lines.append('{"kind":"epoch","epoch":%d,"steps":%d,"samples":%d,"wall_s":1.0,"metrics":{}}\n'
                                 % (s // 500, s + 1, 32 * (s + 1)))
            lines.append('{"kind":"final","status":"completed","steps":%d,"samples":%d,"wall_s":%.3f,'
                         '"samples_per_s":1.0,"metrics":{},"error":null}\n' % (steps, 32 * steps, t - 1.7e9))
            (run_dir / rank_file_name(rank)).write_text("".join(lines))
    return runs * ranks * steps


def _time(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of `repeats` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def _child(root: str) -> None:
    """Run the whole collection in this fresh process and print its time and peak RSS as JSON."""
    from cellavie_hpc.report.collect import collect_runs

    start, start_cpu = time.perf_counter(), time.process_time()
    collection = collect_runs([root], progress=False)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    print(json.dumps({"seconds": elapsed, "cpu_seconds": cpu, "runs": len(collection.runs), "ranks": len(collection.ranks),
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _environment() -> str:
    import pyarrow

    return (f"python {platform.python_version()}, numpy {np.__version__}, pyarrow {pyarrow.__version__}; "
            f"CPU {cpu_name()} ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}); "
            f"git {git_commit() or '?'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2000, help="per rank (the full size's, by default)")
    parser.add_argument("--full", action="store_true", help="200 runs x 256 ranks x 2,000 steps")
    parser.add_argument("--compare-files", type=int, default=32, help="rank files in the side-by-side comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the records (default: a temporary folder)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return 0
    runs, ranks, steps = FULL if args.full else (args.runs, args.ranks, args.steps)
    root = Path(args.dir or tempfile.mkdtemp(prefix="cellavie-bench-collect-"))
    try:
        start = time.perf_counter()
        records = write_sweep(root / "sweep", runs, ranks, steps)
        size = sum(p.stat().st_size for p in (root / "sweep").rglob("*.jsonl"))
        print(f"wrote {runs} runs x {ranks} ranks x {steps} steps = {records:,} step records, "
              f"{size / 2**20:,.0f} MiB in {time.perf_counter() - start:.1f} s", file=sys.stderr)

        files = sorted((root / "sweep").rglob("rank-*.jsonl"))[: args.compare_files]
        n_cmp = len(files) * steps
        base = _time(lambda: [read_rank_file_slow(f) for f in files], args.repeats)
        fast = _time(lambda: list(read_rank_files(files)), args.repeats)

        child = subprocess.run([sys.executable, __file__, "--child", str(root / "sweep")], capture_output=True,
                               text=True, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
        result = json.loads(child.stdout.strip().splitlines()[-1])
        full_records = FULL[0] * FULL[1] * FULL[2]
        print(f"environment: {_environment()}")
        print(f"{'reader (same ' + str(len(files)) + ' rank files, median of ' + str(args.repeats) + ')':<50}"
              f"{'wall s':>9}{'records/s':>12}{'CPU s':>9}{'records/s':>12}")
        for label, (wall, cpu) in (("baseline: json.loads per line", base),
                                   ("candidate: byte split + Arrow JSON (fast path)", fast)):
            print(f"{label:<50}{wall:>9.3f}{n_cmp / wall:>12,.0f}{cpu:>9.3f}{n_cmp / cpu:>12,.0f}")
        print(f"{'speed-up (baseline / candidate)':<50}{base[0] / fast[0]:>8.2f}x{'':>12}{base[1] / fast[1]:>8.2f}x")
        print(f"whole collection ({result['runs']} runs, {result['ranks']} ranks, {records:,} step records, one process): "
              f"{result['seconds']:.1f} s wall ({records / result['seconds']:,.0f} records/s), "
              f"{result['cpu_seconds']:.1f} s CPU ({records / result['cpu_seconds']:,.0f} records/s), "
              f"peak RSS {result['peak_rss_mib']:.0f} MiB; load average now {os.getloadavg()[0]:.1f}")
        if args.full:
            print(f"full size measured: {result['seconds'] / 60:.1f} min wall, {result['cpu_seconds'] / 60:.1f} min CPU")
        else:
            print(f"projected for {FULL[0]} runs x {FULL[1]} ranks x {FULL[2]} steps ({full_records:,} records), "
                  f"not measured: {full_records / records * result['seconds'] / 60:.1f} min at this wall rate, "
                  f"{full_records / records * result['cpu_seconds'] / 60:.1f} min at this CPU rate")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
