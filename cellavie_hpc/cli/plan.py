"""`cellavie plan RESULTS --images D --deadline 2h`: GPUs needed (or time on N GPUs), from the fitted model."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", metavar="RESULTS", help="results folder written by `cellavie collect`")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--images", type=float, metavar="D", help="number of hologram images to train on")
    size.add_argument("--tiles", type=float, metavar="D", help="number of training tiles (samples) instead")
    parser.add_argument("--tiles-per-image", type=float, default=None, metavar="K",
                        help="samples per image (default: samples_per_epoch / images of the measured runs)")
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--deadline", metavar="T", help="wall-clock budget, e.g. 2h, 90m, 1.5d")
    goal.add_argument("--gpus", type=int, metavar="N", help="print the time on N GPUs instead")
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs over the data")
    parser.add_argument("--model", default=None, help="model series to use (when several were measured)")
    parser.add_argument("--backend", default=None, help="back-end series to use")
    parser.add_argument("--precision", default=None, help="precision series to use")
    parser.add_argument("--variant", default=None, help="variant series to use (a sweep with `variants:`)")
    parser.add_argument("--bootstrap", type=int, default=200, metavar="N", help="bootstrap resamples")
    add_comm_arguments(parser)


def add_comm_arguments(parser: argparse.ArgumentParser) -> None:
    """`--comm FILE [--comm-engine E]`, shared with `cellavie report`."""
    parser.add_argument("--comm", metavar="FILE", default=None,
                        help="measured allreduce fits (benchmarks/allreduce.py): use them for the exchange term")
    parser.add_argument("--comm-engine", metavar="E", default=None,
                        help="which engine's fit in FILE (needed when it holds several)")


def comm_fit(args: argparse.Namespace):
    """The `CommFit` that `--comm`/`--comm-engine` name, or None."""
    from cellavie_hpc.errors import UserError
    from cellavie_hpc.report import comm_model

    if args.comm is None:
        if args.comm_engine is not None:
            raise UserError("--comm-engine needs --comm FILE (the allreduce fits to pick from)")
        return None
    return comm_model.load_comm_fit(args.comm, args.comm_engine)


def run(args: argparse.Namespace) -> int:
    from cellavie_hpc.errors import UserError
    from cellavie_hpc.report import calibration
    from cellavie_hpc.report.collect import load_results

    _, points, _ = load_results(args.results)
    cal = calibration.select(calibration.calibrate(points, repeats=args.bootstrap, comm=comm_fit(args)),
                             model=args.model, backend=args.backend, precision=args.precision,
                             variant=args.variant)
    if args.tiles is not None:
        samples = args.tiles
    else:
        per_image = args.tiles_per_image or cal.samples_per_image
        if not per_image:
            raise UserError("samples per image unknown: the records name no image count; "
                            "pass --tiles-per-image K or give --tiles instead of --images")
        samples = args.images * per_image
    if args.gpus is not None and args.gpus < 1:
        raise UserError(f"--gpus {args.gpus}: must be at least 1")
    deadline = calibration.parse_duration_s(args.deadline) if args.deadline else None
    answer = calibration.plan(cal, samples, args.epochs, deadline, args.gpus)
    print(answer.text())
    print(f"exchange term: {cal.exchange_source}")
    return 0 if answer.feasible else 1
