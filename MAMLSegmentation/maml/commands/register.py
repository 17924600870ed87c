"""``maml register``: register a moving phase onto a fixed (reference) phase."""

from __future__ import annotations

import argparse

HELP = (
    "Register a moving CT phase onto a fixed (reference) phase (SimpleITK or elastix): writes registered.nii.gz, "
    "transform.h5 (fixed -> moving, readable by Slicer), matrix.txt (linear presets) and quality.json."
)


def configure(parser: argparse.ArgumentParser) -> None:
    from ..config import DEFAULT_REGISTRATION, DEFAULT_REGISTRATION_ENGINE, REGISTRATION_ENGINES, REGISTRATION_PRESETS

    parser.add_argument("--fixed", required=True, help="reference phase image (NIfTI, NRRD, MHA or DICOM folder)")
    parser.add_argument("--moving", required=True, help="phase image to register onto the fixed one")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--preset", default=DEFAULT_REGISTRATION, choices=REGISTRATION_PRESETS,
                        help="none, rigid, affine (rigid then affine) or deformable (rigid then "
                             "B-spline, default)")
    parser.add_argument("--engine", default=DEFAULT_REGISTRATION_ENGINE, choices=REGISTRATION_ENGINES,
                        help="SimpleITK (default) or itk-elastix; the same stages and metric")
    parser.add_argument("--fixed-mask", help="optional mask (voxels > 0) of the fixed image, e.g. body or liver")
    parser.add_argument("--moving-mask", help="optional mask (voxels > 0) of the moving image")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from maml import io
    from maml.registration import register, write_transform

    fixed = io.read_image(args.fixed, name=f"fixed image {args.fixed}")
    moving = io.read_image(args.moving, name=f"moving image {args.moving}")
    fixed_mask = io.read_image(args.fixed_mask, name=f"fixed mask {args.fixed_mask}") if args.fixed_mask else None
    moving_mask = io.read_image(args.moving_mask, name=f"moving mask {args.moving_mask}") if args.moving_mask else None

    bar = None
    progress = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=100, desc="register", unit="%", bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

        def progress(fraction: float, message: str) -> None:
            bar.n = int(round(100 * fraction))
            bar.set_postfix_str(message)
            bar.refresh()

    try:
        result = register(fixed, moving, args.preset, fixed_mask=fixed_mask, moving_mask=moving_mask,
                          progress=progress, engine=args.engine)
    finally:
        if bar is not None:
            bar.close()

    quality = dict(result.quality)
    quality["fixed"] = str(args.fixed)
    quality["moving"] = str(args.moving)
    with io.atomic_output_dir(args.out) as tmp:
        io.write_image(result.registered, tmp / "registered.nii.gz")
        write_transform(result, tmp / "transform.h5")
        if result.matrix is not None:
            np.savetxt(tmp / "matrix.txt", result.matrix, fmt="%.10g",
                       header="4x4 LPS matrix: fixed physical point -> moving physical point (ITK resampling direction)")
        io.write_json(quality, tmp / "quality.json")
    print(f"registered ({args.preset}, {args.engine}): NMI {quality['before']} -> {quality['after']} in {quality['seconds']:.1f} s; "
          f"results in {args.out}")
    if quality.get("warning"):
        print(f"warning: {quality['warning']}")
    return 0
