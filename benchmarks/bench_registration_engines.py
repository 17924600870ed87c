"""The two registration engines side by side: SimpleITK (the default) and itk-elastix, same preset.

For each phantom case (the demo-size generator's breathing motion is known), both engines register
the arterial phase onto the venous one in this process, alternating which goes first; prints per
case the target registration error in the liver (mm), the liver Dice of the warped label, the
stages' and the whole call's time, and at the end itk-elastix's one-time loading and the ratio of
the engines' times, loading included and not. A full-size case (512 x 512 x 150) is added with
``--full``.

    python benchmarks/bench_registration_engines.py [--seeds 0 3 8] [--full] [--preset deformable]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MAMLSegmentation"))


def target_error_mm(transform, true, label, max_points: int = 4000) -> float:
    """Mean distance between the estimated and the true mapping over the label's voxels (mm)."""
    import numpy as np
    import SimpleITK as sitk

    index = np.argwhere(sitk.GetArrayViewFromImage(label) > 0)[:, ::-1]
    index = index[:: max(1, len(index) // max_points)]
    points = [label.TransformContinuousIndexToPhysicalPoint([float(v) for v in i]) for i in index]
    estimated = np.array([transform.TransformPoint(p) for p in points])
    expected = np.array([true.TransformPoint(p) for p in points])
    return float(np.linalg.norm(estimated - expected, axis=1).mean())


def liver_dice(case, transform) -> float:
    import SimpleITK as sitk

    from maml.evaluation.metrics import dice_score
    from maml.registration import warp_label

    warped = sitk.GetArrayFromImage(warp_label(case.labels["arterial"], case.images["venous"], transform)) > 0
    return dice_score(warped, sitk.GetArrayFromImage(case.labels["venous"]) > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 3, 8])
    parser.add_argument("--full", action="store_true", help="also a full-size case (seed 7)")
    parser.add_argument("--preset", default="deformable", choices=("rigid", "affine", "deformable"))
    args = parser.parse_args()

    from maml.registration import _load_elastix, register
    from maml.synthetic import make_case

    t0 = time.perf_counter()
    _load_elastix()
    loading = time.perf_counter() - t0
    cases = [(seed, "demo") for seed in args.seeds] + ([(7, "full")] if args.full else [])
    totals = {"simpleitk": 0.0, "elastix": 0.0}
    print(f"{'case':<14}{'engine':<11}{'TRE mm':>8}{'liver Dice':>12}{'stages s':>10}{'call s':>8}")
    for number, (seed, size) in enumerate(cases):
        case = make_case(seed, size)
        order = ("simpleitk", "elastix") if number % 2 == 0 else ("elastix", "simpleitk")
        for engine in order:
            result = register(case.images["venous"], case.images["arterial"], args.preset, engine=engine)
            error = target_error_mm(result.transform, case.arterial_to_venous, case.labels["venous"])
            stages = sum(result.quality["stage_seconds"].values())
            totals[engine] += result.quality["seconds"]
            print(f"{size} {seed:<9}{engine:<11}{error:>8.2f}{liver_dice(case, result.transform):>12.3f}"
                  f"{stages:>10.1f}{result.quality['seconds']:>8.1f}", flush=True)
    print(f"itk-elastix loading (once per process): {loading:.1f} s")
    print(f"ratio simpleitk/elastix, calls only: {totals['simpleitk'] / totals['elastix']:.2f}")
    print(f"ratio simpleitk/elastix, elastix's loading included: "
          f"{totals['simpleitk'] / (totals['elastix'] + loading):.2f}")


if __name__ == "__main__":
    main()
