"""Train the networks of a screening chain with the training engine and store them as a MODELS_DIR.

Each network is one ordinary `cellavie train` run (same configuration schema, records, checkpoints)
under WORK_DIR/<network>; this module only writes those configurations, calls the engine's `train`,
and exports the trained weights as `.keras` files with a chain.json (see `models_dir`).

The classifier learns from the chain's own view of the training images (`crops="refocused"`, the
default): `refocused_dataset` writes WORK_DIR/refocused, a data set whose truth phase is the physically
refocused phase (`chain.physics_refocus`) and whose cell list is the cells the chain finds there
(threshold + connected components), each labelled with the stage of the true cell under its centre
(healthy for blobs on background). A classifier trained on the clean in-focus phase (`crops="truth"`)
scores the refocused phase poorly: near the image border, refocusing misses the light spread outside
the picture and the phase is off by 0.2-0.4 rad, which it took for parasites (38,000 false positives
per million healthy cells on the 40-image sample, against ~100 when trained on refocused crops).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from cellavie_hpc.errors import UserError
from cellavie_hpc.screen.models_dir import ChainSpec, NetworkEntry, save_chain

NETWORKS = ("classifier", "unet", "detector", "refocus")
DEFAULT_STEPS = {"classifier": 3000, "unet": 300, "detector": 300, "refocus": 300}
DEFAULT_PATCH = {"classifier": 64, "unet": 128, "detector": 128, "refocus": 128}
DEFAULT_BATCH = {"classifier": 32, "unet": 8, "detector": 8, "refocus": 8}
CROP_SOURCES = ("refocused", "truth")
REFOCUSED_FORMAT = "cellavie-chain-crops"


def chain_cells(phase: np.ndarray, instance: np.ndarray, truth_cells: list[dict], spec: ChainSpec) -> list[dict]:
    """The cells the chain finds in a refocused `phase` (H, W) rad, as a data-set cell list labelled by ground truth.

    Cells are the connected components of phase > `spec.threshold_rad`, touching cells split (what
    `ScreeningChain.detect` does without a detector: `chain.cells_from_mask`); each takes the stage of the
    true cell whose `instance` raster holds its centre (`evaluate.match_detections`, as the evaluation
    counts it), `true_cell` 0 and healthy on background.
    """
    from cellavie_hpc.screen.chain import cells_from_mask
    from cellavie_hpc.screen.evaluate import match_detections

    found = cells_from_mask(phase > spec.threshold_rad, spec)
    true_ids = match_detections(found["cy"], found["cx"], instance)
    stage_of = {int(c["id"]): c["stage"] for c in truth_cells}
    cells = []
    for k, (cy, cx, box, area, true_id) in enumerate(zip(found["cy"].tolist(), found["cx"].tolist(),
                                                         found["box"].tolist(), found["area_px"].tolist(),
                                                         true_ids.tolist())):
        stage = stage_of.get(true_id, "healthy")
        cells.append({"id": k + 1, "cy": cy, "cx": cx, "radius_px": float(np.sqrt(area / np.pi)),
                      "bbox": [int(v) for v in box], "infected": stage != "healthy", "stage": stage,
                      "true_cell": int(true_id)})
    return cells


def _chain_view_code() -> str:
    """Digest of the code that makes the chain's view, so a reused refocused data set is never stale."""
    import hashlib
    import inspect

    from cellavie_hpc.screen import chain

    parts = [chain.physics_refocus, chain.flatten_background, chain.background_plane, chain.components,
             chain.split_cells, chain.cells_from_mask, chain_cells]
    return hashlib.sha256("".join(inspect.getsource(f) for f in parts).encode()).hexdigest()[:16]


