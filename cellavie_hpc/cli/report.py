"""`cellavie report RESULTS --out REPORT_DIR`: scaling tables, bottlenecks, plots, calibration, documents."""
from __future__ import annotations

import argparse

from cellavie_hpc.cli.plan import add_comm_arguments, comm_fit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", metavar="RESULTS", help="results folder written by `cellavie collect`")
    parser.add_argument("--out", required=True, metavar="REPORT_DIR", help="report folder to write")
    parser.add_argument("--bootstrap", type=int, default=200, metavar="N",
                        help="bootstrap resamples for the calibration's uncertainty")
    add_comm_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from cellavie_hpc.report.render import build_report

    comm = comm_fit(args)
    written = build_report(args.results, args.out, bootstrap_repeats=args.bootstrap,
                           comm=comm)
    print(f"report -> {args.out}: {len(written['tables'])} tables, {len(written['figures'])} figure files")
    for path in written["documents"]:
        print(f"  {path}")
    return 0
