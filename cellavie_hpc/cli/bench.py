"""`cellavie bench --out DIR [--sweep FILE] [--quick] [--memory] [--portable]`: single-device performance.

Default: the methodology (one factor at a time around a reference point: data-set size, patch,
batch, precision, XLA, input pipeline, steps per execution; `--quick` for a tiny version), each point
trained by the real engine in its own process, records in DIR/runs, collected into DIR/results
(`cellavie report DIR/results` draws the curves). `--sweep` runs a sweep file's one-device points
instead. `--memory`: the largest batch that fits per model and patch. `--portable`: the models on
whatever Keras back-end is installed (no TensorFlow needed). Each mode prints its table at the end.
"""
from __future__ import annotations

import argparse

MODELS = ("refocus", "unet", "detector", "classifier")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _models(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in MODELS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"models must be among {', '.join(MODELS)}, got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (runs, results, tables)")
    parser.add_argument("--sweep", help="run this sweep file's points (e.g. jobs/single_gpu.yaml) instead of the "
                                        "built-in methodology")
    parser.add_argument("--scale", help="with --sweep: a scale of the sweep file (e.g. smoke)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="key.sub=value",
                        help="with --sweep: override a value of the sweep file (repeatable)")
    parser.add_argument("--quick", action="store_true", help="tiny models, short runs, one repeat (minutes)")
    parser.add_argument("--repeats", type=int, help="repeats per methodology point (default: 3, --quick 1)")
    parser.add_argument("--dataset", help="use this data set instead of generating OUT/dataset")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--memory", action="store_true", help="largest batch that fits, per model and patch")
    mode.add_argument("--portable", action="store_true", help="Keras-only bench on the installed Keras back-end")
    parser.add_argument("--models", type=_models, default=["unet"], help="--memory/--portable: comma-separated models")
    parser.add_argument("--patches", type=_ints, default=[64], help="--memory/--portable: comma-separated patches")
    parser.add_argument("--batches", type=_ints, default=[8], help="--portable: comma-separated batch sizes")
    parser.add_argument("--preset", choices=("tiny", "base"), default="tiny", help="--memory/--portable: preset")
    parser.add_argument("--precision", choices=("fp32", "tf32", "mixed_float16", "mixed_bfloat16"), action="append",
                        help="--memory/--portable: precision (repeatable; --memory uses the first)")
    parser.add_argument("--xla", action="store_true", help="--memory: XLA-compile the step")
    parser.add_argument("--budget-gib", type=float,
                        help="--memory: memory budget (GiB of RSS on a CPU; of device peak on a GPU); "
                             "default: half the machine's memory on a CPU, the device's own limit on a GPU")
    parser.add_argument("--limit", type=int, default=512, help="--memory: largest batch tried")
    parser.add_argument("--runner", choices=("engine", "portable"), default="engine",
                        help="--memory: train through the engine's step (TensorFlow) or perf.portable")
    parser.add_argument("--no-jit", action="store_true", help="--portable: do not compile the step")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from cellavie_hpc.errors import UserError

    progress = not args.no_progress
    if args.memory:
        from cellavie_hpc.perf.memory import run_memory

        budget = args.budget_gib
        if budget is not None and budget <= 0:
            raise UserError(f"--budget-gib must be positive, got {budget}")
        precision = (args.precision or ["fp32"])[0]
        if precision == "tf32":
            raise UserError("--memory measures tf32 as fp32 (same memory); use --precision fp32")
        _, table = run_memory(args.out, args.models, args.patches, preset=args.preset, precision=precision,
                              xla=args.xla, budget_bytes=int(budget * 2**30) if budget else None,
                              runner=args.runner, limit=args.limit, progress=progress)
    elif args.portable:
        import dataclasses

        from cellavie_hpc.perf import portable

        results = portable.run_table(args.models, args.patches, args.batches, args.precision or ["fp32"],
                                     args.preset, jit=not args.no_jit)
        table = portable.format_table(results)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "portable.json").write_text(json.dumps(
            {"device": portable.device(), "results": [dataclasses.asdict(r) | {"mfu": r.mfu} for r in results]},
            indent=1) + "\n")
        (out / "portable.txt").write_text(table + "\n")
    else:
        from cellavie_hpc.perf.methodology import run_bench

        if args.repeats is not None and args.repeats < 1:
            raise UserError(f"--repeats must be a positive integer, got {args.repeats}")
        if (args.scale or args.overrides) and not args.sweep:
            raise UserError("--scale and --set apply to a sweep file: add --sweep FILE")
        _, table, runs = run_bench(args.out, sweep_file=args.sweep, scale=args.scale, overrides=args.overrides,
                                   quick=args.quick, repeats=args.repeats, dataset=args.dataset, progress=progress)
        print(table)
        return 1 if all(r.returncode for r in runs) else 0
    print(table)
    return 0
