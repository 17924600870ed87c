"""Stripe ratio of the attention maps on the bundled sample case (and optional phantoms).

    PYTHONPATH=MAMLSegmentation python benchmarks/stripe_ratio.py [--phantom SEED ...]

The arterial phase is put on the venous grid with the sample's known transform (no registration, so
the figure depends on the network and inference alone); the bundled demo model segments; the ratio
(period-2 curvature along x over that along y, maml.attention.stripe_ratio) is printed per phase
over the body (venous >= -500 HU) and over the predicted liver (liver + tumor).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "MAMLSegmentation" / "Resources" / "SampleData"


def sample_case() -> dict:
    venous = sitk.ReadImage(str(SAMPLE / "phantom_venous.nrrd"))
    arterial = sitk.ReadImage(str(SAMPLE / "phantom_arterial.nrrd"))
    transform = sitk.ReadTransform(str(SAMPLE / "phantom_arterial_to_venous.tfm"))
    return {"arterial": sitk.Resample(arterial, venous, transform, sitk.sitkLinear, -1000.0, sitk.sitkFloat32),
            "venous": venous}


def phantom_case(seed: int) -> dict:
    from maml.synthetic import make_case

    case = make_case(seed)
    venous = case.images["venous"]
    return {"arterial": sitk.Resample(case.images["arterial"], venous, case.arterial_to_venous, sitk.sitkLinear,
                                      -1000.0, sitk.sitkFloat32), "venous": venous}


def measure(images: dict, model) -> dict:
    from maml.attention import stripe_ratio
    from maml.inference import predict_case
    from maml.pipeline import mask_attention_outside_body
    from maml.preprocessing import BODY_HU

    prediction = predict_case(model, images, device="cpu")
    attention = mask_attention_outside_body(prediction.attention, images["venous"], model.config)
    body = sitk.GetArrayFromImage(images["venous"]) >= BODY_HU
    liver = sitk.GetArrayFromImage(prediction.labels) > 0
    result = {}
    for phase, image in attention.items():
        values = sitk.GetArrayFromImage(image)
        result[phase] = {"body": round(stripe_ratio(values, body), 3), "liver": round(stripe_ratio(values, liver), 3)}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantom", type=int, action="append", default=[], help="also a demo phantom of this seed")
    parser.add_argument("--model", default=str(ROOT / "MAMLSegmentation/Resources/Models/maml_liver_demo.pt"))
    parser.add_argument("--without", action="append", default=[], choices=("align", "antialias"),
                        help="measure with a fix switched off (to see what each one does)")
    args = parser.parse_args(argv)
    import maml.inference
    from maml.model import load_model

    if "antialias" in args.without:
        maml.inference._antialiased = lambda heatmap, case, config: heatmap
    if "align" in args.without:
        original = maml.inference.SlidingWindowOptions

        def unaligned(*a, **k):
            k["align"] = (1, 1, 1)
            return original(*a, **k)

        maml.inference.SlidingWindowOptions = unaligned

    model = load_model(args.model, "cpu")
    report = {"sample": measure(sample_case(), model)}
    for seed in args.phantom:
        report[f"phantom {seed}"] = measure(phantom_case(seed), model)
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
