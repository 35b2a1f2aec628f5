"""`cellavie train CONFIG.yaml [key.sub=value ...] --run-dir RUN_DIR`: what every Slurm task runs.

Rank and world size come from the job environment (srun, mpirun, horovodrun, TF_CONFIG). Exit status:
0 completed, 75 preempted (checkpointed; rerun the same command to resume), 2 bad input, 1 failure.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training YAML (sections run, data, model, train; see docs/training.rst)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override configuration values, e.g. train.batch_per_replica=16")
    parser.add_argument("--run-dir", required=True, help="folder for records, checkpoints and the resolved config")
    parser.add_argument("--resume", choices=("auto", "never"), default="auto",
                        help="auto: continue from the latest checkpoint in RUN_DIR if there is one")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    import sys

    from cellavie_hpc.train import config as train_config
    from cellavie_hpc.train.loop import train

    config = train_config.load(args.config, args.overrides)
    result = train(config, args.run_dir, resume=args.resume, progress=None if args.quiet else sys.stderr)
    return result.exit_code
