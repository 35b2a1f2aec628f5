"""`cellavie collect SWEEP_DIR ... --out RESULTS`: per-rank records -> runs/ranks/points tables."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR",
                        help="folders holding run directories (RUN_DIR/records/rank-XXXXX.jsonl, any depth)")
    parser.add_argument("--out", required=True, metavar="RESULTS", help="results folder to write")
    parser.add_argument("--include-incomplete", action="store_true",
                        help="let incomplete/failed runs into the points table (and so the efficiency figures)")
    parser.add_argument("--warmup", type=int, default=None, metavar="N",
                        help="steps excluded as warm-up (default: warmup_steps from each run's header)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    from cellavie_hpc.errors import UserError
    from cellavie_hpc.report.collect import collect

    if args.warmup is not None and args.warmup < 0:
        raise UserError(f"--warmup {args.warmup}: must be 0 or more steps")
    collection, paths = collect(args.sweep_dirs, args.out, args.include_incomplete, args.warmup, not args.quiet)
    runs = collection.runs
    complete = int(runs["complete"].fillna(False).astype(bool).sum())
    print(f"{len(runs)} runs ({complete} complete), {len(collection.ranks)} rank files -> {args.out}")
    for problem in collection.problems:
        if problem["severity"] == "error":
            print(f"  {problem['run']}: {problem['message']}", file=sys.stderr)
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 0
