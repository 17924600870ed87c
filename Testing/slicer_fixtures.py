"""A real MRML scene with Slicer's module logics, without the Slicer application (slicer-core).

Imported by the ``test_slicer_*`` tests (not a conftest, so others keep conftest.py free)::

    from slicer_fixtures import scene, make_volume_node, node_count  # noqa: F401  (pytest fixture)

What the fixture sets up is what Slicer's application does at start-up for the logics this
extension uses: the application logic with a colour logic (default colour nodes), and the Volumes,
Segmentations, Transforms and Tables module logics registered on it. ``slicer.mrmlScene`` points at
the scene for the ``slicer.util`` helpers that look it up.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "MAMLSegmentation"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import vtk  # noqa: E402

import slicer  # noqa: E402

_silenced = False


def _silence_vtk() -> None:
    global _silenced
    if _silenced:
        return
    window = vtk.vtkStringOutputWindow()
    vtk.vtkOutputWindow.SetInstance(window)
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
    _silenced = True


def make_scene():
    """Scene + application logic + the module logics MAMLSegmentationLib relies on."""
    from MAMLSegmentationLib.rendering import makeHeadlessScene

    _silence_vtk()
    return makeHeadlessScene()


@pytest.fixture
def scene():
    scene, app, logics = make_scene()
    scene._test_keepalive = (app, logics)  # keep the logics alive as long as the scene
    yield scene
    scene.Clear(True)
    if getattr(slicer, "mrmlScene", None) is scene:
        del slicer.mrmlScene


def node_count(scene) -> int:
    return scene.GetNumberOfNodes()


def ijk_to_ras(spacing_xyz, origin_ras, direction_ras=None) -> np.ndarray:
    """4x4 IJK-to-RAS matrix from spacing (x, y, z), origin (RAS) and a 3x3 direction (RAS)."""
    direction = np.eye(3) if direction_ras is None else np.asarray(direction_ras, float)
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(spacing_xyz)
    matrix[:3, 3] = origin_ras
    return matrix


def make_volume_node(scene, array_kji, matrix=None, name="volume", class_name="vtkMRMLScalarVolumeNode"):
    """A volume node in ``scene`` holding a copy of ``array_kji`` with the given IJK-to-RAS."""
    node = scene.AddNewNodeByClass(class_name, name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array_kji))
    if matrix is not None:
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(matrix, float)))
    node.CreateDefaultDisplayNodes()
    return node


def oblique_direction(degrees_z=20.0, degrees_x=10.0) -> np.ndarray:
    a, b = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def process_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (read from /proc)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
