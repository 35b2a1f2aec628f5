"""`cellavie screen`: screen holograms of a sample for infected cells with a trained chain.

    cellavie screen DATASET --models MODELS_DIR --out OUT [--refocus physics|cnn] [--evaluate]
    cellavie screen --samples-from FILE --models MODELS_DIR --out OUT    (Slurm array: one line per task)
    cellavie screen --train-chain DATASET --models MODELS_DIR [--networks classifier,unet,detector]
    cellavie screen VALIDATION --models MODELS_DIR --out OUT --calibrate [--target-sensitivity S]

Several ranks (srun -n N, mpirun) over one sample split its images; the last rank to finish writes
the combined table and summary. The array task id and the rank come from the job environment.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", nargs="?", help="sample: a hologram data set folder")
    parser.add_argument("--models", required=True, help="MODELS_DIR with chain.json and one .keras file per network")
    parser.add_argument("--out", help="output folder (with --samples-from: one sub-folder per sample)")
    parser.add_argument("--samples-from", metavar="FILE",
                        help="text file of sample folders, one per line; task SLURM_ARRAY_TASK_ID screens line ID")
    parser.add_argument("--refocus", choices=("physics", "cnn"), default="physics",
                        help="autofocus + angular-spectrum propagation, or the refocusing network")
    parser.add_argument("--evaluate", action="store_true",
                        help="compare with the ground truth: sensitivity, specificity, false positives per million")
    parser.add_argument("--calibrate", action="store_true",
                        help="DATASET is a validation sample with ground truth: screen it, choose the infected "
                             "threshold (OUT/calibration.*) and store it in MODELS_DIR/chain.json")
    parser.add_argument("--target-sensitivity", type=float, default=None,
                        help="with --calibrate: the validation sensitivity to keep (default: every infected cell "
                             "the chain detects)")
    parser.add_argument("--overlays", choices=("infected", "all", "none"), default="infected",
                        help="PNG overlays of images with infected cells, of every image, or none")
    parser.add_argument("--threshold", type=float, default=None,
                        help="infected if 1 - P(healthy) >= this (default: the chain's)")
    parser.add_argument("--tile", type=int, default=512, help="network tile size, pixels")
    parser.add_argument("--overlap", type=int, default=64, help="tile overlap, pixels (>= largest cell diameter)")
    parser.add_argument("--batch", type=int, default=4, help="tiles per network call")
    parser.add_argument("--crop-batch", type=int, default=256, help="cells per classifier call")
    parser.add_argument("--prefetch", type=int, default=2, help="images read and refocused ahead (0: no overlap)")
    parser.add_argument("--precision", choices=("fp32", "mixed_float16", "mixed_bfloat16"), default="fp32")
    parser.add_argument("--xla", choices=("auto", "on", "off"), default="auto",
                        help="XLA-compile the network functions (auto: only with a GPU; slower on CPU)")
    parser.add_argument("--pad", choices=("none", "edge", "zero"), default="edge",
                        help="FFT padding of the physics refocus, by the light's 45-degree reach over the focus "
                             "distance: edge (default) cuts the phase error of cells within 20 px of the border 3x; "
                             "none: periodic wrap-around")
    parser.add_argument("--z-range-um", type=float, nargs=2, default=(-60.0, 60.0), metavar=("MIN", "MAX"),
                        help="autofocus search range, micrometres")
    parser.add_argument("--max-images", type=int, default=None, help="screen only the first N images")
    parser.add_argument("--ci-method", choices=("clopper-pearson", "wilson"), default="clopper-pearson")
    parser.add_argument("--train-chain", metavar="DATASET",
                        help="instead of screening, train the chain's networks on DATASET and write MODELS_DIR")
    parser.add_argument("--networks", default="classifier",
                        help="with --train-chain: comma-separated networks (classifier always; unet, detector, refocus)")
    parser.add_argument("--steps", type=int, default=None, help="with --train-chain: optimiser steps per network")
    parser.add_argument("--crops", choices=("refocused", "truth"), default="refocused",
                        help="with --train-chain: train the classifier on the chain's refocused phase around the cells "
                             "it finds (default; uses --pad/--z-range-um as screening will), or on the clean in-focus "
                             "phase around the true cells")
    parser.add_argument("--work-dir", default=None, help="with --train-chain: run folders (default MODELS_DIR/runs)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _sample_for_task(path: str) -> str:
    from pathlib import Path

    from cellavie_hpc.errors import UserError
    from cellavie_hpc.launch import job_env

    lines = [s.strip() for s in Path(path).read_text().splitlines() if s.strip() and not s.startswith("#")]
    task = job_env.detect().array_task_id
    if task is None:
        raise UserError(f"--samples-from {path}: no SLURM_ARRAY_TASK_ID; run it as a Slurm array "
                        f"(sbatch --array=0-{len(lines) - 1}) or give the sample as DATASET")
    if not 0 <= task < len(lines):
        raise UserError(f"--samples-from {path}: array task {task} but the file lists {len(lines)} samples "
                        f"(use --array=0-{len(lines) - 1})")
    return lines[task]


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from cellavie_hpc.errors import UserError

    from cellavie_hpc.screen.chain import ScreenOptions

    progress = None if args.quiet else sys.stderr
    options = ScreenOptions(refocus=args.refocus, tile=args.tile, overlap=args.overlap, batch=args.batch,
                            crop_batch=args.crop_batch, prefetch=args.prefetch, precision=args.precision,
                            xla={"auto": None, "on": True, "off": False}[args.xla], pad=args.pad,
                            z_range_m=(args.z_range_um[0] * 1e-6, args.z_range_um[1] * 1e-6))
    if args.train_chain:
        from cellavie_hpc.screen.train_chain import train_chain

        networks = tuple(n.strip() for n in args.networks.split(",") if n.strip())
        steps = {n: args.steps for n in (*networks, "classifier")} if args.steps else None
        spec = train_chain(args.train_chain, args.models, args.work_dir or Path(args.models) / "runs",
                           networks=networks, steps=steps, crops=args.crops, options=options, progress=progress)
        print(f"{args.models}: chain written (segmentation {spec.segmentation}, detection {spec.detection}, "
              f"networks {', '.join(spec.networks())}, classifier on {args.crops} crops, infected threshold "
              f"{spec.infected_threshold:.3g})")
        return 0
    from cellavie_hpc.screen.run import screen_sample

    if args.out is None:
        raise UserError("--out is required to screen")
    if (args.dataset is None) == (args.samples_from is None):
        raise UserError("give exactly one of DATASET or --samples-from FILE")
    dataset = args.dataset or _sample_for_task(args.samples_from)
    out = Path(args.out) if args.dataset else Path(args.out) / Path(dataset).name
    if args.calibrate and args.samples_from:
        raise UserError("--calibrate screens one validation sample given as DATASET, not --samples-from")
    result = screen_sample(dataset, args.models, out, options, evaluate=args.evaluate or args.calibrate,
                           overlays=args.overlays,
                           infected_threshold=args.threshold, ci_method=args.ci_method, max_images=args.max_images,
                           progress=progress)
    if result.get("partial"):
        print(f"{out}: rank {result['rank']} screened {len(result['images'])} images ({result['cells']} cells); "
              "the last rank to finish writes the summary")
        return 0
    if args.calibrate:
        from cellavie_hpc.data.dataset import open_dataset
        from cellavie_hpc.screen.calibrate import calibrate, truth_of

        truth = truth_of(open_dataset(dataset), args.max_images)
        choice = calibrate(out, truth, args.models, args.target_sensitivity, dataset=str(Path(dataset).resolve()))
        print(f"{args.models}: infected threshold {choice['threshold']:.4g} (validation: sensitivity "
              f"{choice['sensitivity']:.4f} = {choice['tp']}/{choice['infected_cells']}, 95% CI "
              f"{choice['sensitivity_ci95'][0]:.3f}-{choice['sensitivity_ci95'][1]:.3f}; "
              f"{choice['fp_per_million_healthy']:.0f} false positives per million healthy cells); "
              f"curve in {out}/calibration.png")
    ci = result["parasitaemia_ci"]
    estimate = result["parasitaemia"]
    print(f"{out}: {result['cells_screened']} cells screened, {result['infected_found']} infected; parasitaemia "
          + (f"{estimate:.3g} ({ci['confidence']:.0%} CI {ci['low']:.3g}-{ci['high']:.3g}, {ci['method']})"
             if estimate is not None else "n/a (no cells)"))
    print(result["throughput"]["line"])
    if "evaluation" in result:
        ev = result["evaluation"]
        print("evaluation: " + json.dumps({k: ev[k] for k in ("sensitivity", "specificity",
                                                               "false_positives_per_million_healthy",
                                                               "detection_recall")}))
    return 0
