"""Accuracy reached vs global batch under three learning-rate schedules, same samples seen by every run.

    .venv/bin/python benchmarks/large_batch.py                        # batches 4 8 16 32, ~5 min on 2 cores
    .venv/bin/python benchmarks/large_batch.py --batches 4 32 --epochs 2 --out runs/large_batch

More GPUs at a fixed per-GPU batch means a larger global batch and fewer optimiser updates per epoch;
whether that costs accuracy depends on the schedule. This trains the tiny U-Net on a small synthetic
data set for the same number of epochs (so the same samples) at each global batch (`train.global_batch`,
single back-end: only the global batch changes the optimisation, not how it is split over replicas) under:

* ``constant``: Adam at the reference learning rate whatever the batch;
* ``linear+warmup``: Adam at reference x batch/reference-batch, warmed up linearly over a fixed
  fraction of the run's updates;
* ``lamb``: the same scaling and warm-up with LAMB (layer-wise trust ratio).

The scaled schedules give the engine the reference rate with `train.lr_scaling: linear` and
`train.reference_batch` (the first batch), so the engine scales by global batch / reference batch,
on the single back-end as on many GPUs; the table's lr is the effective peak rate from each run's
record header. Held-out metrics come from each run's metrics.json (the last `data.eval_images`
images); a run that fails is listed as failed with its error.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from allreduce import environment  # noqa: E402  (benchmarks/allreduce.py: versions, CPU, git commit)

SCHEDULES = ("constant", "linear+warmup", "lamb")
#: Held-out IoU may drop this much from the reference batch and still count as "kept".
TOLERANCE = 0.02


def overrides(schedule: str, batch: int, reference_batch: int, reference_lr: float, warmup_fraction: float,
              steps: int) -> list[str]:
    """`key=value` overrides of one (schedule, global batch) point; `steps` is that point's number of updates."""
    scaled = schedule != "constant"
    warmup = max(1, round(warmup_fraction * steps)) if scaled else 0
    return [f"train.global_batch={batch}", f"train.learning_rate={reference_lr!r}",
            f"train.lr_scaling={'linear' if scaled else 'none'}", f"train.reference_batch={reference_batch}",
            f"train.warmup_steps={warmup}", f"train.optimizer={'lamb' if schedule == 'lamb' else 'adam'}"]


def run_point(mapping: dict, run_dir: Path, extra: list[str]) -> dict:
    """Train one point in this process; its metrics, steps, effective peak rate and warm-up (from the record
    header) and wall time, or the error that stopped it."""
    from cellavie_hpc.train.config import resolve
    from cellavie_hpc.train.loop import train

    start = time.perf_counter()
    try:
        result = train(resolve(mapping, extra), run_dir, resume="never", progress=None)
    except Exception as error:  # noqa: BLE001  (a failed point is a result to show, not a reason to stop)
        traceback.print_exc(file=sys.stderr)
        return {"status": f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}",
                "wall_s": time.perf_counter() - start}
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    with open(result.records) as records:
        header = json.loads(records.readline())
    return {"status": result.status, "steps": result.steps, "metrics": metrics, "lr": header["learning_rate"],
            "warmup": header["config"]["train"]["warmup_steps"], "wall_s": time.perf_counter() - start}


