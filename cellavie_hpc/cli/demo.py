"""`cellavie demo`: synthetic data, a small scaling sweep as local processes, collect, report; no cluster needed."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo", metavar="DIR", help="sweep directory of the demo")
    parser.add_argument("--sweep", metavar="SWEEP.yaml", help="sweep to run (default: jobs/demo.yaml)")


def run(args: argparse.Namespace) -> int:
    from cellavie_hpc.launch.submit import run_demo

    report = run_demo(args.out, args.sweep)
    print(f"demo done: report in {report} (open {report / 'report.html'})")
    return 0
