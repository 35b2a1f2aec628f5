"""`cellavie sweep`: submit a sweep (Slurm arrays or local), follow it, or render one point's batch script."""
from __future__ import annotations

import argparse
import sys


def _sweep_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", metavar="NAME", help="merge the sweep file's `scales: {NAME: ...}` entry over it "
                                                        "(e.g. `--scale smoke` runs jobs/scaling.yaml tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a sweep key, e.g. --set cluster.partition=gpu (repeatable)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    submit = sub.add_parser("submit", help="expand, validate and submit a sweep; returns once queued (Slurm)",
                            description="Points with the same resource shape become one Slurm array; a job "
                                        "depending on all arrays collects and reports. Locally it waits.")
    submit.add_argument("sweep", nargs="?", metavar="SWEEP.yaml", help="the sweep file (not with --resume)")
    submit.add_argument("--out", metavar="SWEEP_DIR", help="sweep directory (default: sweeps/NAME)")
    submit.add_argument("--resume", metavar="SWEEP_DIR",
                        help="submit again what did not complete in SWEEP_DIR (from its own sweep.yaml)")
    submit.add_argument("--cluster", choices=("slurm", "local", "auto"), default=None,
                        help="slurm, local processes, or auto: slurm when sbatch exists (default; --resume: as before)")
    submit.add_argument("--dry-run", action="store_true", help="print the plan, submit and write nothing")
    _sweep_source(submit)

    status = sub.add_parser("status", help="pending / running / done / failed per point of a sweep directory")
    status.add_argument("sweep_dir", metavar="SWEEP_DIR")
    status.add_argument("--no-sacct", action="store_true", help="use squeue and the records only")
    status.add_argument("--json", action="store_true", help="one JSON object per point")

    render = sub.add_parser("render", help="write the batch script (and configuration) of one point, to run by hand")
    render.add_argument("sweep", metavar="SWEEP.yaml")
    render.add_argument("--point", required=True, metavar="K", help="point index or id")
    render.add_argument("--out", metavar="SWEEP_DIR", help="sweep directory the script uses (default: sweeps/NAME)")
    render.add_argument("--script", metavar="FILE", help="write the script here (default: standard output)")
    _sweep_source(render)


def run(args: argparse.Namespace) -> int:
    if args.action == "submit":
        from cellavie_hpc.errors import UserError
        from cellavie_hpc.launch.submit import submit_sweep

        if (args.sweep is None) == (args.resume is None):
            raise UserError("give either SWEEP.yaml or --resume SWEEP_DIR")
        result = submit_sweep(args.sweep, out=args.out, resume=args.resume, cluster=args.cluster,
                              dry_run=args.dry_run, scale=args.scale, overrides=args.overrides)
        if result.report is not None and result.cluster == "local":
            print(f"report: {result.report}")
        return 0
    if args.action == "status":
        import json
        from dataclasses import asdict

        from cellavie_hpc.launch.state import format_statuses, point_statuses

        statuses = point_statuses(args.sweep_dir, use_sacct=not args.no_sacct)
        if args.json:
            for s in statuses:
                print(json.dumps(asdict(s)))
        else:
            print(format_statuses(statuses))
        return 0
    from cellavie_hpc.launch.submit import render_one

    text, written = render_one(args.sweep, args.point, out=args.out, scale=args.scale, overrides=args.overrides)
    if args.script:
        with open(args.script, "w") as f:
            f.write(text)
        print(f"wrote {args.script} ({', '.join(map(str, written))} written for it)", file=sys.stderr)
    else:
        sys.stdout.write(text)
        print(f"# wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0
