"""A stand-in for ``python -m maml.cli`` speaking the same command line and ``--json-progress`` protocol.

Used by test_slicer_logic.py where exact expectations matter: its "segmentation" is a threshold of
the reference phase (liver: >= 100, tumor: >= 200) and its "registration" a known rigid motion, so
the node import can be checked voxel for voxel on oblique grids; it can also run slowly with a
child process (deterministic cancel test) or write unreadable transforms (roll-back test). It is a
real process writing real, valid files. The real engine is run in test_slicer_engine.py.

Behaviour switches (environment): FAKE_ENGINE_DELAY (seconds to sleep in "inference"),
FAKE_ENGINE_CHILD_PID_FILE (start a child process and write its pid there), FAKE_ENGINE_FAIL
(fail with that message), FAKE_ENGINE_BAD_TRANSFORM (write unreadable transform files),
FAKE_ENGINE_TRANSLATION (x,y,z in LPS mm of the rigid "registration").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

LABELS = [
    {"value": 0, "name": "background", "color": [0, 0, 0]},
    {"value": 1, "name": "liver", "color": [221, 130, 101]},
    {"value": 2, "name": "tumor", "color": [144, 238, 144]},
]


def progress(enabled, step, fraction, message=""):
    if enabled:
        print(json.dumps({"step": step, "fraction": fraction, "message": message}), flush=True)


def fake_transform(reference: sitk.Image) -> sitk.Transform:
    translation = [float(v) for v in os.environ.get("FAKE_ENGINE_TRANSLATION", "2.0,-3.0,1.5").split(",")]
    transform = sitk.Euler3DTransform()
    transform.SetCenter(reference.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in reference.GetSize()]))
    transform.SetRotation(0.0, 0.0, 0.05)
    transform.SetTranslation(translation)
    return transform


def segment(args) -> int:
    json_progress = args.json_progress
    phases = dict(item.split("=", 1) for item in args.phase)
    if not phases:
        progress(json_progress, "error", 1.0, "no phases given")
        print("maml segment: error: no phases given", file=sys.stderr)
        return 1
    progress(json_progress, "read", 0.0, f"reading {', '.join(phases)}")
    images = {phase: sitk.ReadImage(path) for phase, path in phases.items()}
    reference_phase = args.reference or ("venous" if "venous" in phases else next(iter(phases)))
    reference = images[reference_phase]
    out = Path(args.out)
    tmp = out.parent / (out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    registration = {}
    registered = {reference_phase: reference}
    for phase, image in images.items():
        if phase == reference_phase:
            continue
        progress(json_progress, "register", 0.2, f"registering {phase} onto {reference_phase}")
        if args.register != "none":
            transform = fake_transform(reference)
            sitk.WriteTransform(transform, str(tmp / f"transform_{phase}.h5"))
        else:
            transform = sitk.Transform(3, sitk.sitkIdentity)
        registered[phase] = sitk.Resample(image, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        sitk.WriteImage(registered[phase], str(tmp / f"{phase}_registered.nii.gz"))
        registration[phase] = {"preset": args.register, "metric_before": -0.5, "metric_after": -0.9}

    if os.environ.get("FAKE_ENGINE_CHILD_PID_FILE"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path(os.environ["FAKE_ENGINE_CHILD_PID_FILE"]).write_text(str(child.pid))
    delay = float(os.environ.get("FAKE_ENGINE_DELAY", "0"))
    steps = 10
    for i in range(steps):
        progress(json_progress, "inference", 0.3 + 0.5 * i / steps, f"window {i + 1}/{steps}")
        time.sleep(delay / steps)
    if os.environ.get("FAKE_ENGINE_FAIL"):
        message = os.environ["FAKE_ENGINE_FAIL"]
        progress(json_progress, "error", 1.0, message)
        print(f"maml segment: error: {message}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
        return 1

    array = sitk.GetArrayFromImage(reference).astype(np.float32)
    labels = np.zeros(array.shape, np.uint8)
    labels[array >= 100] = 1
    labels[array >= 200] = 2
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(reference)
    sitk.WriteImage(label_image, str(tmp / "segmentation.nii.gz"))
    if len(images) > 1:
        for phase, image in registered.items():
            att = np.clip(sitk.GetArrayFromImage(image).astype(np.float32) / 300.0, 0, 1)
            att_image = sitk.GetImageFromArray(att)
            att_image.CopyInformation(reference)
            sitk.WriteImage(att_image, str(tmp / f"attention_{phase}.nii.gz"))

    progress(json_progress, "stats", 0.9, "statistics")
    voxel_ml = float(np.prod(reference.GetSpacing())) / 1000.0
    components = sitk.ConnectedComponent(label_image == 2)
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.ComputeFeretDiameterOn()
    shape.Execute(components)
    tumors = [{"id": int(i), "volume_ml": shape.GetNumberOfPixels(i) * voxel_ml,
               "diameter_mm": shape.GetFeretDiameter(i), "centroid_lps": list(shape.GetCentroid(i))}
              for i in shape.GetLabels()]
    # The engine's own enhancement measure (tumors numbered by decreasing size, as the engine does).
    from maml.stats import tumor_enhancement

    tumors.sort(key=lambda t: -t["volume_ml"])
    for number, (tumor, entry) in enumerate(zip(tumors, tumor_enhancement(label_image, registered)), 1):
        tumor["id"] = number
        tumor["enhancement"] = entry
    liver_ml = float((labels >= 1).sum()) * voxel_ml
    stats = {
        "tumor_count": len(tumors), "tumors": tumors, "liver_volume_ml": liver_ml,
        "tumor_burden": sum(t["volume_ml"] for t in tumors) / liver_ml if liver_ml else 0.0,
        "registration": registration, "timings": {"total_s": 0.1}, "device": "cpu",
        "model": {"name": "fake", "sha256": "0" * 64, "labels": LABELS, "phases": sorted(phases)},
    }
    if len(images) > 1:  # the engine's display window inside the liver
        from maml.attention import attention_windows

        stats["attention_window"] = attention_windows(
            {phase: sitk.ReadImage(str(tmp / f"attention_{phase}.nii.gz")) for phase in registered}, label_image)
    (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
    if os.environ.get("FAKE_ENGINE_BAD_TRANSFORM"):
        for path in tmp.glob("transform_*.h5"):
            path.write_bytes(b"not an HDF5 file")
    overview = sitk.GetImageFromArray(np.zeros((8, 8), np.uint8))
    sitk.WriteImage(overview, str(tmp / "overview.png"))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    progress(json_progress, "done", 1.0, f"{len(tumors)} tumor(s)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="maml")
    sub = parser.add_subparsers(dest="command", required=True)
    seg = sub.add_parser("segment")
    seg.add_argument("--phase", action="append", default=[])
    seg.add_argument("--out", required=True)
    seg.add_argument("--model")
    seg.add_argument("--register", default="deformable", choices=["none", "rigid", "affine", "deformable"])
    seg.add_argument("--reference")
    seg.add_argument("--device", default="auto")
    seg.add_argument("--json-progress", action="store_true")
    seg.add_argument("--no-overview", action="store_true")
    seg.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino"])
    seg.add_argument("--accept-out-of-distribution", action="store_true")
    seg.add_argument("--no-postprocessing", action="store_true")
    args = parser.parse_args(argv)
    return segment(args)


if __name__ == "__main__":
    sys.exit(main())
