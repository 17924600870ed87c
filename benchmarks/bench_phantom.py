"""What the phantom generator draws, and how long a case takes.

    PYTHONPATH=MAMLSegmentation OMP_NUM_THREADS=1 python benchmarks/bench_phantom.py [--draws 500] [--cases 6]

Part 1 draws only the per-case parameters (protocol, contrast timing and HU, tumor and mimic plans)
for ``--draws`` seeds and prints their ranges; part 2 generates ``--cases`` demo cases and prints
seconds per case and voxels per case (target: about 160 x 160 x 80 voxels on average, and no slower
than the fixed-geometry generator's ~2-3 s per case on one core).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def summarise(name: str, values) -> str:
    v = np.asarray(values, float)
    return f"{name:28s} min {v.min():8.2f}  p10 {np.percentile(v, 10):8.2f}  median {np.median(v):8.2f}  " \
           f"p90 {np.percentile(v, 90):8.2f}  max {v.max():8.2f}"


def draws(n: int) -> None:
    from maml.synthetic import contrast
    from maml.synthetic.lesions import mimic_plan, tumor_plan
    from maml.synthetic.phantom import SIZES, _draw_body

    rows: dict[str, list] = {}
    counts, kinds = [], {}
    for seed in range(n):
        rng = np.random.default_rng(seed)
        body, protocol = _draw_body(rng, SIZES["demo"])
        timing = contrast.draw_timing(rng)
        hu = contrast.tissue_hu(rng, timing)
        plan = tumor_plan(rng, contrast.TUMOR_KINDS, contrast.KIND_WEIGHTS)
        mimics = mimic_plan(rng, timing["steatosis"])
        values = {
            "slice thickness mm": protocol["spacing"][2],
            "pixel mm": protocol["spacing"][0],
            "voxels / 160x160x80": np.prod(protocol["size"]) / (160 * 160 * 80),
            "noise sd venous HU": protocol["noise_sd_venous"],
            "noise grain mm": protocol["noise_grain_mm"],
            "body width mm": 2 * body["A"],
            "liver arterial HU": hu[contrast.LIVER][0][0],
            "liver venous HU": hu[contrast.LIVER][0][1],
            "aorta arterial HU": hu[contrast.AORTA][0][0],
            "portal vein venous HU": hu[contrast.PORTAL][0][1],
            "spleen venous - liver HU": hu[contrast.SPLEEN][0][1] - hu[contrast.LIVER][0][1],
            "mimics per case": len(mimics),
        }
        for key, value in values.items():
            rows.setdefault(key, []).append(value)
        counts.append(len(plan))
        rows.setdefault("tumor diameter mm", []).extend(2 * r for _, r in plan)
        for kind, _ in mimics:
            kinds[kind] = kinds.get(kind, 0) + 1
    print(f"per-case draws over {n} seeds (demo size):")
    for key, values in rows.items():
        print(" ", summarise(key, values))
    counts = np.array(counts)
    print("  tumors per case:", {k: round(float((counts == k).mean()), 3) for k in range(counts.max() + 1)})
    print("  mimics drawn:", kinds)


def cases(n: int) -> None:
    from maml.synthetic import make_case

    make_case(0, "tiny")  # imports and first-call costs
    seconds, voxels = [], []
    for seed in range(1000, 1000 + n):
        start = time.perf_counter()
        case = make_case(seed, "demo")
        seconds.append(time.perf_counter() - start)
        voxels.append(np.prod(case.images["venous"].GetSize()))
        spacing = case.images["venous"].GetSpacing()
        print(f"  case {seed}: {seconds[-1]:5.2f} s, {case.images['venous'].GetSize()}, "
              f"{spacing[0]:.2f} x {spacing[2]:.2f} mm, {len(case.tumors)} tumors, {len(case.info['mimics'])} mimics")
    print(f"demo cases: {np.mean(seconds):.2f} s per case (median {np.median(seconds):.2f}), "
          f"{np.mean(voxels) / 1e6:.2f} M voxels per case on average")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--cases", type=int, default=6)
    args = parser.parse_args()
    draws(args.draws)
    if args.cases:
        cases(args.cases)


if __name__ == "__main__":
    main()