def refocused_dataset(source: str | Path, out: str | Path, spec: ChainSpec | None = None, options=None,
                      progress: TextIO | None = sys.stderr) -> Path:
    """Write the chain's view of data set `source` to `out` and return `out` (reused when already written
    with the same source, options, chain thresholds and refocusing code).

    Each image: the truth TIFF holds the refocused phase (page 0) and the original instance and class
    rasters; the cell list holds the chain's cells (`chain_cells`). Holograms are linked, not copied.
    The engine's classifier pipeline then crops the refocused phase centred on the chain's cells.
    """
    from cellavie_hpc.data.dataset import open_dataset, sha256_file
    from cellavie_hpc.data.synthetic import STAGES
    from cellavie_hpc.data.tiff_io import write_tiled
    from cellavie_hpc.progress import Progress
    from cellavie_hpc.screen.chain import ScreenOptions, physics_refocus

    spec = spec or ChainSpec(classifier=NetworkEntry(name="classifier", file="classifier.keras"))
    options = options or ScreenOptions()
    ds = open_dataset(source)
    out = Path(out)
    made_by = {"format": REFOCUSED_FORMAT, "source": str(Path(source).resolve()), "code": _chain_view_code(),
               "options": json.loads(json.dumps(dataclasses.asdict(options))),
               "chain": {k: getattr(spec, k) for k in ("threshold_rad", "min_area_px", "max_area_px",
                                                        "split_distance_px", "border_min_area_px")}}
    manifest_path = out / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("derived") == made_by:
        return out
    (out / "truth").mkdir(parents=True, exist_ok=True)
    holograms = out / "holograms"
    if not holograms.exists():
        os.symlink((Path(ds.root) / "holograms").resolve(), holograms)
    entries = []
    bar = Progress(len(ds.images), f"refocus {Path(source).name} for classifier crops", enabled=progress is not None,
                   stream=progress, unit="img")
    for i, info in enumerate(ds.images):
        phase, _ = physics_refocus(ds.read_field(i)[0], ds, options)
        truth = ds.read_truth_patch(i, 0, 0, info.height, info.width)
        cells = chain_cells(phase, truth["instance"], ds.cells(i), spec)
        entry = json.loads(json.dumps(ds.manifest["images"][i]))
        truth_file, cells_file = out / entry["files"]["truth"]["path"], out / entry["files"]["cells"]["path"]
        write_tiled(truth_file, [phase, truth["instance"].astype(np.uint32), truth["cls"].astype(np.uint8)],
                    compression="zlib", level=1)
        cells_file.write_text(json.dumps({"image": info.id, "cells": cells}, separators=(",", ":")))
        for kind, path in (("truth", truth_file), ("cells", cells_file)):
            entry["files"][kind].update(bytes=path.stat().st_size, sha256=sha256_file(path))
        entry["stages"] = {s: sum(c["stage"] == s for c in cells) for s in STAGES[1:]}
        entry.update(cells=len(cells), infected=sum(entry["stages"].values()))
        entries.append(entry)
        bar.update()
    bar.close()
    manifest = {**ds.manifest, "images": entries, "derived": made_by,
                "counts": {"images": len(entries), "cells": sum(e["cells"] for e in entries),
                           "infected": sum(e["infected"] for e in entries)}}
    tmp = manifest_path.with_name(f".manifest.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, manifest_path)
    return out


def cell_geometry(ds) -> dict[str, int]:
    """The chain's size rules from the training cells' median radius r (pixels): touching cells are split
    when their centres are 2/3 r apart or more; a cell cut by the image border is reported when at least
    half of it is visible, i.e. when its centre is in the picture (`evaluate.owned_cells`: a sliver of a
    cell centred outside belongs to the neighbouring field, and slivers made half the false positives)."""
    radii = [c["radius_px"] for i in range(len(ds.images)) for c in ds.cells(i)]
    if not radii:
        raise UserError(f"{ds.root}: the training data set lists no cells")
    r = float(np.median(radii))
    return {"split_distance_px": max(1, round(2 * r / 3)), "border_min_area_px": round(np.pi * r * r / 2)}


def network_config(name: str, dataset: str | Path, steps: int, preset: str = "tiny", seed: int = 0,
                   learning_rate: float = 2e-3) -> dict:
    """The training configuration (engine schema) of one chain network."""
    return {
        "run": {"name": f"chain-{name}", "seed": seed, "point": {"chain_network": name}},
        "data": {"dataset": str(dataset), "patch": DEFAULT_PATCH[name], "cache": True, "augment": True,
                 "eval_images": 1},
        "model": {"name": name, "preset": preset},
        "train": {"steps": steps, "batch_per_replica": DEFAULT_BATCH[name], "learning_rate": learning_rate,
                  "warmup_steps": min(20, steps // 10), "progress_every": max(1, steps // 10)},
    }


def train_chain(dataset: str | Path, models_dir: str | Path, work_dir: str | Path, *,
                networks: tuple[str, ...] = ("classifier",), steps: dict[str, int] | None = None,
                preset: str = "tiny", seed: int = 0, infected_threshold: float = 0.5, crops: str = "refocused",
                options=None, progress: TextIO | None = sys.stderr) -> ChainSpec:
    """Train `networks` on `dataset` (one engine run each under `work_dir`) and write MODELS_DIR.

    The classifier is always trained, on crops of the chain's refocused phase around the cells the chain
    finds (`crops="refocused"`, through `options`, the screening options; see `refocused_dataset`) or of
    the clean in-focus phase around the true cells (`"truth"`). Without `unet` the chain segments by
    phase threshold, without `detector` it finds cells as connected components; `refocus` enables
    `--refocus cnn`.
    """
    from cellavie_hpc.data.dataset import open_dataset
    from cellavie_hpc.models.registry import build_model
    from cellavie_hpc.train.config import resolve
    from cellavie_hpc.train.loop import train

    unknown = [n for n in networks if n not in NETWORKS]
    if unknown:
        raise UserError(f"unknown chain networks {unknown}; choose from {', '.join(NETWORKS)}")
    if crops not in CROP_SOURCES:
        raise UserError(f"classifier crops must be one of {CROP_SOURCES}, got {crops!r}")
    wanted = ("classifier",) + tuple(n for n in NETWORKS[1:] if n in networks)
    source_ds = open_dataset(dataset)
    steps = {**DEFAULT_STEPS, **(steps or {})}
    entries, models, provenance = {}, {}, {}
    geometry = cell_geometry(source_ds)
    defaults = ChainSpec(classifier=NetworkEntry(name="classifier", file="classifier.keras"), **geometry)
    for name in wanted:
        source = dataset
        if name == "classifier" and crops == "refocused":
            source = refocused_dataset(dataset, Path(work_dir) / "refocused", defaults, options, progress)
        config = resolve(network_config(name, source, steps[name], preset, seed), where=f"chain {name}")
        run_dir = Path(work_dir) / name
        result = train(config, run_dir, resume="never", progress=progress)
        if result.status != "completed":
            raise UserError(f"training the {name} network stopped ({result.status}); rerun to resume in {run_dir}")
        in_channels = 2 * source_ds.angles if name == "refocus" else 1
        model = build_model(name, preset, DEFAULT_PATCH[name], in_channels)
        model.load_weights(run_dir / "model.weights.h5")
        entries[name] = NetworkEntry(name=name, file=f"{name}.keras", preset=preset, patch=DEFAULT_PATCH[name],
                                     in_channels=in_channels)
        models[name] = model
        provenance[name] = {"run_dir": str(run_dir), "steps": result.steps,
                            "eval": {k: v for k, v in result.metrics.items() if not k.endswith("_total")}}
    spec = ChainSpec(classifier=entries["classifier"], unet=entries.get("unet"), detector=entries.get("detector"),
                     refocus=entries.get("refocus"), segmentation="unet" if "unet" in entries else "threshold",
                     detection="detector" if "detector" in entries else "components",
                     infected_threshold=infected_threshold, **geometry,
                     provenance={"dataset": str(dataset), "classifier_crops": crops, **provenance})
    save_chain(models_dir, spec, models)
    return spec
