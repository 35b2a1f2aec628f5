"""Where a rank's start-up goes, with and without XLA and its persistent compilation cache.

    .venv/bin/python benchmarks/startup.py                      # U-Net tiny and base, 3 repeats, ~6 min on 2 cores
    .venv/bin/python benchmarks/startup.py --presets tiny --repeats 5 --out runs/startup

Short sweep points are dominated by the time from process start to the end of the first step. Each
run here is a real `cellavie train` process (single back-end, 2 steps); its final record's `startup_s`
splits that time into import, backend, data, build and first_step (docs/training.rst). Per preset:

* ``xla off``: the default graph (oneDNN kernels, no compilation);
* ``xla cold``: `xla: true` with an empty `train.compile_cache_dir` (compiles, then stores the cluster);
* ``xla warm``: the same again with the folder the cold run filled (loads the cluster).

Settings run interleaved, repeat by repeat, so drifting load hits them alike; the table gives medians
[min-max] and ratios of medians side by side. The warm run must hit: its header must report the cold
run's entries and it must add none (a miss would compile and store a new entry). A last table breaks
the import down (`python -X importtime`, medians of the repeats).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from allreduce import environment  # noqa: E402  (benchmarks/allreduce.py: versions, CPU, git commit)

from cellavie_hpc.train.compile_cache import entries  # noqa: E402

PYTHON = sys.executable
PARTS = ("import", "backend", "data", "build", "first_step", "total")
SETTINGS = ("xla off", "xla cold", "xla warm")
#: Modules whose cumulative import time the import table shows (as `python -X importtime` names them).
IMPORTS = ("cellavie_hpc.train.loop", "tensorflow", "keras._tf_keras", "matplotlib.pyplot", "numpy", "yaml")


def run(config: Path, run_dir: Path, overrides: list[str]) -> dict:
    """One training process; its header and final record."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1"}
    argv = [PYTHON, "-m", "cellavie_hpc", "train", str(config), *overrides, "--run-dir", str(run_dir), "--quiet",
            "--resume", "never"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    lines = [json.loads(line) for line in (run_dir / "records" / "rank-00000.jsonl").read_text().splitlines()]
    return {"header": lines[0], "final": lines[-1]}


def import_times(repeats: int) -> dict[str, float]:
    """Median cumulative import time (s) of IMPORTS and the summed own time of cellavie_hpc's modules."""
    samples: dict[str, list[float]] = {}
    for _ in range(repeats):
        code = "import cellavie_hpc.cli.train, cellavie_hpc.train.loop"
        proc = subprocess.run([PYTHON, "-X", "importtime", "-c", code], capture_output=True, text=True,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        own, seen = 0.0, {}
        for line in proc.stderr.splitlines():
            match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
            if not match:
                continue
            self_us, cumulative_us, name = int(match[1]), int(match[2]), match[4]
            seen.setdefault(name, cumulative_us / 1e6)
            own += self_us / 1e6 if name.startswith("cellavie_hpc") else 0.0
        for name in IMPORTS:
            samples.setdefault(name, []).append(seen.get(name, 0.0))
        samples.setdefault("cellavie_hpc (own code)", []).append(own)
    return {name: statistics.median(values) for name, values in samples.items()}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} [{min(values):.2f}-{max(values):.2f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"], choices=("tiny", "base"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", type=Path, help="folder for the data set, runs and caches (default: a temp dir)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    out = args.out or Path(tempfile.mkdtemp(prefix="cellavie-startup-"))
    env = environment()
    began = time.perf_counter()

    from cellavie_hpc.data.synthetic import generate_dataset

    dataset = out / "dataset"
    if not (dataset / "manifest.json").exists():
        generate_dataset(dataset, images=3, size=256, parasitemia=0.3, seed=1, workers=1, progress=False)
    config = out / "unet.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"name": "startup", "seed": 0},
        "data": {"dataset": str(dataset), "patch": args.patch, "stride": args.patch, "eval_images": 1},
        "model": {"name": "unet", "preset": "tiny"},
        "train": {"steps": 2, "batch_per_replica": args.batch, "intra_op_threads": 1, "inter_op_threads": 1,
                  "warmup_record_steps": 1, "progress_every": 1000}}))

    results: dict[tuple[str, str], list[dict]] = {}
    plan = [(rep, preset) for rep in range(args.repeats) for preset in args.presets]
    for i, (rep, preset) in enumerate(plan):
        cache = out / "cache" / f"{preset}-r{rep}"
        for setting in SETTINGS:
            overrides = [f"model.preset={preset}", f"train.xla={setting != 'xla off'}"]
            if setting != "xla off":
                overrides.append(f"train.compile_cache_dir={cache}")
            before = {e.name for e in entries(next(cache.glob("tf*"), cache))}
            result = run(config, out / "runs" / f"{preset}-{setting.replace(' ', '_')}-r{rep}", overrides)
            if setting != "xla off":
                folder = Path(result["header"]["compile_cache"]["dir"])
                result["found"] = result["header"]["compile_cache"]["entries"]
                result["added"] = len({e.name for e in entries(folder)} - before)
            results.setdefault((preset, setting), []).append(result)
            print(f"[{i + 1}/{len(plan)}] {preset} {setting} r{rep}: first step "
                  f"{result['final']['startup_s']['first_step']:.1f} s", file=sys.stderr, flush=True)

    def part(preset: str, setting: str, name: str) -> list[float]:
        return [r["final"]["startup_s"][name] for r in results[(preset, setting)]]

    print(f"\nStart-up of one rank, seconds from process start (median [min-max] of {args.repeats} repeats; measured): "
          f"U-Net, single back-end, patch {args.patch}, batch {args.batch}, 1 intra-op thread, "
          f"{env['cores']} cores, load {env['load_avg_1m']} at start, {os.getloadavg()[0]:.2f} at end")
    print(f"{'preset':<7}{'setting':<10}" + "".join(f"{p:>20}" for p in PARTS) + "  cache entries found; added")
    for preset in args.presets:
        for setting in SETTINGS:
            rows = results[(preset, setting)]
            cache = "" if setting == "xla off" else \
                f"{' '.join(str(r['found']) for r in rows)}; {' '.join(str(r['added']) for r in rows)}"
            print(f"{preset:<7}{setting:<10}" + "".join(f"{spread(part(preset, setting, p)):>20}" for p in PARTS)
                  + f"  {cache}")
    print("\nRatios of medians (first_step, total):")
    for preset in args.presets:
        med = {(s, p): statistics.median(part(preset, s, p)) for s in SETTINGS for p in ("first_step", "total")}
        for label, a, b in (("xla cold / xla off", "xla cold", "xla off"),
                            ("xla warm / xla cold", "xla warm", "xla cold"),
                            ("xla warm / xla off", "xla warm", "xla off")):
            print(f"  {preset:<6}{label:<22}first_step {med[(a, 'first_step')] / med[(b, 'first_step')]:5.2f}   "
                  f"total {med[(a, 'total')] / med[(b, 'total')]:5.2f}")
    hits = all(r["found"] >= 1 and r["added"] == 0 for p in args.presets for r in results[(p, "xla warm")])
    print(f"warm runs loaded the cold run's entries and compiled none: {'yes' if hits else 'NO'}")

    print(f"\nImport time, seconds (cumulative, `python -X importtime`, median of {args.repeats}):")
    for name, seconds in import_times(args.repeats).items():
        print(f"  {name:<28}{seconds:6.2f}")
    print(f"\nruns: {out}  total {time.perf_counter() - began:.0f} s")
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    return 0 if hits else 1


if __name__ == "__main__":
    sys.exit(main())
