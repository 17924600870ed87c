"""Regenerate the extension's screenshot (Resources/Screenshots/MAMLSegmentation-1.png).

Runs the real engine on the bundled sample case through the module's logic (as the Segment
button does), then renders three Slicer slice views offscreen with Slicer's own slice logic
(slicer-core), in the axial plane through the largest tumor:

  1. venous phase (W400 L50) with the MAML segmentation (liver and tumor, fill + outline);
  2. arterial phase (with its registration transform) with the arterial attention map (inferno);
  3. venous phase with the venous attention map.

Usage (from the repository root)::

    .venv/bin/python benchmarks/render_screenshot.py                 # bundled demo model
    .venv/bin/python benchmarks/render_screenshot.py --model M.pt    # another checkpoint
    .venv/bin/python benchmarks/render_screenshot.py --results DIR   # re-render a kept engine output

Needs an offscreen OpenGL (Debian: libegl1 libegl-mesa0 libgbm1 libgl1-mesa-dri).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MAMLSegmentation"))

import numpy as np  # noqa: E402
import slicer  # noqa: E402

from MAMLSegmentationLib import MAMLSegmentationLogic  # noqa: E402
from MAMLSegmentationLib.rendering import (SliceViewRenderer, composeScreenshot, ctWindowLevel,  # noqa: E402
                                           loadVolumeNode, makeHeadlessScene, offscreenRenderingAvailable,
                                           writePNG)
from MAMLSegmentationLib.results import importEngineOutput, readEngineOutput  # noqa: E402

SAMPLE = REPO / "MAMLSegmentation" / "Resources" / "SampleData"
DEFAULT_OUT = REPO / "Resources" / "Screenshots" / "MAMLSegmentation-1.png"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: the bundled demo model / $MAML_MODEL)")
    parser.add_argument("--register", default="deformable", choices=("none", "rigid", "affine", "deformable"))
    parser.add_argument("--results", type=Path, help="use this engine output folder instead of running the engine")
    parser.add_argument("--keep", type=Path, help="keep the engine output in this folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--size", type=int, default=560, help="pixels per view (square)")
    parser.add_argument("--opacity", type=float, default=0.4, help="heatmap opacity")
    args = parser.parse_args(argv)

    ok, why = offscreenRenderingAvailable()
    if not ok:
        print(f"render_screenshot: error: {why}", file=sys.stderr)
        return 1
    scene, app, logics = makeHeadlessScene()
    arterial = loadVolumeNode(scene, SAMPLE / "phantom_arterial.nrrd", "phantom_arterial")
    venous = loadVolumeNode(scene, SAMPLE / "phantom_venous.nrrd", "phantom_venous")
    phases = {"arterial": arterial, "venous": venous}
    started = time.perf_counter()
    if args.results:
        output = readEngineOutput(args.results)
        nodes = importEngineOutput(scene, output, phases, output.stats.get("reference_phase", "venous"))
        segmentation, heatmaps, stats = nodes.segmentation, nodes.heatmaps, output.stats
    else:
        result = MAMLSegmentationLogic(pythonExecutable=sys.executable).segment(
            phases, model=args.model, registration=args.register, outputDirectory=args.keep)
        segmentation, heatmaps, stats = result.segmentationNode, result.heatmapNodes, result.stats
    print(f"engine: {time.perf_counter() - started:.1f} s, model {stats['model']['name']} "
          f"({Path(stats['model'].get('path') or '?').name}), {stats['tumor_count']} tumor(s)")

    for node in (arterial, venous):
        ctWindowLevel(node)
    # Attention display window: the engine's, inside the liver (stats.json attention_window, as the
    # module shows it; computed the same way for an older output); lower values are transparent.
    liverMask = exportedLiverMask(segmentation, venous)
    windows = {}
    for phase, heat in heatmaps.items():
        window = (stats.get("attention_window") or {}).get(phase)
        if window is None:
            from maml.attention import display_window

            window = display_window(slicer.util.arrayFromVolume(heat), liverMask)
        low, high = (float(v) for v in window)
        display = heat.GetDisplayNode()
        display.SetWindowLevelMinMax(low, high)
        display.SetLowerThreshold(low)
        windows[phase] = (low, high)
    tumors = sorted(stats.get("tumors", []), key=lambda t: -t["volume_ml"])
    if tumors:
        lps = tumors[0]["centroid_lps"]
        center = [-lps[0], -lps[1], lps[2]]
    else:  # no tumor found: the middle of the liver's extent
        bounds = [0.0] * 6
        segmentation.GetRASBounds(bounds)
        center = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]

    panels = []
    specs = [
        ("venous", None, "Venous phase + MAML segmentation", True),
        ("arterial", "arterial", "Arterial phase + attention (arterial)", False),
        ("venous", "venous", "Venous phase + attention (venous)", False),
    ]
    for background, heatmapPhase, title, fill in specs:
        view = SliceViewRenderer(scene, app, args.size, args.size)
        heatmap = heatmaps.get(heatmapPhase) if heatmapPhase else None
        view.setLayers(background=phases[background], foreground=heatmap,
                       foregroundOpacity=args.opacity if heatmap is not None else 0.0)
        view.showSegmentation(segmentation, fill=fill, outline=True, fillOpacity=0.35,
                              outlineThickness=2 if fill else 1)
        view.setSliceCenterRAS(center)
        view.zoom(1.25)
        view.addText(title, 10, 8, size=17, bold=True)
        footer = ""
        if heatmapPhase is None and tumors:
            t = tumors[0]
            footer = (f"{stats['tumor_count']} tumor(s); largest {t['volume_ml']:.1f} mL, "
                      f"{t.get('axial_diameter_mm', t['diameter_mm']):.0f} mm axial")
            enhancement = enhancementText(t)
            if enhancement:
                view.addText(enhancement, 10, 30, size=13, top=False)
        elif heatmap is not None:
            low, high = windows[heatmapPhase]
            footer = (f"MA attention A_{heatmapPhase}: {low:.2f} (transparent) to {high:.2f}, "
                      f"opacity {args.opacity:.1f}")
        if footer:
            view.addText(footer, 10, 8, size=14, top=False)
        view.addText("R", 8, args.size // 2, size=14, color=(0.9, 0.9, 0.5))
        view.addText("L", args.size - 8, args.size // 2, size=14, color=(0.9, 0.9, 0.5), alignRight=True)
        panels.append(view.render())
        view.close()

    legend = {"Liver": segmentSwatch(segmentation, "Liver"), "Liver tumor": segmentSwatch(segmentation, "Liver tumor")}
    note = (f"MAMLSegmentation - synthetic phantom (bundled sample), model {stats['model']['name']}, "
            f"{stats['registration']['preset']} registration. Research use only, not for clinical use.")
    colorNode = next(iter(heatmaps.values())).GetDisplayNode().GetColorNode() if heatmaps else None
    picture = composeScreenshot(panels, legend, colorNode, note)
    writePNG(picture, args.out)
    print(f"wrote {args.out} ({picture.shape[1]}x{picture.shape[0]})")
    scene.Clear(True)
    return 0


def enhancementText(tumor: dict) -> str:
    """The tumor table's enhancement columns of one tumor, on one line."""
    e = tumor.get("enhancement")
    if not e:
        return ""
    contrast = ", ".join(f"{phase[:3]} {value:+.0f}" for phase, value in e["contrast_hu"].items() if value is not None)
    flags = ", ".join(f"{name} {'yes' if e[key] else 'no'}" for name, key in
                      (("APHE", "aphe"), ("washout", "washout"), ("capsule", "capsule")) if e[key] is not None)
    return f"vs liver (HU): {contrast}; {flags}"


def exportedLiverMask(segmentationNode, referenceNode) -> np.ndarray:
    """Voxels of any segment (liver incl. tumor) on the reference volume's grid."""
    scene = segmentationNode.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask")
    slicer.vtkSlicerSegmentationsModuleLogic.ExportVisibleSegmentsToLabelmapNode(segmentationNode, labelmap,
                                                                                 referenceNode)
    mask = slicer.util.arrayFromVolume(labelmap) > 0
    scene.RemoveNode(labelmap)
    return mask


def segmentSwatch(segmentationNode, name):
    segmentation = segmentationNode.GetSegmentation()
    segmentId = segmentation.GetSegmentIdBySegmentName(name)
    return tuple(segmentation.GetSegment(segmentId).GetColor()) if segmentId else None


if __name__ == "__main__":
    sys.exit(main())
