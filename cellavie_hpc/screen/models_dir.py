"""A trained chain on disk: MODELS_DIR/chain.json plus one `.keras` file per network.

chain.json names, per network, its file, preset, training patch and preset overrides, and the chain's
choices: how cells are segmented (`unet`, or `threshold` on the refocused phase), how they are found
(`detector`, or connected `components` of the segmentation), and the decision thresholds. Networks are
fully convolutional except the classifier, so at screening time the U-Net, detector and refocus CNN
are rebuilt at the screening tile size and given the trained weights (`build_network`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from cellavie_hpc.errors import DataError, UserError

CHAIN_FILE = "chain.json"
CHAIN_FORMAT = "cellavie-chain"
CHAIN_VERSION = 1
SEGMENTATIONS = ("unet", "threshold")
DETECTIONS = ("detector", "components")


@dataclasses.dataclass(frozen=True)
class NetworkEntry:
    """One trained network: `file` relative to MODELS_DIR, the registry name/preset/options it was built with."""
    name: str
    file: str
    preset: str = "tiny"
    patch: int = 128
    in_channels: int = 1
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ChainSpec:
    """What the screening chain runs and with which thresholds.

    threshold_rad: foreground phase for `segmentation="threshold"`; min_area_px / max_area_px: cell
    size limits (pixels) for `components`; split_distance_px: touching cells whose centres are at least
    this far apart are split (0: never; about 2/3 of a cell radius); border_min_area_px: the smallest
    visible part of a cell cut by the image border that is reported (half a cell: the cells centred
    in the picture; `train_chain.cell_geometry` sets both from the training cells); detector_score: heatmap score a detection must reach;
    infected_threshold: 1 - P(healthy) above which a cell is called infected; provenance: how the networks
    were trained (data set, run folders, held-out metrics).
    """
    classifier: NetworkEntry
    unet: NetworkEntry | None = None
    detector: NetworkEntry | None = None
    refocus: NetworkEntry | None = None
    segmentation: str = "threshold"
    detection: str = "components"
    threshold_rad: float = 0.5
    min_area_px: int = 150
    max_area_px: int = 4000
    split_distance_px: int = 10
    border_min_area_px: int = 350
    detector_score: float = 0.3
    infected_threshold: float = 0.5
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.segmentation not in SEGMENTATIONS:
            raise UserError(f"chain segmentation must be one of {SEGMENTATIONS}, got {self.segmentation!r}")
        if self.detection not in DETECTIONS:
            raise UserError(f"chain detection must be one of {DETECTIONS}, got {self.detection!r}")
        if self.segmentation == "unet" and self.unet is None:
            raise UserError("chain segmentation 'unet' needs a unet network entry")
        if self.detection == "detector" and self.detector is None:
            raise UserError("chain detection 'detector' needs a detector network entry")
        if self.split_distance_px < 0 or not 0 < self.border_min_area_px <= self.max_area_px:
            raise UserError(f"split_distance_px must be >= 0 and border_min_area_px in (0, max_area_px], got "
                            f"{self.split_distance_px} and {self.border_min_area_px}")
        if not 0 < self.infected_threshold < 1:
            raise UserError(f"infected_threshold must be in (0, 1), got {self.infected_threshold}")

    def networks(self) -> dict[str, NetworkEntry]:
        return {k: v for k in ("refocus", "unet", "detector", "classifier") if (v := getattr(self, k)) is not None}


def save_chain(models_dir: str | Path, spec: ChainSpec, models: dict[str, Any]) -> Path:
    """Write every network of `spec` from `models` (name -> keras.Model) and chain.json; return chain.json."""
    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    for name, entry in spec.networks().items():
        if name not in models:
            raise ValueError(f"the chain lists a {name} network but no model was given for it")
        models[name].save(root / entry.file)
    return save_spec(root, spec)


def save_spec(models_dir: str | Path, spec: ChainSpec) -> Path:
    """Write MODELS_DIR/chain.json (atomically: a screen starting meanwhile reads the old or the new one)."""
    import os

    path = Path(models_dir) / CHAIN_FILE
    doc = {"format": CHAIN_FORMAT, "version": CHAIN_VERSION, **dataclasses.asdict(spec)}
    tmp = path.with_name(f".{CHAIN_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load_spec(models_dir: str | Path) -> ChainSpec:
    """Read and check MODELS_DIR/chain.json (DataError naming the file otherwise)."""
    path = Path(models_dir) / CHAIN_FILE
    if not path.is_file():
        raise DataError(f"{path}: no chain description here; train one with `cellavie screen --train-chain DATASET "
                        f"--models {models_dir}`")
    try:
        doc = json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != CHAIN_FORMAT or doc.get("version") != CHAIN_VERSION:
        raise DataError(f"{path}: not a {CHAIN_FORMAT} version {CHAIN_VERSION} file")
    fields = {f.name for f in dataclasses.fields(ChainSpec)}
    unknown = sorted(set(doc) - fields - {"format", "version"})
    if unknown:
        raise DataError(f"{path}: unknown keys {unknown}")
    try:
        nets = {k: NetworkEntry(**doc[k]) for k in ("refocus", "unet", "detector", "classifier") if doc.get(k)}
        if "classifier" not in nets:
            raise DataError(f"{path}: the chain has no classifier entry")
        spec = ChainSpec(**{**{k: v for k, v in doc.items() if k in fields}, **nets})
    except TypeError as err:
        raise DataError(f"{path}: {err}") from None
    for entry in spec.networks().values():
        if not (path.parent / entry.file).is_file():
            raise DataError(f"{path.parent / entry.file}: missing (listed in {path} for the {entry.name} network)")
    return spec


def build_network(models_dir: str | Path, entry: NetworkEntry, patch: int | None = None):
    """The trained network of `entry`, rebuilt at input size `patch` (default: its training patch).

    Weights are copied from the saved `.keras` file; convolution weights do not depend on the input
    size, so a network trained on 128-pixel tiles screens 512-pixel tiles. Uses the current Keras
    dtype policy (set mixed precision before calling).
    """
    import keras

    from cellavie_hpc.models.registry import build_model

    path = Path(models_dir) / entry.file
    try:
        saved = keras.saving.load_model(path, compile=False)
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign file: name it
        raise DataError(f"{path}: cannot be loaded as a Keras model ({type(err).__name__}: {err})") from None
    model = build_model(entry.name, entry.preset, patch or entry.patch, entry.in_channels, **entry.options)
    weights = saved.get_weights()
    if [w.shape for w in weights] != [tuple(v.shape) for v in model.weights]:
        raise DataError(f"{path}: its weights do not fit a {entry.name} ({entry.preset}) network with options "
                        f"{entry.options}; chain.json does not describe this file")
    model.set_weights(weights)
    return model
