"""The hologram data set on disk: manifest validation, windowed reads of fields and truth, checksums.

Layout (written by `synthetic.generate_dataset`, format `cellavie-holograms` version 1):
`manifest.json`; `holograms/<id>.tif` (one page per illumination angle, float32 (real, imag) samples,
256x256 tiles); `truth/<id>.tif` (pages: in-focus phase float32, instance uint32, class uint8; tiled,
zlib); `truth/<id>.json` (the cell list). Opening checks the manifest and that every file exists with
its recorded size (cheap); checksums are checked only on request (`verify=True` or `ds.verify()`),
TIFF headers on first use of an image (or at open with `on_error="skip"`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellavie_hpc.data.tiff_io import TiffSource, check_finite, samples_to_field
from cellavie_hpc.errors import DataError

FORMAT_NAME = "cellavie-holograms"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (FORMAT_VERSION,)
_FILE_KINDS = ("field", "truth", "cells")


@dataclass(frozen=True)
class ImageInfo:
    id: str
    index: int                 # position in `HologramDataset.images` (what the read methods take)
    height: int
    width: int
    angles: int
    focus_distance_m: float


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _require(mapping: dict, key: str, types, where: str, manifest: Path):
    if not isinstance(mapping, dict) or key not in mapping:
        raise DataError(f"{manifest}: {where} has no {key!r}; the manifest is incomplete, regenerate the data set")
    value = mapping[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise DataError(f"{manifest}: {where}.{key} is {type(value).__name__}, not {types}; regenerate the data set")
    return value


class HologramDataset:
    """An opened data set; read methods take positions in `images` and are safe to call from threads."""

    def __init__(self, root: Path, manifest: dict, entries: list[dict], skipped: list[tuple[str, str]]):
        self.root = root
        self.manifest = manifest
        params = manifest["parameters"]
        self.wavelength_m = float(params["wavelength_m"])
        self.pixel_size_m = float(params["pixel_size_m"])
        self.medium_index = float(params["medium_index"])
        self.angles = int(params["angles"])
        self._entries = entries
        self.skipped = skipped
        self.images = [ImageInfo(id=e["id"], index=i, height=int(e["height"]), width=int(e["width"]),
                                 angles=int(e["angles"]), focus_distance_m=float(e["focus_distance_m"]))
                       for i, e in enumerate(entries)]
        self._sources: dict[Path, TiffSource] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.images)

    def path(self, image_index: int, kind: str) -> Path:
        """The file of one image: kind is `field`, `truth` or `cells`."""
        return self.root / self._entries[image_index]["files"][kind]["path"]

    def _source(self, image_index: int, kind: str) -> TiffSource:
        path = self.path(image_index, kind)
        src = self._sources.get(path)
        if src is None:
            src = TiffSource(path)
            _check_layout(src, self.images[image_index], kind)
            with self._lock:
                self._sources[path] = src
        return src

    def read_field(self, image_index: int) -> np.ndarray:
        """The whole hologram, complex64 (A, H, W)."""
        info = self.images[image_index]
        return self.read_field_patch(image_index, 0, 0, info.height, info.width)

    def read_field_patch(self, image_index: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """complex64 (A, h, w): rows y:y+h, columns x:x+w of every illumination plane (only overlapping tiles)."""
        src = self._source(image_index, "field")
        planes = [samples_to_field(src.read_window(a, y, x, h, w), src.path) for a in range(len(src.pages))]
        return check_finite(np.stack(planes), src.path, f"field window (y={y}, x={x}, h={h}, w={w})")

    def read_truth_patch(self, image_index: int, y: int, x: int, h: int, w: int) -> dict[str, np.ndarray]:
        """dict(phase float32 rad, instance int32, cls int32), each (h, w), for the same window as the field."""
        src = self._source(image_index, "truth")
        phase = check_finite(src.read_window(0, y, x, h, w), src.path, "in-focus phase window")
        return {"phase": phase.astype(np.float32, copy=False),
                "instance": src.read_window(1, y, x, h, w).astype(np.int32),
                "cls": src.read_window(2, y, x, h, w).astype(np.int32)}

    def cells(self, image_index: int) -> list[dict]:
        """The ground-truth cell list: dicts with id, cy, cx, radius_px, bbox (y0, x0, y1, x1), infected, stage."""
        return _load_cells(self.path(image_index, "cells"))

    def verify(self, on_error: str = "raise") -> list[tuple[str, str]]:
        """Check every file's sha256 and TIFF layout against the manifest; return [(image id, problem)].

        With on_error="raise" the first problem raises DataError; with "skip" all problems are returned.
        """
        problems = []
        for i, info in enumerate(self.images):
            try:
                _verify_image(self.root, self._entries[i], info, checksums=True)
            except DataError as err:
                if on_error != "skip":
                    raise
                problems.append((info.id, str(err)))
        return problems


@functools.lru_cache(maxsize=64)
def _load_cells(path: Path) -> list[dict]:
    try:
        doc = json.loads(path.read_text())
        cells = doc["cells"]
        if not isinstance(cells, list):
            raise TypeError("'cells' is not a list")
    except FileNotFoundError:
        raise DataError(f"{path}: missing; the data set is incomplete, regenerate it") from None
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a valid cell list ({err}); regenerate the data set") from None
    return cells


_TRUTH_DTYPES = (np.dtype(np.float32), np.dtype(np.uint32), np.dtype(np.uint8))


def _check_layout(src: TiffSource, info: ImageInfo, kind: str) -> None:
    """The TIFF pages must have the shapes and dtypes the manifest encoding promises."""
    hw = (info.height, info.width)
    if kind == "field":
        expected = [((*hw, 2), np.dtype(np.float32))] * info.angles
    else:
        expected = [(hw, dt) for dt in _TRUTH_DTYPES]
    found = [(p.shape, p.dtype) for p in src.pages]
    if found != expected:
        raise DataError(f"{src.path}: pages are {[(s, str(d)) for s, d in found]} but the manifest promises "
                        f"{[(s, str(d)) for s, d in expected]}; the file does not belong to this data set, regenerate it")


def _verify_image(root: Path, entry: dict, info: ImageInfo, checksums: bool) -> None:
    for kind in _FILE_KINDS:
        meta = entry["files"][kind]
        path = root / meta["path"]
        if not path.is_file():
            raise DataError(f"{path}: missing (listed in the manifest for image {info.id}); "
                            "restore it or regenerate the data set")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise DataError(f"{path}: has {size} bytes, the manifest says {meta['bytes']} (truncated or replaced); "
                            "restore it or regenerate the data set")
        if checksums and sha256_file(path) != meta["sha256"]:
            raise DataError(f"{path}: sha256 checksum does not match the manifest (corrupted or modified); "
                            "restore it or regenerate the data set")
        if kind != "cells":
            _check_layout(TiffSource(path), info, kind)


def _validate_manifest(manifest, path: Path) -> list[dict]:
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: is not a JSON object; regenerate the data set")
    fmt = manifest.get("format")
    if fmt != FORMAT_NAME:
        raise DataError(f"{path}: format is {fmt!r}, expected {FORMAT_NAME!r}; this is not a cellavie data set")
    version = manifest.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise DataError(f"{path}: format version {version!r} is not supported (supported: {SUPPORTED_VERSIONS}); "
                        "regenerate the data set with this cellavie-hpc")
    params = _require(manifest, "parameters", dict, "manifest", path)
    for key in ("wavelength_m", "pixel_size_m", "medium_index"):
        _require(params, key, (int, float), "parameters", path)
    _require(params, "angles", int, "parameters", path)
    _require(manifest, "counts", dict, "manifest", path)
    entries = _require(manifest, "images", list, "manifest", path)
    if not entries:
        raise DataError(f"{path}: lists no images; regenerate the data set")
    for n, e in enumerate(entries):
        where = f"images[{n}]"
        _require(e, "id", str, where, path)
        for key in ("height", "width", "angles"):
            if _require(e, key, int, where, path) < 1:
                raise DataError(f"{path}: {where}.{key} must be >= 1")
        _require(e, "focus_distance_m", (int, float), where, path)
        files = _require(e, "files", dict, where, path)
        for kind in _FILE_KINDS:
            meta = _require(files, kind, dict, f"{where}.files", path)
            _require(meta, "path", str, f"{where}.files.{kind}", path)
            _require(meta, "bytes", int, f"{where}.files.{kind}", path)
            _require(meta, "sha256", str, f"{where}.files.{kind}", path)
    return entries


def open_dataset(path: str | Path, verify: bool = False, on_error: str = "raise") -> HologramDataset:
    """Open a data set folder (or its manifest.json) and check it against its manifest.

    `verify=True` also checks every file's sha256 and TIFF layout. `on_error="skip"` drops images whose
    files are missing or do not match (TIFF headers are checked for every image in that mode) and warns
    with the count; the default raises DataError at the first problem.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    p = Path(path)
    manifest_path = p / "manifest.json" if p.is_dir() else p
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: no data set manifest here; generate one with `cellavie generate` "
                        "(an interrupted generation leaves no manifest)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{manifest_path}: not valid JSON ({err}); regenerate the data set") from None
    entries = _validate_manifest(manifest, manifest_path)
    root = manifest_path.parent
    kept, skipped = [], []
    for e in entries:
        info = ImageInfo(e["id"], len(kept), e["height"], e["width"], e["angles"], e["focus_distance_m"])
        try:
            if verify or on_error == "skip":
                _verify_image(root, e, info, checksums=verify)
            else:
                for kind in _FILE_KINDS:
                    meta = e["files"][kind]
                    f = root / meta["path"]
                    if not f.is_file() or f.stat().st_size != meta["bytes"]:
                        _verify_image(root, e, info, checksums=False)   # raises with the precise problem
        except DataError as err:
            if on_error != "skip":
                raise
            skipped.append((e["id"], str(err)))
            continue
        kept.append(e)
    if skipped:
        warnings.warn(f"{manifest_path}: skipped {len(skipped)} of {len(entries)} images with bad files "
                      f"(first: {skipped[0][1]})", stacklevel=2)
    if not kept:
        raise DataError(f"{manifest_path}: every image was skipped (first problem: {skipped[0][1]})")
    return HologramDataset(root, manifest, kept, skipped)
