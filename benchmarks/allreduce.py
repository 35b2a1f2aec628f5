"""Benchmark the allreduce engines on this machine: time vs message size, fitted latency and bandwidth.

    .venv/bin/python benchmarks/allreduce.py                  # 2 ranks per engine, 4 KB .. U-Net base gradient
    .venv/bin/python benchmarks/allreduce.py --engines mpi4py/mpi horovod/gloo --repeats 40

Launches `cellavie_hpc.launch.comm_probe` with 2 local ranks for each engine/transport, side by side in one
run: Horovod over Gloo (horovodrun --gloo), Horovod over MPI (mpirun, HOROVOD_CPU_OPERATIONS=mpi), raw
mpi4py Allreduce (mpirun; the reference every other engine is compared with) and TensorFlow's
MultiWorkerMirroredStrategy ring collectives (TF_CONFIG on loopback). Prints the median time per message
size (ratio to mpi4py), the ring alpha-beta fit per engine with bootstrap uncertainty and fit error, and
the environment; writes OUT/comm_fits.json (input of the calibration) and the per-rank comm records.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cellavie_hpc.launch import comm_probe
from cellavie_hpc.report.comm_model import write_comm_fits
from cellavie_hpc.train.environment import cpu_name, git_commit

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "mpi4py/mpi"
#: label -> (probe engine, local launcher, extra environment)
ENGINES = {
    "horovod/gloo": ("horovod", "horovodrun", {}),
    "horovod/mpi": ("horovod", "mpirun", {"HOROVOD_CPU_OPERATIONS": "mpi"}),
    REFERENCE: ("mpi4py", "mpirun", {}),
    "tf/ring": ("tf", "tf_config", {}),
}


def environment() -> dict[str, str]:
    def version(module: str) -> str:
        try:
            return __import__(module).__version__
        except ImportError:
            return "not installed"

    mpi = subprocess.run(["mpirun", "--version"], capture_output=True, text=True).stdout.splitlines()
    return {"python": platform.python_version(), "numpy": np.__version__, "tensorflow": version("tensorflow"),
            "horovod": version("horovod"), "mpi4py": version("mpi4py"), "mpi": mpi[0] if mpi else "?",
            "cpu": cpu_name(), "cores": str(os.cpu_count()), "load_avg_1m": f"{os.getloadavg()[0]:.2f}",
            "git_commit": git_commit() or "?"}


def _size(n: float) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--model", default="unet")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", type=Path, help="folder for the records and comm_fits.json (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="cellavie-allreduce-"))
    env = environment()
    start = time.perf_counter()
    grad = comm_probe.gradient_bytes(args.model, args.preset)
    probe_args = ["--model", args.model, "--preset", args.preset, "--gradient-bytes", str(grad),
                  "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    runs = {}
    for label in args.engines:
        engine, launcher, extra = ENGINES[label]
        t0 = time.perf_counter()
        print(f"[{label}] {launcher} x{args.nproc} ...", file=sys.stderr, flush=True)
        runs[label] = comm_probe.launch_local(engine, launcher, out / label.replace("/", "-"), args.nproc,
                                              probe_args, env=extra)
        print(f"[{label}] done in {time.perf_counter() - t0:.0f} s, results correct: {runs[label].check_ok}",
              file=sys.stderr, flush=True)
    fits = {label: comm_probe.fit_run(run) for label, run in runs.items()}
    write_comm_fits(fits.values(), out / "comm_fits.json", env)

    sizes = next(iter(runs.values())).message_bytes
    medians = {label: np.median(run.times_s, axis=1) for label, run in runs.items()}
    print(f"\nallreduce of fp32 messages, {args.nproc} ranks on one host; median of {args.repeats} calls "
          f"(slowest rank per call), ms [ratio to {REFERENCE}]")
    print(f"{'message':>10} " + " ".join(f"{label:>22}" for label in runs))
    for i, size in enumerate(sizes):
        cells = []
        for label in runs:
            ratio = medians[label][i] / medians[REFERENCE][i] if REFERENCE in medians else np.nan
            cells.append(f"{medians[label][i] * 1e3:10.3f} [{ratio:7.1f}x]" if np.isfinite(ratio)
                         else f"{medians[label][i] * 1e3:22.3f}")
        print(f"{_size(size):>10} " + " ".join(f"{c:>22}" for c in cells))
    print(f"\nring fit T = 2(p-1) alpha + 2(p-1)/p n / bandwidth (robust, bootstrap 200), "
          f"gradient of {args.model} {args.preset}: {_size(grad)}")
    print(f"{'engine':>14} {'alpha us':>16} {'bandwidth GB/s':>16} {'(p5-p95)':>14} {'rms err':>8} {'max err':>8} "
          f"{'grad pred ms':>13} {'grad meas ms':>13} {'correct':>8}")
    for label, fit in fits.items():
        band = f"{fit.bandwidth_p5_bytes_per_s / 1e9:.2f}-{fit.bandwidth_p95_bytes_per_s / 1e9:.2f}"
        print(f"{label:>14} {fit.alpha_s * 1e6:8.1f} +-{fit.alpha_std_s * 1e6:6.1f} "
              f"{fit.bandwidth_bytes_per_s / 1e9:16.3f} {band:>14} {fit.rms_rel_error:8.1%} {fit.max_rel_error:8.1%} "
              f"{float(fit.predict(grad, args.nproc)) * 1e3:13.2f} {medians[label][-1] * 1e3:13.2f} "
              f"{str(runs[label].check_ok):>8}")
    print("\nenvironment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"records and fits: {out} (comm_fits.json); total {time.perf_counter() - start:.0f} s")
    return 0 if all(run.check_ok for run in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
