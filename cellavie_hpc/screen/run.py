"""One screening run of one sample: this rank's images through the chain, tables, summary, overlays, records.

Several ranks may screen one sample (`job.world_size > 1`): each takes whole images (the sharding of
data/sharding.py over a one-tile-per-image plan, with locality) and writes OUT/parts/rank-XXXXX.*;
the last rank to finish combines the parts into OUT/cells.{csv,parquet} and OUT/summary.json (the
combination is idempotent, so two ranks finishing together write the same files).
Records: OUT/records/rank-XXXXX.jsonl in the training schema, one step per image with samples = cells.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

import numpy as np

from cellavie_hpc.errors import UserError
from cellavie_hpc.progress import Progress
from cellavie_hpc.screen.chain import STAGES, ImageResult, ScreenOptions, ScreeningChain
from cellavie_hpc.screen.evaluate import COUNT_KEYS, combine, count_matches, match_detections
from cellavie_hpc.screen.summary import sample_summary

OVERLAY_MODES = ("infected", "all", "none")
COLUMNS = ("sample", "image", "image_index", "cell", "cy", "cx", "y0", "x0", "y1", "x1", "area_px",
           "detector_score", "p_infected", "infected", "stage", "p_healthy", "p_ring", "p_trophozoite",
           "p_schizont", "focus_distance_m")   # with --evaluate also true_cell: the true cell id (0: background)


def rank_images(n_images: int, world_size: int, rank: int) -> np.ndarray:
    """The images (sorted indices) rank `rank` screens: whole images, balanced, no image twice or left out."""
    from cellavie_hpc.data.sharding import shard
    from cellavie_hpc.data.tiling import plan_tiles

    plan = plan_tiles([(1, 1)] * n_images, 1)
    part = shard(plan, world_size, rank, shuffle=False, remainder="pad", locality=True)
    return np.unique(part.tiles[~part.padded, 0])


def image_table(sample: str, result: ImageResult) -> dict[str, np.ndarray]:
    c, n = result.cells, result.n_cells
    box = np.asarray(c["box"], np.float64).reshape(-1, 4)
    return {
        "sample": np.full(n, sample, dtype=object), "image": np.full(n, result.image_id, dtype=object),
        "image_index": np.full(n, result.image_index, np.int64), "cell": np.arange(n, dtype=np.int64),
        "cy": c["cy"], "cx": c["cx"], "y0": box[:, 0], "x0": box[:, 1], "y1": box[:, 2], "x1": box[:, 3],
        "area_px": c["area_px"], "detector_score": c["detector_score"], "p_infected": c["p_infected"],
        "infected": c["infected"], "stage": c["stage"], "p_healthy": c["p_healthy"], "p_ring": c["p_ring"],
        "p_trophozoite": c["p_trophozoite"], "p_schizont": c["p_schizont"],
        "focus_distance_m": np.full(n, result.focus_distance_m),
    }


def _write_table(frame, stem: Path) -> None:
    """CSV and Parquet, each written to a temporary name and renamed (readers never see half a file)."""
    for suffix, write in ((".csv", lambda p: frame.to_csv(p, index=False)),
                          (".parquet", lambda p: frame.to_parquet(p, index=False))):
        tmp = stem.with_name(f".{stem.name}{suffix}.{os.getpid()}.tmp")
        write(tmp)
        os.replace(tmp, stem.with_suffix(suffix))


def _write_json(doc: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def screen_sample(dataset_path: str | Path, models_dir: str | Path, out: str | Path, options: ScreenOptions, *,
                  job=None, evaluate: bool = False, overlays: str = "infected", infected_threshold: float | None = None,
                  confidence: float = 0.95, ci_method: str = "clopper-pearson", max_images: int | None = None,
                  progress: TextIO | None = sys.stderr) -> dict:
    """Screen this rank's images of one sample into `out`; return the summary when this rank combined it,
    else this rank's part (with `"partial": True`)."""
    import pandas as pd

    from cellavie_hpc.data.dataset import open_dataset
    from cellavie_hpc.launch import job_env
    from cellavie_hpc.screen.models_dir import load_spec
    from cellavie_hpc.train import environment
    from cellavie_hpc.train.recording import RunRecorder

    if overlays not in OVERLAY_MODES:
        raise UserError(f"--overlays must be one of {OVERLAY_MODES}, got {overlays!r}")
    job = job or job_env.detect()
    ds = open_dataset(dataset_path)
    n_images = len(ds.images) if max_images is None else min(max_images, len(ds.images))
    if evaluate and not all(ds.path(i, "truth").is_file() for i in range(n_images)):
        raise UserError(f"{dataset_path}: --evaluate needs ground truth (truth/*.tif), which this data set lacks")
    spec = load_spec(models_dir)
    if infected_threshold is not None:
        spec = dataclasses.replace(spec, infected_threshold=infected_threshold)
    mine = rank_images(n_images, job.world_size, job.rank)
    out = Path(out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    sample = Path(ds.root).name
    settings = {"options": dataclasses.asdict(options), "chain": dataclasses.asdict(spec), "sample": str(ds.root)}
    chain = ScreeningChain(models_dir, options, spec)

    recorder = RunRecorder(out, job.rank)
    recorder.header(
        run_id=f"screen-{sample}", point={"sample": sample, "refocus": options.refocus}, model="screen-chain",
        backend="screen", world_size=job.world_size, rank=job.rank, local_rank=job.local_rank, nodes=job.nodes,
        node=job.node, slurm=job.slurm_ids(), device=environment.device(), versions=environment.versions(),
        git_commit=environment.git_commit(), config=settings,
        config_hash=hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16],
        flops_per_sample=None, per_replica_batch=options.batch, global_batch=options.batch * job.world_size,
        samples_per_epoch=None, warmup_steps=0)
    tables, per_image_eval, seconds = [], [], {s: 0.0 for s in (*STAGES, "write", "evaluate")}
    cells_total = 0
    start = time.perf_counter()
    painter, drawing = ThreadPoolExecutor(1, thread_name_prefix="screen-overlay"), []
    try:
        bar = Progress(len(mine), f"screen {sample} rank {job.rank}", enabled=progress is not None,
                       stream=progress, unit="img")
        last = time.perf_counter()
        for step, result in enumerate(chain.screen(ds, mine)):
            table = image_table(sample, result)
            tables.append(table)
            for k, v in result.seconds.items():
                seconds[k] += v
            t0 = time.perf_counter()
            if evaluate:
                info = ds.images[result.image_index]
                instance = ds.read_truth_patch(result.image_index, 0, 0, info.height, info.width)["instance"]
                table["true_cell"] = match_detections(table["cy"], table["cx"], instance)
                counts = count_matches(ds.cells(result.image_index), instance.shape, table["true_cell"],
                                       table["infected"])
                counts["image"] = result.image_id
                per_image_eval.append(counts)
            t1 = time.perf_counter()
            if overlays == "all" or (overlays == "infected" and table["infected"].any()):
                drawing.append(painter.submit(_timed_overlay, out / "overlays" / f"{result.image_id}.png",
                                              result.phase, result.cells, f"{sample} {result.image_id}"))
            seconds["evaluate"] += t1 - t0
            now = time.perf_counter()
            cells_total += result.n_cells
            recorder.step(step, 0, wall_s=now - last, input_wait_s=result.wait_s,
                          compute_s=sum(result.seconds.get(s, 0.0) for s in ("segment", "detect", "classify")),
                          exchange_s=None, samples=result.n_cells, loss=float("nan"),
                          mem_peak_bytes=environment.peak_memory()[0], mem_source=environment.peak_memory()[1])
            last = now
            bar.update()
        seconds["write"] += sum(f.result() for f in drawing)
        bar.close()
        wall_s = time.perf_counter() - start
        columns = COLUMNS + (("true_cell",) if evaluate else ())
        frame = pd.DataFrame({k: np.concatenate([t[k] for t in tables]) if tables else np.empty(0) for k in columns})
        part_stem = out / "parts" / f"rank-{job.rank:05d}"
        _write_table(frame, part_stem)
        part = {"rank": job.rank, "world_size": job.world_size, "images": [int(i) for i in mine],
                "cells": int(len(frame)), "infected": int(frame["infected"].sum()) if len(frame) else 0,
                "wall_s": wall_s, "seconds": seconds, "evaluation": per_image_eval if evaluate else None}
        _write_json(part, part_stem.with_suffix(".json"))
        throughput = {"cells_per_s": cells_total / wall_s if wall_s > 0 else float("nan"),
                      "images_per_s": len(mine) / wall_s if wall_s > 0 else float("nan")}
        recorder.flush(*environment.peak_memory())
        recorder.final("completed", len(mine), cells_total, {**throughput, "cells": cells_total})
    except BaseException as err:
        recorder.flush(*environment.peak_memory())
        recorder.final("failed", recorder.steps, recorder.samples, {}, error=f"{type(err).__name__}: {err}")
        raise
    finally:
        painter.shutdown(wait=True)
        recorder.close()
    if progress is not None:
        progress.write(throughput_line(f"screen {sample} rank {job.rank}", cells_total, len(mine), wall_s, seconds)
                       + "\n")
    done = sorted((out / "parts").glob("rank-*.json"))
    if len(done) < job.world_size:
        return {**part, "partial": True}
    return combine_parts(out, sample, n_images, job.world_size, confidence, ci_method)


