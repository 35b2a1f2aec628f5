"""`cellavie tiles plan DATASET ...`: the tiles one rank reads in one epoch, or a per-rank summary."""
from __future__ import annotations

import argparse
import json
import sys

from cellavie_hpc.data.sharding import BALANCES, REMAINDERS, shard, shard_all, shard_table
from cellavie_hpc.data.tiling import BORDERS, plan_tiles


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tiles_command", metavar="ACTION", required=True)
    p = sub.add_parser(
        "plan",
        help="tile a data set and shard it across ranks",
        description="Tile a data set and shard the tiles across ranks for one epoch. With --rank, print "
        "that rank's tiles in reading order; without, one summary row per rank.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("dataset", metavar="DATASET", help="data-set folder (with its manifest)")
    p.add_argument("--patch", type=int, default=256, help="tile side (pixels)")
    p.add_argument("--stride", type=int, default=None, help="tile grid step (pixels; default: --patch)")
    p.add_argument("--border", choices=BORDERS, default="drop", help="drop partial tiles or reflect-pad them")
    p.add_argument("--world-size", type=int, default=1, help="number of data-parallel ranks")
    p.add_argument("--rank", type=int, default=None, help="print this rank's tiles (default: a summary per rank)")
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-shuffle", action="store_true", help="keep plan order (image-major, row-major)")
    p.add_argument("--remainder", choices=REMAINDERS, default="pad", help="pad with repeats or drop leftover tiles")
    p.add_argument("--locality", action="store_true", help="give whole images to ranks (each rank reads only its files)")
    p.add_argument("--balance", choices=BALANCES, default="count", help="balance tile counts or read costs (pixels)")
    p.add_argument("--batch", type=int, default=1, help="per-rank batch, for steps per epoch")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    from cellavie_hpc.data.dataset import open_dataset

    ds = open_dataset(args.dataset)
    plan = plan_tiles([(im.height, im.width) for im in ds.images], args.patch, args.stride, args.border)
    options = dict(
        epoch=args.epoch, seed=args.seed, shuffle=not args.no_shuffle, remainder=args.remainder,
        locality=args.locality, balance=args.balance,
    )
    names = [im.id for im in ds.images]
    if args.rank is not None:
        share = shard(plan, args.world_size, args.rank, **options)
        rows = [
            {"image": names[i], "index": i, "y": y, "x": x, "padded": bool(p)}
            for (i, y, x), p in zip(share.tiles.tolist(), share.padded.tolist())
        ]
        if args.json:
            head = {"rank": share.rank, "world_size": share.world_size, "epoch": share.epoch, "patch": plan.patch,
                    "steps_per_epoch": share.steps(args.batch), "dropped": share.dropped}
            json.dump({**head, "tiles": rows}, sys.stdout)
            sys.stdout.write("\n")
        else:
            print("image\ty\tx\tpadded")
            for r in rows:
                print(f"{r['image']}\t{r['y']}\t{r['x']}\t{int(r['padded'])}")
        return 0
    shares = shard_all(plan, args.world_size, **options)
    table = shard_table(shares, args.batch)
    if args.json:
        json.dump({"plan_tiles": len(plan), "dropped": shares[0].dropped, "ranks": table}, sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(f"{len(plan)} tiles of {plan.patch}x{plan.patch} (stride {plan.stride}, border {plan.border}) "
          f"in {len(ds.images)} images; {shares[0].dropped} dropped this epoch")
    print(f"{'rank':>5} {'tiles':>8} {'padded':>7} {'images':>7} {'steps/epoch':>12}")
    for row in table:
        print(f"{row['rank']:>5} {row['tiles']:>8} {row['padded']:>7} {row['images']:>7} {row['steps_per_epoch']:>12}")
    return 0
