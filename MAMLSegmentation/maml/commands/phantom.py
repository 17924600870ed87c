"""``maml phantom``: write synthetic dual-phase liver CT cases in the nnU-Net v2 raw layout."""

from __future__ import annotations

import argparse

HELP = (
    "Generate synthetic arterial + venous liver CT phantoms with liver/tumor labels and the true "
    "arterial-to-venous transform (nnU-Net v2 raw layout)."
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--cases", type=int, default=10, help="number of cases (default 10)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the first case; case i uses seed + i (default 0)")
    parser.add_argument("--size", default="demo",
                        help="demo (about 160x160x80 voxels; slice thickness 0.7-5 mm, pixels, field of view, "
                             "noise and contrast drawn per case), full (512x512x150, 0.6-0.9 mm, 1.5 mm slices) "
                             "or tiny (tests only); default demo")
    parser.add_argument("--contact-sheet", action=argparse.BooleanOptionalAction, default=True,
                        help="write contact_sheet.png of the first cases (default on)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from maml.synthetic import write_dataset

    out = write_dataset(args.out, n_cases=args.cases, seed=args.seed, size=args.size,
                        contact_sheet=args.contact_sheet, progress=not args.quiet)
    print(f"wrote {args.cases} phantom case(s) to {out}")
    return 0
