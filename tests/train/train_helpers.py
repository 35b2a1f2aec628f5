"""Running `cellavie train` as real processes, and reading what they leave in RUN_DIR."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from cellavie_hpc.records.schema import validate

CELLAVIE = [sys.executable, "-m", "cellavie_hpc"]
#: Small, single-threaded, deterministic: what every training test starts from.
BASE_OVERRIDES = ["train.intra_op_threads=1", "train.inter_op_threads=1", "train.deterministic=true",
                  "train.progress_every=1000"]


def write_config(path: Path, dataset: Path, model: str = "unet", patch: int = 32, **train) -> Path:
    settings = {"backend": "single", "batch_per_replica": 4, "steps": 6, "learning_rate": 0.003,
                "rank_weights": True, **train}
    config = {"run": {"name": f"test-{model}", "seed": 3},
              "data": {"dataset": str(dataset), "patch": patch, "stride": patch, "eval_images": 1},
              "model": {"name": model, "preset": "tiny"}, "train": settings}
    path.write_text(yaml.safe_dump(config))
    return path


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for key in [k for k in out if k.startswith(("SLURM_", "OMPI_COMM_WORLD", "HOROVOD_", "PMI_"))] + ["TF_CONFIG"]:
        out.pop(key, None)
    out.update(extra)
    return out


def train_command(config: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [*CELLAVIE, "train", str(config), *BASE_OVERRIDES, *overrides, "--run-dir", str(run_dir)]


def run_train(config: Path, run_dir: Path, *overrides: str, expect: int = 0, timeout: int = 300):
    proc = subprocess.run(train_command(config, run_dir, *overrides), env=env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc


def records(run_dir: Path, rank: int = 0) -> list[dict]:
    """Every record of one rank's file, each checked against the schema."""
    lines = (run_dir / "records" / f"rank-{rank:05d}.jsonl").read_text().splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        record = json.loads(line)
        assert validate(record) == [], f"rank {rank} line {n}: {validate(record)}"
        out.append(record)
    return out


def weights(run_dir: Path, rank: int = 0) -> list[np.ndarray]:
    with np.load(run_dir / "weights" / f"rank-{rank:05d}.npz") as data:
        return [data[k] for k in sorted(data.files)]


def max_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert len(a) == len(b)
    return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b))


