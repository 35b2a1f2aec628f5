"""`cellavie info [--json]`: versions, devices, Horovod build and the job environment of this process."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from cellavie_hpc.train.environment import collect_info

    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for section, values in info.items():
        print(f"{section}:")
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            print(f"  {key}: {value}" if key else f"  {value}")
    return 0
