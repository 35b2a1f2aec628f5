"""`cellavie generate`: write a synthetic hologram data set (or `--verify` an existing one)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="data set folder (must be absent or empty; with --verify: the data set)")
    parser.add_argument("--images", type=int, default=16, help="number of holograms")
    parser.add_argument("--size", type=int, default=2048, help="image height and width, pixels")
    parser.add_argument("--parasitemia", type=float, default=0.01, help="fraction of cells infected (exact-count sampling)")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (image i uses SeedSequence([seed, i]))")
    parser.add_argument("--angles", type=int, default=1, help="illumination angles = field planes per image")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--wavelength-nm", type=float, default=532.0, help="illumination wavelength in vacuum, nm")
    parser.add_argument("--pixel-size-um", type=float, default=0.25, help="pixel pitch at the sample, micrometres")
    parser.add_argument("--verify", action="store_true",
                        help="instead of generating, check every file of --out against its manifest (sha256, layout)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def run(args: argparse.Namespace) -> int:
    if args.verify:
        from cellavie_hpc.data.dataset import open_dataset

        ds = open_dataset(args.out, verify=True)
        counts = ds.manifest["counts"]
        print(f"{args.out}: OK, {len(ds)} images, {counts['cells']} cells, {counts['infected']} infected; "
              "all checksums match")
        return 0
    from cellavie_hpc.data.synthetic import generate_dataset

    manifest = generate_dataset(args.out, images=args.images, size=args.size, parasitemia=args.parasitemia,
                                seed=args.seed, angles=args.angles, workers=args.workers,
                                wavelength_m=args.wavelength_nm * 1e-9, pixel_size_m=args.pixel_size_um * 1e-6,
                                progress=not args.no_progress)
    c = manifest["counts"]
    stages = ", ".join(f"{k} {v}" for k, v in c["stages"].items())
    print(f"{args.out}: {c['images']} images, {c['cells']} cells, {c['infected']} infected ({stages})")
    return 0
