"""What a run ran on: software versions, devices, git commit and peak memory.

These facts go into every record header so that a number in a report can be traced to the exact
software and hardware that produced it. Horovod is optional: its version is null when it does not import.
"""
from __future__ import annotations

import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import cellavie_hpc

_PACKAGE_DIR = Path(cellavie_hpc.__file__).resolve().parent


def horovod_version() -> str | None:
    try:
        import horovod
    except Exception:  # noqa: BLE001 - a broken Horovod build is reported as absent, not fatal
        return None
    return getattr(horovod, "__version__", None)


def versions() -> dict[str, str | None]:
    import keras
    import numpy
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "horovod": horovod_version(),
        "numpy": numpy.__version__,
        "cellavie_hpc": cellavie_hpc.__version__,
    }


def git_commit(path: Path = _PACKAGE_DIR) -> str | None:
    """The commit of the checkout the package runs from, with `+dirty` for local changes; null outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def cpu_name() -> str:
    """The CPU model (`/proc/cpuinfo`), else what `platform` knows: benchmarks and headers name the processor."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device() -> dict[str, Any]:
    """`{kind, name, count}` of the accelerators this process sees (the CPU when there is no GPU)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return {"kind": "gpu", "name": details.get("device_name", gpus[0].name), "count": len(gpus)}
    return {"kind": "cpu", "name": cpu_name(), "count": 1}


def peak_memory() -> tuple[int, str]:
    """(peak bytes, source): the first GPU's allocator peak when a GPU exists, else this process's peak RSS."""
    import tensorflow as tf

    if tf.config.list_logical_devices("GPU"):
        return int(tf.config.experimental.get_memory_info("GPU:0")["peak"]), "device"
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "rss"


def horovod_build() -> dict[str, Any]:
    """Which controllers and collective libraries the installed Horovod was built with (or why it is unusable)."""
    try:
        import horovod.tensorflow as hvd
    except Exception as err:  # noqa: BLE001 - reported, not raised: `cellavie info` must work without Horovod
        return {"available": False, "error": f"{type(err).__name__}: {err}"}
    return {"available": True, "version": horovod_version(), "mpi": hvd.mpi_built(), "gloo": hvd.gloo_built(),
            "nccl": bool(hvd.nccl_built()), "cuda": hvd.cuda_built(), "rocm": hvd.rocm_built(),
            "ddl": hvd.ddl_built(), "ccl": hvd.ccl_built()}


def collect_info() -> dict[str, Any]:
    """Everything `cellavie info` prints: versions, TF physical devices, Horovod build, job environment."""
    import dataclasses

    import tensorflow as tf

    from cellavie_hpc.launch import job_env

    return {
        "versions": versions(),
        "git_commit": git_commit(),
        "devices": {d.name: d.device_type for d in tf.config.list_physical_devices()},
        "horovod": horovod_build(),
        "job": dataclasses.asdict(job_env.detect()),
    }
