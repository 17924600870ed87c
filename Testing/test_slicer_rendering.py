"""Offscreen slice-view rendering with Slicer's own slice logic (MAMLSegmentationLib.rendering).

A small scene: a uniform CT block, the engine-style results (liver + tumor segmentation and an
attention heatmap with the module's inferno colour map) imported with the Lib, rendered in an axial
view; pixels where each thing lies must show its colour. Needs an offscreen OpenGL (Mesa EGL:
Debian libegl1 libegl-mesa0 libgbm1 libgl1-mesa-dri); skipped with the reason when there is none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from maml.config import LIVER_LABELS
from slicer_fixtures import make_volume_node, scene  # noqa: F401  (scene: pytest fixture)

from MAMLSegmentationLib.rendering import (SliceViewRenderer, composeScreenshot, ctWindowLevel,
                                           offscreenRenderingAvailable, readPNG, writePNG)
from MAMLSegmentationLib.results import EngineOutput, importEngineOutput

AVAILABLE, WHY = offscreenRenderingAvailable()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"no offscreen rendering here: {WHY}")

CT_HU = 40.0            # W400 L50 -> grey (40 + 150) / 400 * 255 = 121
GREY = (CT_HU + 150.0) / 400.0 * 255.0


def results_case(scene):
    """CT 64x64x8 (1 mm, identity), liver block, tumor inside it, heatmap hot spot elsewhere."""
    ct = np.full((8, 64, 64), CT_HU, np.int16)
    labels = np.zeros(ct.shape, np.uint8)
    labels[:, 4:28, 8:56] = 1            # liver: j 4..27 (posterior half, lower on screen)
    labels[:, 12:20, 28:36] = 2          # tumor in the middle of the liver
    heat = np.zeros(ct.shape, np.float32)
    heat[:, 40:56, 24:40] = 1.0          # attention hot spot: j 40..55 (anterior, upper on screen)
    node = make_volume_node(scene, ct, None, "ct")
    ctWindowLevel(node)
    labelImage = sitk.GetImageFromArray(labels)
    labelImage.SetOrigin((-0.0, -0.0, 0.0))
    # identity IJK-to-RAS in Slicer = LPS direction diag(-1, -1, 1) for SimpleITK
    labelImage.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    heatImage = sitk.GetImageFromArray(heat)
    heatImage.CopyInformation(labelImage)
    imported = importEngineOutput(scene, EngineOutput(Path("."), labelImage, {"venous": heatImage}), {}, "venous")
    return node, imported


def pixel_of(view, ijk) -> tuple:
    """(row, column) of a voxel centre (identity IJK-to-RAS) in the rendered picture."""
    xyToRAS = np.array([[view.sliceNode.GetXYToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])
    x, y, _, _ = np.linalg.inv(xyToRAS) @ np.array([*map(float, ijk), 1.0])
    return int(round(view.height - 1 - y)), int(round(x))


def test_slice_view_shows_ct_segment_fill_and_heatmap_in_their_colours(scene, tmp_path):
    ct, imported = results_case(scene)
    view = SliceViewRenderer(scene, None, 256, 256)
    view.setLayers(background=ct, foreground=imported.heatmaps["venous"], foregroundOpacity=0.4)
    view.showSegmentation(imported.segmentation, fill=True, outline=True, fillOpacity=0.5)
    view.setSliceCenterRAS((32.0, 32.0, 4.0))
    rgb = view.render()
    assert rgb.shape == (256, 256, 3)
    path = writePNG(rgb, tmp_path / "view.png")
    picture = readPNG(path)[..., :3].astype(float)
    np.testing.assert_array_equal(picture, rgb)

    def colour(ijk):
        row, column = pixel_of(view, ijk)
        return picture[row - 1:row + 2, column - 1:column + 2].reshape(-1, 3).mean(0)

    plain = colour((32, 34, 4))            # CT only, between liver and hot spot
    np.testing.assert_allclose(plain, GREY, atol=6)
    liver_rgb, tumor_rgb = (255 * np.array(LIVER_LABELS[v].color) for v in (1, 2))  # the engine's colours
    liver = colour((14, 16, 4))            # liver fill (219, 145, 102) over grey
    assert liver[0] > liver[1] + 15 > liver[2] + 15, liver
    np.testing.assert_allclose(liver, 0.5 * GREY + 0.5 * liver_rgb, atol=12)
    tumor = colour((32, 16, 4))            # tumor fill (222, 77, 66): red dominates
    assert tumor[0] > tumor[1] + 30 and tumor[0] > tumor[2] + 30, tumor
    np.testing.assert_allclose(tumor, 0.5 * GREY + 0.5 * tumor_rgb, atol=12)
    hot = colour((32, 48, 4))              # inferno at 1 (252, 255, 164) at 0.4 over grey
    np.testing.assert_allclose(hot, 0.6 * GREY + 0.4 * np.array([252, 255, 164]), atol=12)
    cold = colour((10, 48, 4))             # heatmap 0 there: below its threshold, transparent
    np.testing.assert_allclose(cold, GREY, atol=6)
    # The liver outline is drawn at the edge in the liver colour, full opacity.
    row, column = pixel_of(view, (8, 16, 4))
    edge = picture[row - 3:row + 4, column - 3:column + 4].reshape(-1, 3)
    assert any(np.abs(p - liver_rgb).max() < 30 for p in edge)

    # Two more views of the same scene side by side with the legend strip: the panels are kept as is.
    second = SliceViewRenderer(scene, None, 256, 256)
    second.setLayers(background=ct)
    second.setSliceCenterRAS((32.0, 32.0, 4.0))
    plainView = second.render()
    np.testing.assert_allclose(plainView[pixel_of(second, (32, 48, 4))], GREY, atol=6)  # no heatmap, no seg
    colorNode = imported.heatmaps["venous"].GetDisplayNode().GetColorNode()
    figure = composeScreenshot([rgb, plainView], {"Liver": LIVER_LABELS[1].color}, colorNode, "note")
    assert figure.shape[1] == 256 * 2 + 4 and figure.shape[0] > 256
    np.testing.assert_array_equal(figure[:256, :256], rgb)
    np.testing.assert_array_equal(figure[:256, 260:], plainView)
    view.close()
    second.close()
    assert scene.GetNumberOfNodesByClass("vtkMRMLSliceNode") == 0