def _timed_overlay(path: Path, phase: np.ndarray, cells: dict[str, np.ndarray], title: str) -> float:
    """Draw one overlay (in the overlay thread, so PNG encoding overlaps the networks); return its seconds."""
    from cellavie_hpc.screen.overlay import write_overlay

    t0 = time.perf_counter()
    write_overlay(path, phase, cells, title)
    return time.perf_counter() - t0


def throughput_line(label: str, cells: int, images: int, wall_s: float, seconds: dict[str, float]) -> str:
    """`label: N cells, M images in T s: X cells/s, Y images/s; stage seconds read a, refocus b, ...`.

    Stage seconds are busy time per stage; read, refocus and write (the overlay PNGs) run in their own
    threads beside the network stages, so they may add up to more than the wall time.
    """
    rate = cells / wall_s if wall_s > 0 else float("nan")
    stages = ", ".join(f"{k} {v:.2f}" for k, v in seconds.items())
    return (f"{label}: {cells} cells, {images} images in {wall_s:.2f} s: {rate:.1f} cells/s, "
            f"{images / wall_s if wall_s > 0 else float('nan'):.3f} images/s; stage seconds {stages}")


def combine_parts(out: str | Path, sample: str, n_images: int, world_size: int, confidence: float = 0.95,
                  ci_method: str = "clopper-pearson") -> dict:
    """Join the ranks' parts into OUT/cells.{csv,parquet}, OUT/summary.json (+ evaluation); return the summary."""
    import pandas as pd

    out = Path(out)
    parts = []
    for rank in range(world_size):
        path = out / "parts" / f"rank-{rank:05d}.json"
        if not path.is_file():
            raise UserError(f"{path}: missing; rank {rank} of {world_size} has not finished screening {sample}; "
                            "rerun that rank")
        parts.append(json.loads(path.read_text()))
    frame = pd.concat([pd.read_parquet(out / "parts" / f"rank-{r:05d}.parquet") for r in range(world_size)],
                      ignore_index=True).sort_values(["image_index", "cell"], kind="stable").reset_index(drop=True)
    screened = sorted(i for p in parts for i in p["images"])
    if screened != list(range(n_images)):
        raise UserError(f"{out}/parts: ranks screened images {screened[:10]}... instead of 0..{n_images - 1} once each; "
                        "the parts come from different runs, clear OUT and rerun")
    _write_table(frame, out / "cells")
    infected = frame[frame["infected"]] if len(frame) else frame
    stages = {s: int((infected["stage"] == s).sum()) for s in ("ring", "trophozoite", "schizont")}
    summary = sample_summary(sample, n_images, len(frame), len(infected), stages, confidence, ci_method)
    wall = max(p["wall_s"] for p in parts)
    seconds = {k: sum(p["seconds"][k] for p in parts) for k in parts[0]["seconds"]}
    summary["throughput"] = {"ranks": world_size, "wall_s": wall, "cells_per_s": len(frame) / wall if wall else None,
                             "images_per_s": n_images / wall if wall else None, "stage_seconds": seconds,
                             "line": throughput_line(f"screen {sample}", len(frame), n_images, wall, seconds)}
    if parts[0]["evaluation"] is not None:
        per_image = [c for p in parts for c in p["evaluation"]]
        evaluation = combine(per_image)
        evaluation["missed_infected"] = [{"image": c["image"], **m} for c in per_image for m in c["missed_infected"]]
        evaluation["false_positives"] = [{"image": c["image"], **m} for c in per_image for m in c["false_positives"]]
        evaluation["per_image"] = [{k: c[k] for k in ("image", *COUNT_KEYS)} for c in per_image]
        _write_json(evaluation, out / "evaluation.json")
        summary["evaluation"] = {k: v for k, v in evaluation.items() if k not in ("per_image", "false_positives")}
    _write_json(summary, out / "summary.json")
    return summary
