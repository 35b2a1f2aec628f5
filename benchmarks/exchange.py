"""Gradient-exchange improvements on/off, measured side by side with real 2-rank training runs.

    .venv/bin/python benchmarks/exchange.py                       # every launcher, 2 repeats
    .venv/bin/python benchmarks/exchange.py --launchers gloo --repeats 3 --out runs/exchange

For each launcher (Horovod under `horovodrun --gloo`, Horovod under `mpirun`, TensorFlow's
MultiWorkerMirroredStrategy over TF_CONFIG on loopback) it trains the tiny U-Net for a few steps per
setting: the baseline (grouped fp32 allreduce, Horovod's default fusion, no accumulation) and one
improvement switched on at a time - fp16 compression, gradient accumulation of 4 micro-batches (same
global batch, a quarter of the exchanges per sample), per-tensor allreduce (overlap with the backward
pass) and per-tensor allreduce with a tuned fusion threshold/cycle time (`propose_fusion_threshold`).
Settings run interleaved, repeat by repeat, so drifting machine load hits them alike. Records go to
OUT/<launcher>/<setting>/r<repeat>/ (a sweep directory); `cellavie_hpc.report.collect` reads them and the
table shows samples/s on vs off as a ratio of medians (min/max over the repeats' extremes), the exchange
share of step time (`measure_exchange`) and, for Horovod, the timeline's fusion and overlap figures.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from allreduce import environment  # noqa: E402  (benchmarks/allreduce.py: versions, CPU, git commit)

from cellavie_hpc.launch import job_env  # noqa: E402
from cellavie_hpc.launch.mpirun import local_mpirun, root_environment  # noqa: E402
from cellavie_hpc.report.collect import collect  # noqa: E402
from cellavie_hpc.report.timeline import TIMELINE_FILE, summarize_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BASE = ["train.intra_op_threads=1", "train.inter_op_threads=1", "train.progress_every=1000",
        "train.measure_exchange=true", "train.warmup_record_steps=2"]
LAUNCHERS = ("gloo", "mpirun", "multiworker")


def settings(launcher: str, fusion_bytes: int, batch: int) -> dict[str, list[str]]:
    """Setting name -> overrides; the first is the baseline every other one is compared with."""
    out = {"baseline": [f"train.batch_per_replica={batch}"],
           "fp16": [f"train.batch_per_replica={batch}", "train.allreduce_compression=fp16"],
           "accum4": [f"train.batch_per_replica={batch // 4}", "train.grad_accum=4"]}
    if launcher != "multiworker":
        for name in ("baseline", "fp16"):
            out[name].append("train.horovod.timeline=true")
        out["per_tensor"] = [f"train.batch_per_replica={batch}", "train.horovod.exchange=per_tensor",
                             "train.horovod.timeline=true"]
        out["per_tensor_tuned"] = out["per_tensor"] + [f"train.horovod.fusion_threshold_bytes={fusion_bytes}",
                                                       "train.horovod.cycle_time_ms=5"]
    return out


def commands(launcher: str, config: Path, run_dir: Path, overrides: list[str], port: int
             ) -> list[tuple[list[str], dict[str, str]]]:
    """(argv, extra environment) of one run: one process for Horovod's launchers, one per rank for multiworker."""
    backend = "multiworker" if launcher == "multiworker" else "horovod"
    train = [PYTHON, "-m", "cellavie_hpc", "train", str(config), *BASE, *overrides, f"train.backend={backend}",
             "--run-dir", str(run_dir), "--quiet", "--resume", "never"]
    if launcher == "gloo":
        return [([str(Path(PYTHON).parent / "horovodrun"), "-np", "2", "--gloo", "-H", "localhost:2", *train], {})]
    if launcher == "mpirun":
        return [([*local_mpirun(2), *train], root_environment())]  # local ranks inherit mpirun's environment
    workers = [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]
    return [(train, {"TF_CONFIG": job_env.tf_config(workers, r)}) for r in range(2)]


