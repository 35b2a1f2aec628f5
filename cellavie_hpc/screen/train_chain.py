"""Train the networks of a screening chain with the training engine and store them as a MODELS_DIR.

Each network is one ordinary `cellavie train` run (same configuration schema, records, checkpoints)
under WORK_DIR/<network>; this module only writes those configurations, calls the engine's `train`,
and exports the trained weights as `.keras` files with a chain.json (see `models_dir`).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from cellavie_hpc.errors import UserError
from cellavie_hpc.screen.models_dir import ChainSpec, NetworkEntry, save_chain

NETWORKS = ("classifier", "unet", "detector", "refocus")
DEFAULT_STEPS = {"classifier": 600, "unet": 300, "detector": 300, "refocus": 300}
DEFAULT_PATCH = {"classifier": 64, "unet": 128, "detector": 128, "refocus": 128}
DEFAULT_BATCH = {"classifier": 32, "unet": 8, "detector": 8, "refocus": 8}


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
                preset: str = "tiny", seed: int = 0, infected_threshold: float = 0.5,
                progress: TextIO | None = sys.stderr) -> ChainSpec:
    """Train `networks` on `dataset` (one engine run each under `work_dir`) and write MODELS_DIR.

    The classifier is always trained; without `unet` the chain segments by phase threshold, without
    `detector` it finds cells as connected components; `refocus` enables `--refocus cnn`.
    """
    from cellavie_hpc.data.dataset import open_dataset
    from cellavie_hpc.models.registry import build_model
    from cellavie_hpc.train.config import resolve
    from cellavie_hpc.train.loop import train

    unknown = [n for n in networks if n not in NETWORKS]
    if unknown:
        raise UserError(f"unknown chain networks {unknown}; choose from {', '.join(NETWORKS)}")
    wanted = ("classifier",) + tuple(n for n in NETWORKS[1:] if n in networks)
    angles = open_dataset(dataset).angles
    steps = {**DEFAULT_STEPS, **(steps or {})}
    entries, models, provenance = {}, {}, {}
    for name in wanted:
        config = resolve(network_config(name, dataset, steps[name], preset, seed), where=f"chain {name}")
        run_dir = Path(work_dir) / name
        result = train(config, run_dir, resume="never", progress=progress)
        if result.status != "completed":
            raise UserError(f"training the {name} network stopped ({result.status}); rerun to resume in {run_dir}")
        in_channels = 2 * angles if name == "refocus" else 1
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
                     infected_threshold=infected_threshold, provenance={"dataset": str(dataset), **provenance})
    save_chain(models_dir, spec, models)
    return spec
