"""Autofocus accuracy and speed per metric on synthetic holograms of known focus (one command, one table).

    python benchmarks/autofocus.py [--images 8] [--size 256]

Prints mean / median / max absolute focus error (micrometres) and seconds per hologram for each metric,
with the environment. The figures quoted in docs/data.rst come from this script.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from cellavie_hpc.data.synthetic import SyntheticParams, render_image
    from cellavie_hpc.optics.autofocus import autofocus_accuracy
    from cellavie_hpc.train.environment import cpu_name, git_commit

    p = SyntheticParams(height=args.size, width=args.size, parasitemia=0.1, seed=args.seed)
    images = [render_image(p, i) for i in range(args.images)]
    fields = np.stack([im.field[0] for im in images])
    truth = [im.focus_distance_m for im in images]
    opts = dict(wavelength_m=p.wavelength_m, pixel_size_m=p.pixel_size_m, medium_index=p.medium_index,
                z_range_m=(-50e-6, 50e-6), border_px=16)
    rows = [("tamura", 21, 11), ("variance", 21, 11), ("gradient_variance", 21, 11), ("gradient_variance", 101, 11)]
    autofocus_accuracy(fields[:1], truth[:1], metric="variance", coarse_steps=5, fine_steps=3, **opts)  # warm-up
    print(f"{'metric':<18} {'coarse':>6} {'fine':>4} {'mean um':>8} {'median um':>9} {'max um':>8} {'s/hologram':>10}")
    for metric, coarse, fine in rows:
        t0 = time.perf_counter()
        acc = autofocus_accuracy(fields, truth, metric=metric, coarse_steps=coarse, fine_steps=fine, **opts)
        dt = (time.perf_counter() - t0) / len(fields)
        print(f"{metric:<18} {coarse:>6} {fine:>4} {acc['mean_abs_error_um']:>8.3f} {acc['median_abs_error_um']:>9.3f} "
              f"{acc['max_abs_error_um']:>8.3f} {dt:>10.3f}")
    print(f"\n{args.images} holograms {args.size}x{args.size}, |focus| in [10, 40] um, search -50..50 um; "
          f"python {platform.python_version()}, numpy {np.__version__}, tensorflow {tf.__version__}, "
          f"cpu {cpu_name()} x{os.cpu_count()}, commit {git_commit() or '?'}")


if __name__ == "__main__":
    main()
