"""Stage a rank's files on node-local storage ($TMPDIR, /dev/shm, a local SSD) before training.

Many ranks reading the same few large hologram files from a parallel file system contend for its
metadata servers and bandwidth, every epoch. Staging copies, once per node, the whole files a rank's
shard touches to local storage and gives back a data-set view whose paths point at the copies.

* Only the files the shard reads (`field`/`truth`/`cells` per image, by task), within `budget_bytes`:
  files go largest read share first (bytes the shard reads from them per epoch); what does not fit,
  or does not fit the free space, is read from the original location.
* Copies are content-addressed (`<sha256 prefix>-<name>`), written to a temporary name while hashing
  and renamed only if the hash matches the manifest: a present copy is complete and verified.
* A per-file lock (`fcntl.flock`) makes the other ranks of a node wait for the copy and reuse it,
  so each file is copied once per node.

Use locality sharding (`shard(..., locality=True)`) so a rank's images stay the same every epoch;
without it every rank reads every image and must stage the whole data set.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cellavie_hpc.data.dataset import HologramDataset
from cellavie_hpc.errors import ConfigError, DataError
from cellavie_hpc.progress import Progress

#: Files each task reads per image (`cells` is the classifier's crop list).
TASK_KINDS = {"refocus": ("field", "truth"), "unet": ("truth",), "detector": ("truth",),
              "classifier": ("truth", "cells")}
STAGE_SUBDIR = "cellavie-stage"
_BLOCK = 1 << 22
#: Free space left on the staging file system (bytes), for the job's other temporary files.
FREE_MARGIN_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class StageReport:
    """What `stage_dataset` did (bytes and seconds)."""

    stage_dir: Path
    budget_bytes: int
    files_copied: int
    files_reused: int      # already staged by another rank of the node (or an earlier run)
    files_remote: int      # over budget or free space: read from the original location
    bytes_copied: int
    bytes_reused: int
    bytes_remote: int
    seconds: float

    @property
    def bytes_local(self) -> int:
        return self.bytes_copied + self.bytes_reused

    def line(self) -> str:
        mib = 1 << 20
        return (f"staged {self.files_copied + self.files_reused} files ({self.bytes_local / mib:.1f} MiB: "
                f"{self.bytes_copied / mib:.1f} copied, {self.bytes_reused / mib:.1f} reused) to {self.stage_dir} "
                f"in {self.seconds:.2f} s; {self.files_remote} files ({self.bytes_remote / mib:.1f} MiB) stay remote"
                + ("" if self.budget_bytes == sys.maxsize else f" (budget {self.budget_bytes / mib:.1f} MiB)"))


class Staged(NamedTuple):
    dataset: HologramDataset
    report: StageReport


@dataclasses.dataclass(frozen=True)
class _File:
    image: int
    kind: str
    source: Path
    bytes: int
    sha256: str
    read_share: float      # proportional to the bytes the shard reads from it per epoch


def resolve_stage_dir(stage_dir: str | os.PathLike) -> Path:
    """Expand `~` and `$VARS` (e.g. `$TMPDIR`, set per job by Slurm); an unset variable is a ConfigError."""
    text = os.path.expanduser(os.path.expandvars(str(stage_dir)))
    if "$" in text:
        raise ConfigError(f"stage_dir {str(stage_dir)!r}: environment variable not set (expanded to {text!r}); "
                          "set it or give a plain path such as /dev/shm")
    return Path(text)


def shard_files(dataset: HologramDataset, selection: np.ndarray, kinds: tuple[str, ...]) -> list[_File]:
    """The files a shard reads, largest read share first.

    `selection` is a shard's tiles ((n, 3) `(image, y, x)`) or image indices ((k,): each image read
    whole). A file's read share is tiles x its bytes per pixel (whole-image reads count H x W tiles):
    proportional to the bytes the shard reads from it per epoch, the patch being the same for all.
    """
    selection = np.asarray(selection, dtype=np.int64)
    images = selection[:, 0] if selection.ndim == 2 else selection.reshape(-1)
    if images.size and (images.min() < 0 or images.max() >= len(dataset.images)):
        raise ConfigError(f"the shard names images outside 0..{len(dataset.images) - 1} of {dataset.root}")
    counts = np.bincount(images, minlength=len(dataset.images)).astype(np.float64)
    entries = {e["id"]: e for e in dataset.manifest["images"]}
    files = []
    for image in np.flatnonzero(counts).tolist():
        info = dataset.images[image]
        pixels = info.height * info.width
        weight = counts[image] if selection.ndim == 2 else counts[image] * pixels
        for kind in kinds:
            meta = entries[info.id]["files"][kind]
            size = int(meta["bytes"])
            files.append(_File(image, kind, dataset.path(image, kind), size, meta["sha256"], weight * size / pixels))
    files.sort(key=lambda f: (-f.read_share, -f.bytes, f.image, f.kind))
    return files


def stage_dataset(dataset: HologramDataset, selection: np.ndarray, stage_dir: str | os.PathLike,
                  budget_bytes: int | None, *, task: str = "refocus", verify_reused: bool = False,
                  progress: bool = True) -> Staged:
    """Copy the files `selection` reads into `stage_dir` (within `budget_bytes`) and return a view on them.

    `budget_bytes=None` stages everything that fits the free space (less `FREE_MARGIN_BYTES`).
    The view is a `HologramDataset` with the same images, manifest and root (so error messages and
    in-memory caches name the data set), whose files are the local copies where staged. Staged data
    reads bitwise the same as the original. `verify_reused=True` re-hashes copies found already staged
    (normally trusted: they were renamed into place only after their hash matched).
    """
    if task not in TASK_KINDS:
        raise ConfigError(f"task must be one of {', '.join(TASK_KINDS)}, got {task!r}")
    if budget_bytes is None:
        budget_bytes = sys.maxsize
    elif isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)) or budget_bytes < 0:
        raise ConfigError(f"stage budget_bytes must be null (no limit) or an integer >= 0, got {budget_bytes!r}")
    start = time.perf_counter()
    folder = resolve_stage_dir(stage_dir) / STAGE_SUBDIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"stage_dir {folder}: cannot be created ({err.strerror or err}); "
                          "choose a writable node-local folder") from None
    files = shard_files(dataset, selection, TASK_KINDS[task])
    staged: dict[tuple[int, str], Path] = {}
    counts = {"copied": [0, 0], "reused": [0, 0], "remote": [0, 0]}
    used = 0
    with Progress(len(files), "stage", enabled=progress, unit="file") as bar:
        for f in files:
            target = folder / f"{f.sha256[:16]}-{f.source.name}"
            fits = used + f.bytes <= budget_bytes
            outcome = _stage_one(f, target, verify_reused) if fits else "remote"
            if outcome != "remote":
                staged[(f.image, f.kind)] = target
                used += f.bytes
            counts[outcome][0] += 1
            counts[outcome][1] += f.bytes
            bar.update()
    report = StageReport(folder, int(budget_bytes), counts["copied"][0], counts["reused"][0], counts["remote"][0],
                         counts["copied"][1], counts["reused"][1], counts["remote"][1], time.perf_counter() - start)
    return Staged(_view(dataset, staged), report)


def _stage_one(f: _File, target: Path, verify_reused: bool) -> str:
    """Copy one file under its lock: 'copied', 'reused' (present and complete) or 'remote' (no room)."""
    with open(target.with_name(target.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if target.is_file() and target.stat().st_size == f.bytes:
                if verify_reused and _sha256(target) != f.sha256:
                    target.unlink()
                else:
                    return "reused"
            if shutil.disk_usage(target.parent).free < f.bytes + FREE_MARGIN_BYTES:
                return "remote"
            _copy_verified(f, target)
            return "copied"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _copy_verified(f: _File, target: Path) -> None:
    tmp = target.with_name(f"{target.name}.tmp.{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(f.source, "rb") as src, open(tmp, "wb") as dst:
            for block in iter(lambda: src.read(_BLOCK), b""):
                digest.update(block)
                dst.write(block)
        if digest.hexdigest() != f.sha256:
            raise DataError(f"{f.source}: sha256 does not match the manifest (corrupted or modified); "
                            "restore the file or regenerate the data set before staging")
        os.replace(tmp, target)
    except OSError as err:
        raise DataError(f"{f.source}: staging to {target} failed ({err.strerror or err}); "
                        "check the staging folder's free space and permissions") from None
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        for block in iter(lambda: src.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _view(dataset: HologramDataset, staged: dict[tuple[int, str], Path]) -> HologramDataset:
    """The same data set with the staged files' manifest paths made absolute (root / absolute = absolute)."""
    by_id = {e["id"]: e for e in dataset.manifest["images"]}
    entries = []
    for image, info in enumerate(dataset.images):
        entry = dict(by_id[info.id])
        entry["files"] = {kind: (dict(meta, path=str(staged[(image, kind)])) if (image, kind) in staged else meta)
                          for kind, meta in entry["files"].items()}
        entries.append(entry)
    return HologramDataset(dataset.root, dataset.manifest, entries, list(dataset.skipped))
