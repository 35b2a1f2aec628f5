"""The `cellavie` command: one thin subcommand per module, loaded lazily so `--help` stays fast.

Each subcommand lives in `cellavie_hpc/cli/<name>.py` and exposes `add_arguments(parser)` and
`run(args) -> int`. The CLI parses and calls; the logic lives in the package folders.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from cellavie_hpc import __version__
from cellavie_hpc.errors import UserError

SUBCOMMANDS: dict[str, str] = {
    "demo": "run the embedded default end to end (synthetic data, local sweep, report)",
    "generate": "write a synthetic hologram data set with ground truth",
    "tiles": "inspect tile plans and per-rank shards of a data set",
    "train": "train one model from a YAML configuration (what every Slurm task runs)",
    "bench": "single-device performance methodology: throughput, memory, largest batch",
    "sweep": "expand, render, submit and follow sweeps (Slurm array jobs or local)",
    "collect": "gather per-rank records of runs into one tidy results table",
    "report": "scaling tables, bottlenecks, plots, LaTeX and HTML from a results table",
    "plan": "how many GPUs (or how long) to train on a data set, from a results table",
    "screen": "screen holograms for infected cells with the trained chain",
    "info": "print versions, devices and the job environment (rank, world size)",
}


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Build the parser; with `only`, import just that subcommand (the others are listed, not loaded)."""
    parser = argparse.ArgumentParser(
        prog="cellavie",
        description="cellavie-hpc: train, scale and measure the CellAvIe malaria-detection chain on Slurm clusters.",
        epilog="Run `cellavie COMMAND --help` for the options of one command.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"cellavie-hpc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=summary, description=summary, formatter_class=_Formatter)
        if only is None or name == only:
            module = importlib.import_module(f"cellavie_hpc.cli.{name}")
            module.add_arguments(sp)
            sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in SUBCOMMANDS else "__none__")
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args._run(args) or 0)
    except UserError as err:
        print(f"cellavie {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cellavie {args.command}: interrupted", file=sys.stderr)
        return 130


