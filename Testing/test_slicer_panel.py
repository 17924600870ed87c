"""The panel's behaviour that lives in the Lib (slicer-core) and the order of things in the widget
(MAMLSegmentation.py, read with ast as test_slicer_ui does: it imports the Slicer application)."""

from __future__ import annotations

import ast
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from slicer_fixtures import make_volume_node, scene  # noqa: F401  (scene: pytest fixture)

from MAMLSegmentationLib.install import missingEngineDependencies
from MAMLSegmentationLib.phases import guessPhaseVolumes, phaseHint, phaseVolumeCandidates

MODULE_FILE = Path(__file__).resolve().parents[1] / "MAMLSegmentation" / "MAMLSegmentation.py"


def volume(scene, name, class_name="vtkMRMLScalarVolumeNode"):
    return make_volume_node(scene, np.zeros((2, 3, 4), np.int16), name=name, class_name=class_name)


@pytest.mark.parametrize("text,phase", [
    ("phantom_arterial", "arterial"), ("phantom_venous", "venous"), ("3: ABD ART 1.0 B30f", "arterial"),
    ("Late arterial", "arterial"), ("AP 2mm", "arterial"), ("4: PV 70s", "venous"), ("Portal venous", "venous"),
    ("ven", "venous"), ("Abdomen PVP", "venous"), ("arterial to venous", None), ("CT 5mm", None),
    ("Seven", None), ("heart", None)])
def test_phase_hint_from_names(text, phase):
    assert phaseHint(text) == phase


def test_sample_phantom_fills_both_selectors_with_different_volumes(scene):
    """After loading the MAMLPhantom sample (arterial first in the scene) the venous selector gets
    the venous volume, not the scene's first volume."""
    arterial, venous = volume(scene, "phantom_arterial"), volume(scene, "phantom_venous")
    guess = guessPhaseVolumes(phaseVolumeCandidates(scene), {"arterial": None, "venous": None})
    assert guess == {"arterial": arterial, "venous": venous}


def test_dicom_series_description_and_never_one_volume_for_both(scene):
    a, b = volume(scene, "5: Abdomen 1.0"), volume(scene, "6: Abdomen 1.0")
    for node, uid in ((a, "1.2.3.1"), (b, "1.2.3.2")):
        node.SetAttribute("DICOM.instanceUIDs", f"{uid}.1 {uid}.2")
    descriptions = {"1.2.3.1.1": "Late arterial phase", "1.2.3.2.1": "Portal venous 70s"}
    # slicer-core has no DICOM database: the lookup its instanceValue would answer
    lookup = lambda uid, tag: descriptions[uid] if tag == "0008,103e" else ""  # noqa: E731
    assert guessPhaseVolumes([a, b], {}, lookup) == {"arterial": a, "venous": b}
    # one volume hinting at both phases, or two at one phase: no guess, never the same node twice
    both = volume(scene, "arterial_to_venous")
    assert phaseHint(both.GetName()) is None and guessPhaseVolumes([both, a], {}) == {}
    v1, v2 = volume(scene, "venous 1"), volume(scene, "venous 2")
    assert guessPhaseVolumes([v1, v2], {}) == {}
    # what the user chose is kept, and the chosen node is not offered for the other phase
    guess = guessPhaseVolumes([a, b], {"venous": a}, lookup)
    assert guess == {} and guessPhaseVolumes([a, b], {"arterial": b}, lookup) == {}
    only = volume(scene, "CT")
    assert guessPhaseVolumes([only], {}) == {"venous": only}  # a lone volume: the reference phase


def test_attention_maps_and_label_maps_are_not_phase_candidates(scene):
    phase = volume(scene, "phantom_venous")
    heat = volume(scene, "MAML attention venous")
    heat.SetAttribute("MAMLSegmentation.phase", "venous")
    labels = volume(scene, "venous labels", "vtkMRMLLabelMapVolumeNode")
    assert phaseVolumeCandidates(scene) == [phase]
    assert heat not in guessPhaseVolumes(phaseVolumeCandidates(scene), {}).values()
    assert labels not in phaseVolumeCandidates(scene)


def _method(name: str, cls: str) -> ast.FunctionDef:
    tree = ast.parse(MODULE_FILE.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return item
    raise AssertionError(f"{cls}.{name} not found")


def test_widget_connects_its_slots_after_connect_gui():
    setup = _method("setup", "MAMLSegmentationWidget")
    calls = [ast.unparse(n.func) for n in ast.walk(setup) if isinstance(n, ast.Call)]
    lines = {ast.unparse(n.func): n.lineno for n in ast.walk(setup) if isinstance(n, ast.Call)}
    connects = [n.lineno for n in ast.walk(setup) if isinstance(n, ast.Call)
                and ast.unparse(n.func).startswith("self.ui.") and ast.unparse(n.func).endswith(".connect")]
    assert connects and "self.initializeParameterNode" in calls
    assert lines["self.initializeParameterNode"] < min(connects)
    # initializeParameterNode is what calls connectGui
    init = ast.unparse(_method("setParameterNode", "MAMLSegmentationWidget"))
    assert "connectGui(self.ui)" in init
    assert "guessPhaseVolumes" in ast.unparse(_method("initializeParameterNode", "MAMLSegmentationWidget"))


def test_install_passes_pip_install_a_list_through_the_lib():
    source = ast.unparse(ast.parse(MODULE_FILE.read_text()))
    assert "install.installMissing(slicer.util.pip_install" in source
    assert "pipInstallArguments" not in source and "pip_install(arguments)" not in source


def test_reload_and_test_skips_cleanly_without_torch():
    assert missingEngineDependencies() == []  # this environment runs the engine
    def only_scipy(name):  # a Python with SciPy (Slicer bundles it) and nothing else of ours
        if name != "scipy":
            raise metadata.PackageNotFoundError(name)
        return "1.13.0"

    missing = missingEngineDependencies(findSpec=lambda name: None, version=only_scipy)
    assert missing == ["torch (the PyTorch extension)"]  # registration needs only Slicer's SimpleITK
    def nothing(name):
        raise metadata.PackageNotFoundError(name)

    missing = missingEngineDependencies(findSpec=lambda name: None, version=nothing)
    assert missing[1:] == ["scipy>=1.10 (scipy is not installed)"]
    run = ast.unparse(_method("runTest", "MAMLSegmentationTest"))
    assert run.index("missingDependenciesMessage") < run.index("self.test_SegmentSamplePhantom()")
    assert "return" in run.split("self.test_SegmentSamplePhantom()")[0]
    case = ast.unparse(_method("test_SegmentSamplePhantom", "MAMLSegmentationTest"))
    assert case.index("self.skipTest(message)") < case.index("import SampleData")
    message = ast.unparse(_method("missingDependenciesMessage", "MAMLSegmentationTest"))
    assert "missingEngineDependencies" in message and "skipped" in message