def conclusion(rows: dict[tuple[str, int], dict], batches: list[int], key: str) -> str:
    """Which schedules keep `key` within TOLERANCE of the reference batch at the largest batch."""
    low, high = batches[0], batches[-1]
    kept, lines = [], []
    for schedule in SCHEDULES:
        ref = rows[(schedule, low)].get("metrics", {}).get(key)
        top = rows[(schedule, high)].get("metrics", {}).get(key)
        if ref is None or top is None:
            lines.append(f"{schedule}: no value")
            continue
        lines.append(f"{schedule} {ref:.3f}->{top:.3f}")
        if top >= ref - TOLERANCE:
            kept.append(schedule)
    best = max(SCHEDULES, key=lambda s: rows[(s, high)].get("metrics", {}).get(key) or -math.inf)
    return (f"{key} batch {low}->{high}: " + ", ".join(lines) + f"; within {TOLERANCE} of batch {low}: "
            + (", ".join(kept) or "none") + f"; best at batch {high}: {best}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32],
                        help="global batches; the first is the reference")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of every run (same samples seen)")
    parser.add_argument("--lr", type=float, default=1e-3, help="reference learning rate, at the first batch")
    parser.add_argument("--warmup-fraction", type=float, default=0.1, help="warm-up, as a share of a run's updates")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--out", type=Path, help="folder for the data set and runs (default: a temp dir)")
    args = parser.parse_args()
    if sorted(args.batches) != args.batches or args.batches[0] < 1:
        parser.error("--batches must be positive and increasing (the first is the reference)")
    out = args.out or Path(tempfile.mkdtemp(prefix="cellavie-large-batch-"))
    env = environment()
    began = time.perf_counter()

    from cellavie_hpc.data.synthetic import generate_dataset

    dataset = out / "dataset"
    if not (dataset / "manifest.json").exists():
        generate_dataset(dataset, images=args.images, size=args.size, parasitemia=0.05, seed=1, workers=1,
                         progress=False)
    stride = args.patch // 2
    mapping = {"run": {"name": "large-batch", "seed": 0},
               "data": {"dataset": str(dataset), "patch": args.patch, "stride": stride, "eval_images": 1},
               "model": {"name": "unet", "preset": "tiny"},
               "train": {"epochs": args.epochs, "intra_op_threads": 2, "inter_op_threads": 1,
                         "warmup_record_steps": 1}}
    windows = ((args.size - args.patch) // stride + 1) ** 2
    train_tiles = windows * (args.images - 1)

    plan = [(s, b) for b in args.batches for s in SCHEDULES]
    rows: dict[tuple[str, int], dict] = {}
    for i, (schedule, batch) in enumerate(plan):
        steps = args.epochs * (train_tiles // batch)
        extra = overrides(schedule, batch, args.batches[0], args.lr, args.warmup_fraction, steps)
        extra.append(f"run.point={{schedule: {schedule}, global_batch: {batch}}}")
        rows[(schedule, batch)] = row = run_point(mapping, out / f"{schedule.replace('+', '_')}-b{batch}", extra)
        print(f"[{i + 1}/{len(plan)}] {schedule} batch {batch}: {row['status']} {row['wall_s']:.0f} s",
              file=sys.stderr, flush=True)

    keys = sorted({k for r in rows.values() for k in r.get("metrics", {}) if "iou" in k})
    print(f"\nAccuracy vs global batch: U-Net tiny, {args.images - 1} training + 1 held-out synthetic images of "
          f"{args.size}^2 (parasitaemia 0.05), patch {args.patch} stride {stride} ({train_tiles} training tiles), "
          f"{args.epochs} epochs at every batch, reference lr {args.lr:g} at batch {args.batches[0]}, "
          f"warm-up {args.warmup_fraction:.0%} of updates (measured, {env['cores']} cores)")
    head = f"{'batch':>5}  {'schedule':<14}{'lr':>9}{'warmup':>7}{'steps':>6}" + "".join(f"{k:>20}" for k in keys)
    print(head + f"{'train loss':>11}{'wall s':>8}  status")
    for schedule, batch in sorted(plan, key=lambda p: (SCHEDULES.index(p[0]), p[1])):
        r = rows[(schedule, batch)]
        m = r.get("metrics", {})
        values = "".join(f"{m[k]:>20.3f}" if m.get(k) is not None else f"{'-':>20}" for k in keys)
        loss = m.get("train_loss")
        lr = f"{r['lr']:.4g}" if "lr" in r else "-"
        print(f"{batch:>5}  {schedule:<14}{lr:>9}{r.get('warmup', '-'):>7}{r.get('steps', '-'):>6}{values}"
              f"{'-' if loss is None else f'{loss:.4f}':>11}{r['wall_s']:>8.0f}  {r['status']}")
    for key in keys:
        print("conclusion: " + conclusion(rows, args.batches, key))
    print(f"\nruns: {out}  total {time.perf_counter() - began:.0f} s")
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