def run(launcher: str, config: Path, run_dir: Path, overrides: list[str], port: int) -> float:
    """Run one setting to completion; its wall time in seconds (start-up included)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    procs = [subprocess.Popen(argv, env={**env, **extra}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for argv, extra in commands(launcher, config, run_dir, overrides, port)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.returncode:
            raise SystemExit(f"{launcher} {run_dir}: exit {p.returncode}\n{err[-3000:]}")
    return time.perf_counter() - start


def ratio_text(on: list[float], off: list[float]) -> str:
    return (f"{statistics.median(on) / statistics.median(off):5.2f} "
            f"[{min(on) / max(off):.2f}, {max(on) / min(off):.2f}]")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--launchers", nargs="+", default=list(LAUNCHERS), choices=LAUNCHERS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="per-replica batch (a multiple of 4)")
    parser.add_argument("--out", type=Path, help="sweep folder (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="cellavie-exchange-"))
    env = environment()
    began = time.perf_counter()

    from cellavie_hpc.data.synthetic import generate_dataset
    from cellavie_hpc.models.registry import build_model
    from cellavie_hpc.train.backends import gradient_bytes, propose_fusion_threshold

    dataset = out / "dataset"
    if not (dataset / "manifest.json").exists():
        generate_dataset(dataset, images=3, size=256, parasitemia=0.3, seed=1, workers=1, progress=False)
    sizes = gradient_bytes(build_model("unet", "tiny", args.patch, 1).trainable_variables)
    fusion = propose_fusion_threshold(sizes)
    config = out / "unet.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"name": "exchange", "seed": 0},
        "data": {"dataset": str(dataset), "patch": args.patch, "stride": args.patch // 2, "eval_images": 1},
        "model": {"name": "unet", "preset": "tiny"},
        "train": {"steps": args.steps, "learning_rate": 0.003, "warmup_steps": 2}}))

    plan = [(launcher, name, overrides, rep) for rep in range(args.repeats) for launcher in args.launchers
            for name, overrides in settings(launcher, fusion, args.batch).items()]
    for i, (launcher, name, overrides, rep) in enumerate(plan):
        run_dir = out / launcher / name / f"r{rep}"
        point = f"run.point={{launcher: {launcher}, setting: {name}, repeat: {rep}}}"
        seconds = run(launcher, config, run_dir, [*overrides, point, f"run.name={launcher}-{name}-r{rep}"],
                      29500 + 2 * i)
        print(f"[{i + 1}/{len(plan)}] {launcher} {name} r{rep}: {seconds:.0f} s", file=sys.stderr, flush=True)

    collection, _ = collect([out / launcher for launcher in args.launchers], out / "results", progress=False)
    runs = collection.runs
    print(f"\nGradient exchange, 2 ranks on one machine, U-Net tiny, patch {args.patch}, per-replica batch "
          f"{args.batch}, {args.steps} steps ({env['cores']} cores, loopback; measured)")
    print(f"gradients: {len(sizes)} tensors, {sum(sizes)} bytes fp32; proposed fusion threshold {fusion} bytes")
    print(f"{'launcher':<12}{'setting':<18}{'samples/s (median)':>19}{'on/off [min, max]':>22}{'exchange share':>16}"
          f"{'tensors/msg':>12}{'overlap':>9}")
    for launcher in args.launchers:
        mine = runs[runs["run_id"].str.startswith(f"{launcher}-")]
        base = mine[mine["point.setting"] == "baseline"]["throughput_samples_per_s"].tolist()
        for name in settings(launcher, fusion, args.batch):
            rows = mine[mine["point.setting"] == name]
            rate = rows["throughput_samples_per_s"].tolist()
            share = statistics.median(rows["exchange_share"].tolist())
            fused, overlap = "", ""
            timelines = [out / launcher / name / f"r{r}" for r in range(args.repeats)]
            if all((t / TIMELINE_FILE).exists() for t in timelines):
                summaries = [summarize_run(t) for t in timelines]
                fused = f"{statistics.median(s.tensors_per_step / s.messages_per_step for s in summaries):.1f}"
                overlap = f"{statistics.median(s.overlap_share for s in summaries):.0%}"
            ratio = "  (baseline)" if name == "baseline" else ratio_text(rate, base)
            print(f"{launcher:<12}{name:<18}{statistics.median(rate):>19.2f}{ratio:>22}{share:>16.1%}"
                  f"{fused:>12}{overlap:>9}")
    print(f"\nrecords: {out}  (collected: {out / 'results'})  total {time.perf_counter() - began:.0f} s")
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
