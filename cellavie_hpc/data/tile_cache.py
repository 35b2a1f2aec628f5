"""A pre-tiled cache: the windows a tile plan reads, decoded once into one flat file, one record per window.

Training reads the same tiles every epoch, each time fetching and decoding the TIFF tiles that overlap
them (four 256-pixel TIFF tiles for an unaligned 256-pixel patch). The cache stores, per window the
pipeline requests, the decoded field (complex64 (A, P, P), i.e. (A, P, P, 2) float32 real/imag) and
truth rasters side by side in one fixed-size record, so a tile is one contiguous read with no decoding.

`TileCache.build(path, dataset, tiles, task, patch)` writes it (progress on stderr; to a temporary name
renamed when complete; under a file lock, so ranks sharing the path build it once) or reuses a valid
one; `TileCache.open` only accepts a cache whose header matches the data set (manifest checksums of
its images) and, when given, the tile plan (plan hash), and refuses a stale one naming the mismatch.
`cache.view(dataset)` is a data-set view (same read API) serving cached windows and reading anything
else from the files, so `build_pipeline(cache.view(ds), tiles, task, ...)` yields the batches of
`build_pipeline(ds, tiles, task, ...)` bitwise.

File layout: 8-byte magic, uint64 header length, JSON header, then (4 KiB aligned) the window index
(M, 5) int64 `(image, y0, x0, h, w)` and the M records (NumPy structured dtype given in the header).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
import sys
import threading
from pathlib import Path

import numpy as np

from cellavie_hpc.data.pipeline import TASKS, reflect_indices
from cellavie_hpc.errors import ConfigError, DataError
from cellavie_hpc.progress import Progress

MAGIC = b"CLVTILE1"
FORMAT_VERSION = 1
_ALIGN = 4096
_TRUTH = (("phase", "<f4"), ("instance", "<i4"), ("cls", "u1"))


def tile_windows(dataset, tiles: np.ndarray, patch: int) -> np.ndarray:
    """Unique in-bounds windows `(image, y0, x0, h, w)` (M, 5) that reading `tiles` requests, sorted.

    A tile reaching past a border is read as its clipped in-bounds window and reflect-padded by the
    pipeline, so the window, not the tile, is what the files are asked for.
    """
    tiles = np.asarray(tiles, dtype=np.int64).reshape(-1, 3)
    windows = np.empty((len(tiles), 5), dtype=np.int64)
    for k, (image, y, x) in enumerate(tiles.tolist()):
        info = dataset.images[image]
        rows = reflect_indices(y, patch, info.height)
        cols = reflect_indices(x, patch, info.width)
        y0, x0 = int(rows.min()), int(cols.min())
        windows[k] = (image, y0, x0, int(rows.max()) + 1 - y0, int(cols.max()) + 1 - x0)
    return np.unique(windows, axis=0) if len(windows) else windows


def plan_hash(tiles: np.ndarray, task: str, patch: int) -> str:
    """sha256 of the tile plan a cache serves (tiles in order, task, patch)."""
    digest = hashlib.sha256(f"{task}|{int(patch)}|".encode())
    digest.update(np.ascontiguousarray(np.asarray(tiles, dtype="<i8").reshape(-1, 3)).tobytes())
    return digest.hexdigest()


def manifest_hash(dataset, images: np.ndarray) -> str:
    """sha256 over the identity (id, size, angles, file checksums) of the given images in the manifest."""
    entries = {e["id"]: e for e in dataset.manifest["images"]}
    rows = []
    for image in np.unique(np.asarray(images, dtype=np.int64)).tolist():
        info = dataset.images[image]
        files = entries[info.id]["files"]
        rows.append([info.id, info.height, info.width, info.angles, files["field"]["sha256"], files["truth"]["sha256"]])
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def _record_dtype(task: str, angles: int, patch: int) -> np.dtype:
    fields = [("field", "<c8", (angles, patch, patch))] if task == "refocus" else []
    return np.dtype(fields + [(name, dt, (patch, patch)) for name, dt in _TRUTH])


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class TileCache:
    """An opened, validated cache file (see the module docstring). Reads are thread-safe."""

    def __init__(self, path: Path, header: dict, windows: np.ndarray, records: np.ndarray):
        self.path = path
        self.header = header
        self.windows = windows
        self.task = header["task"]
        self.patch = int(header["patch"])
        self._arrays = {name: records[name] for name in records.dtype.names}
        self._rows = {tuple(w): k for k, w in enumerate(windows.tolist())}

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size

    @classmethod
    def build(cls, path: str | os.PathLike, dataset, tiles: np.ndarray, task: str, patch: int,
              *, progress: bool = True) -> "TileCache":
        """Reuse a valid cache at `path` for exactly this plan, else write it (replacing a stale one)."""
        if task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        path = Path(path)
        tiles = np.asarray(tiles, dtype=np.int64).reshape(-1, 3)
        if len(tiles) == 0:
            raise ConfigError(f"{path}: no tiles to cache (the shard is empty)")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if path.exists():
                    try:
                        return cls.open(path, dataset, tiles, task, patch)
                    except DataError as err:
                        print(f"tile cache: rebuilding ({err})", file=sys.stderr)
                _write(path, dataset, tiles, task, patch, progress)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return cls.open(path, dataset, tiles, task, patch)

    @classmethod
    def open(cls, path: str | os.PathLike, dataset, tiles: np.ndarray | None = None, task: str | None = None,
             patch: int | None = None) -> "TileCache":
        """Open and validate; DataError if unreadable, truncated, or stale for `dataset` (and `tiles`/`task`/`patch`)."""
        path = Path(path)
        header = _read_header(path)
        todo = "delete it or rebuild it with TileCache.build (cellavie rebuilds it when data.tile_cache is set)"
        expected = {"task": task, "patch": None if patch is None else int(patch),
                    "plan_sha256": None if tiles is None else plan_hash(tiles, header["task"], header["patch"])}
        for key, want in expected.items():
            if want is not None and header[key] != want:
                raise DataError(f"{path}: stale tile cache: {key} is {header[key]!r} but this run needs {want!r} "
                                f"(another tile plan); {todo}")
        windows_bytes = header["windows"] * 5 * 8
        index = np.fromfile(path, dtype="<i8", count=header["windows"] * 5, offset=header["index_offset"])
        if index.size * 8 != windows_bytes:
            raise DataError(f"{path}: truncated tile cache (index incomplete); {todo}")
        windows = index.reshape(-1, 5)
        if windows.size and (windows[:, 0].max() >= len(dataset.images)):
            raise DataError(f"{path}: stale tile cache: it names image {int(windows[:, 0].max())} but "
                            f"{dataset.root} has {len(dataset.images)} images; {todo}")
        found = manifest_hash(dataset, windows[:, 0])
        if header["manifest_sha256"] != found:
            raise DataError(f"{path}: stale tile cache: built from other files than {dataset.root} now holds "
                            f"(manifest checksum {header['manifest_sha256'][:12]} != {found[:12]}); {todo}")
        record = np.dtype([(n, dt, tuple(shape)) for n, dt, shape in header["record"]])
        expected_size = header["records_offset"] + header["windows"] * record.itemsize
        if path.stat().st_size != expected_size:
            raise DataError(f"{path}: truncated tile cache ({path.stat().st_size} bytes, expected {expected_size}); {todo}")
        records = np.memmap(path, dtype=record, mode="r", offset=header["records_offset"], shape=(header["windows"],))
        return cls(path, header, windows, records)

    def row(self, image: int, y: int, x: int, h: int, w: int) -> int | None:
        """Record index of a window, or None when it is not cached."""
        return self._rows.get((image, y, x, h, w))

    def field(self, row: int) -> np.ndarray | None:
        """complex64 (A, h, w) of record `row` (None for caches without fields: every task but refocus)."""
        if "field" not in self._arrays:
            return None
        _, _, _, h, w = self.windows[row].tolist()
        return np.array(self._arrays["field"][row, :, :h, :w])

    def truth(self, row: int) -> dict[str, np.ndarray]:
        _, _, _, h, w = self.windows[row].tolist()
        return {name: np.array(self._arrays[name][row, :h, :w], dtype=np.int32 if name == "cls" else None)
                for name, _ in _TRUTH}

    def view(self, dataset) -> "TileCacheDataset":
        """A data-set view serving cached windows (the data set must be the one the cache was checked against)."""
        return TileCacheDataset(dataset, self)


class TileCacheDataset:
    """`dataset` with windowed reads served from a `TileCache` when cached (`hits`), else from its files (`misses`)."""

    def __init__(self, dataset, cache: TileCache):
        self._dataset = dataset
        self.cache = cache
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._dataset, name)

    def _count(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def read_field_patch(self, image_index: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        row = self.cache.row(image_index, y, x, h, w)
        out = None if row is None else self.cache.field(row)
        self._count(out is not None)
        return self._dataset.read_field_patch(image_index, y, x, h, w) if out is None else out

    def read_truth_patch(self, image_index: int, y: int, x: int, h: int, w: int) -> dict[str, np.ndarray]:
        row = self.cache.row(image_index, y, x, h, w)
        self._count(row is not None)
        return self._dataset.read_truth_patch(image_index, y, x, h, w) if row is None else self.cache.truth(row)


def _read_header(path: Path) -> dict:
    todo = "delete it or rebuild it with TileCache.build"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise DataError(f"{path}: not a cellavie tile cache (bad magic); {todo}")
            (length,) = struct.unpack("<Q", head[8:])
            header = json.loads(f.read(length).decode())
    except FileNotFoundError:
        raise DataError(f"{path}: no tile cache here; build it with TileCache.build") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable tile cache header ({err}); {todo}") from None
    if header.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: tile cache format version {header.get('version')!r}, this cellavie-hpc "
                        f"reads {FORMAT_VERSION}; {todo}")
    return header


def _write(path: Path, dataset, tiles: np.ndarray, task: str, patch: int, progress: bool) -> None:
    windows = tile_windows(dataset, tiles, patch)
    record = _record_dtype(task, int(dataset.angles), int(patch))
    header = {"version": FORMAT_VERSION, "task": task, "patch": int(patch), "angles": int(dataset.angles),
              "tiles": int(len(tiles)), "windows": int(len(windows)),
              "plan_sha256": plan_hash(tiles, task, patch),
              "manifest_sha256": manifest_hash(dataset, windows[:, 0]), "dataset_root": str(dataset.root),
              "record": [[name, record.fields[name][0].base.str, list(record.fields[name][0].shape)]
                         for name in record.names]}
    # The offsets' own digits lengthen the header: reserve 64 characters for them (2 x at most 20 digits).
    header["index_offset"] = _aligned(16 + len(json.dumps(header)) + 64)
    header["records_offset"] = _aligned(header["index_offset"] + windows.nbytes)
    text = json.dumps(header).encode()
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(text)) + text)
            f.seek(header["index_offset"])
            f.write(windows.astype("<i8").tobytes())
            f.truncate(header["records_offset"] + len(windows) * record.itemsize)
        records = np.memmap(tmp, dtype=record, mode="r+", offset=header["records_offset"], shape=(len(windows),))
        with Progress(len(windows), f"tile cache {path.name}", enabled=progress, unit="tile") as bar:
            for k, (image, y, x, h, w) in enumerate(windows.tolist()):
                if task == "refocus":
                    records["field"][k, :, :h, :w] = dataset.read_field_patch(image, y, x, h, w)
                truth = dataset.read_truth_patch(image, y, x, h, w)
                for name, _ in _TRUTH:
                    records[name][k, :h, :w] = truth[name]
                bar.update()
        records.flush()
        del records
        os.replace(tmp, path)
    except OSError as err:
        raise DataError(f"{path}: writing the tile cache failed ({err.strerror or err}); "
                        "check free space and permissions") from None
    finally:
        tmp.unlink(missing_ok=True)
