"""Checkpoints that a requeued task resumes from exactly: weights, optimiser state and the position in the data.

One `.npz` per checkpoint in `RUN_DIR/checkpoints/`, written by rank 0 only: to a temporary name,
fsynced, then renamed, so a task killed mid-write leaves the previous checkpoint intact and never a
half-written one under a real name. The optimiser state includes its iteration count and, under
`mixed_float16`, the dynamic loss scale; model variables include Keras seed-generator states.
The position (`epoch`, `step_in_epoch`) plus the (seed, epoch) sharding make the data order after a
resume the same as without the interruption.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cellavie_hpc.errors import DataError

_NAME = re.compile(r"^ckpt-(\d{9})\.npz$")
KEEP = 2


@dataclasses.dataclass(frozen=True)
class Position:
    """Where training stands: `step` optimiser updates done, the current `epoch` and the steps done in it."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest(run_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step, or None."""
    found = sorted(p for p in checkpoint_dir(run_dir).glob("ckpt-*.npz") if _NAME.match(p.name))
    return found[-1] if found else None


def _values(variables: Sequence[Any]) -> list[np.ndarray]:
    return [np.asarray(v.numpy()) for v in variables]


def save(run_dir: str | Path, position: Position, model_variables: Sequence[Any],
         optimizer_variables: Sequence[Any], config_hash: str, keep: int = KEEP) -> Path:
    """Write a checkpoint atomically and keep the newest `keep`; returns its path."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {**dataclasses.asdict(position), "config_hash": config_hash,
            "model_variables": [getattr(v, "path", v.name) for v in model_variables],
            "optimizer_variables": [getattr(v, "path", v.name) for v in optimizer_variables]}
    arrays = {f"model/{i:05d}": a for i, a in enumerate(_values(model_variables))}
    arrays.update({f"optimizer/{i:05d}": a for i, a in enumerate(_values(optimizer_variables))})
    path = folder / f"ckpt-{position.step:09d}.npz"
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, __meta__=np.array(json.dumps(meta)), **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in sorted(p for p in folder.glob("ckpt-*.npz") if _NAME.match(p.name))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _assign(variables: Sequence[Any], arrays: dict[str, np.ndarray], prefix: str, path: Path) -> None:
    keys = sorted(k for k in arrays if k.startswith(prefix + "/"))
    if len(keys) != len(variables):
        raise DataError(f"{path}: holds {len(keys)} {prefix} variables, the model has {len(variables)}; "
                        "it was written by another model or configuration (use a fresh --run-dir or --resume never)")
    for key, var in zip(keys, variables):
        value = arrays[key]
        if tuple(value.shape) != tuple(var.shape):
            raise DataError(f"{path}: {prefix} variable {getattr(var, 'path', var.name)} has shape {tuple(var.shape)}, "
                            f"the checkpoint {tuple(value.shape)}")
        var.assign(value)


def load(path: str | Path, model_variables: Sequence[Any], optimizer_variables: Sequence[Any],
         config_hash: str) -> Position:
    """Restore variables from `path` and return the position to continue from."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable checkpoint ({err}); delete it to resume from the previous one") from err
    meta = json.loads(str(arrays.pop("__meta__")))
    if meta["config_hash"] != config_hash:
        raise DataError(f"{path}: written with configuration {meta['config_hash'][:12]}, this run has {config_hash[:12]}; "
                        "resume with the same configuration, or use a fresh --run-dir")
    _assign(model_variables, arrays, "model", path)
    _assign(optimizer_variables, arrays, "optimizer", path)
    return Position(step=meta["step"], epoch=meta["epoch"], step_in_epoch=meta["step_in_epoch"])
