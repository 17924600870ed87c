"""Static and Qt-loader checks of the module's panel (MAMLSegmentation.ui) and its Python side.

MAMLSegmentation.py imports qt/ctk/slicer.app and cannot be imported here, so it is read with ast.
The .ui is loaded with PySide6's QUiLoader offscreen (Qt's form builder, what slicer.util.loadUI
uses), with a placeholder subclass per custom widget so the real class names are kept.
"""

from __future__ import annotations

import ast
import keyword
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

REPO = Path(__file__).resolve().parents[1]
UI_FILE = REPO / "MAMLSegmentation" / "Resources" / "UI" / "MAMLSegmentation.ui"
MODULE_FILE = REPO / "MAMLSegmentation" / "MAMLSegmentation.py"
WRAPPER_CLASS = "MAMLSegmentationParameterNode"

# Which widget class can carry which parameter type (Slicer's parameterNodeWrapper GUI connectors).
CONNECTORS = {
    "qMRMLNodeComboBox": lambda t: t.startswith("vtkMRML"),
    "QComboBox": lambda t: t.startswith("Annotated[str, Choice("),
    "ctkSliderWidget": lambda t: t.startswith("Annotated[float, WithinRange("),
    "ctkPathLineEdit": lambda t: t in ("pathlib.Path", "Path"),
    "QCheckBox": lambda t: t == "bool",
    "QLineEdit": lambda t: t == "str",
}


@pytest.fixture(scope="module")
def tree():
    return ET.parse(UI_FILE)


@pytest.fixture(scope="module")
def module_ast():
    return ast.parse(MODULE_FILE.read_text(), filename=str(MODULE_FILE))


def ui_widgets(tree) -> dict:
    return {w.get("name"): w.get("class") for w in tree.iter("widget")}


def parameter_fields(module_ast) -> dict:
    for node in ast.walk(module_ast):
        if isinstance(node, ast.ClassDef) and node.name == WRAPPER_CLASS:
            assert any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list)
            return {s.target.id: (ast.unparse(s.annotation), s.value) for s in node.body
                    if isinstance(s, ast.AnnAssign)}
    raise AssertionError(f"{WRAPPER_CLASS} not found in {MODULE_FILE.name}")


def parameter_names(tree) -> dict:
    names = {}
    for widget in tree.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", f"{widget.get('name')}: SlicerParameterName needs stdset=\"0\""
                names[widget.get("name")] = prop.find("string").text
    return names


def test_ui_is_valid_designer_xml(tree):
    root = tree.getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and root.find("class").text == top.get("name")
    names = [w.get("name") for w in root.iter() if w.tag in ("widget", "layout", "spacer")]
    assert len(names) == len(set(names)), "duplicate object names"
    for name in names:
        assert name.isidentifier() and not keyword.iskeyword(name), name
    custom = {c.find("class").text: c.find("extends").text for c in root.iter("customwidget")}
    from PySide6 import QtWidgets

    for cls in {w.get("class") for w in root.iter("widget")}:
        assert cls in custom or hasattr(QtWidgets, cls), f"class {cls} is neither Qt nor declared"
    for cls, base in custom.items():
        chain = [cls]
        while base in custom:
            chain.append(base)
            base = custom[base]
            assert len(chain) < 10, f"cyclic <extends> of {cls}"
        assert hasattr(QtWidgets, base), f"{cls} extends unknown {base}"
    widgets = ui_widgets(tree)
    for connection in root.iter("connection"):
        assert connection.find("sender").text in widgets
        assert connection.find("receiver").text in widgets
    mrml = [n for n, c in widgets.items() if c in ("qMRMLNodeComboBox", "qMRMLTableView")]
    receivers = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    assert set(mrml) == receivers, "every MRML widget must get the scene"


def test_ui_loads_with_qt_form_builder_without_unexpected_warnings(tree):
    from PySide6 import QtCore, QtWidgets
    from PySide6.QtUiTools import QUiLoader

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    messages = []

    def handler(mode, context, message):
        messages.append(message)

    previous = QtCore.qInstallMessageHandler(handler)
    try:
        loader = QUiLoader()
        custom = {c.find("class").text: c.find("extends").text for c in tree.getroot().iter("customwidget")}
        classes = {}

        def make(name):
            if name in classes:
                return classes[name]
            base = custom[name]
            base_cls = make(base) if base in custom else getattr(QtWidgets, base, QtWidgets.QWidget)
            classes[name] = type(name, (base_cls,), {})
            return classes[name]

        for name in custom:
            loader.registerCustomWidget(make(name))
        widget = loader.load(str(UI_FILE))
        assert widget is not None, loader.errorString()
        for name, cls in ui_widgets(tree).items():
            child = widget if name == widget.objectName() else widget.findChild(QtCore.QObject, name)
            assert child is not None, name
            assert child.metaObject().className() == cls, (name, child.metaObject().className())
        for name, parameter in parameter_names(tree).items():
            child = widget.findChild(QtCore.QObject, name)
            assert child.property("SlicerParameterName") == parameter
        # On a real Qt class, an unknown (misspelt) property silently becomes a dynamic property.
        for name, cls in ui_widgets(tree).items():
            if cls in custom:
                continue
            child = widget.findChild(QtCore.QObject, name)
            dynamic = {bytes(p).decode() for p in child.dynamicPropertyNames()}
            unknown = {p for p in dynamic if not p.startswith("_PySide") and p != "SlicerParameterName"}
            assert not unknown, f"{name} ({cls}): unknown properties {sorted(unknown)}"
        widget.deleteLater()
        app.processEvents()
    finally:
        QtCore.qInstallMessageHandler(previous)
    # Expected noise of QUiLoader without Slicer: placeholders lack the MRML signal/slot and CTK's set
    # types; everything else is a real mistake.
    mrml = "|".join(n for n, c in ui_widgets(tree).items() if c.startswith("qMRML") or c == "qMRMLWidget")
    expected = re.compile(r"defaulting to base class|:/Icons"
                          r"|No such (signal|slot) \w+::(mrmlSceneChanged|setMRMLScene)\(vtkMRMLScene\*\)"
                          rf"|\((sender|receiver) name:\s+'({mrml}|MAMLSegmentation)'\)"
                          r"|The set-type property filters could not be read")
    unexpected = [m for m in messages if not expected.search(m)]
    assert unexpected == [], "\n".join(unexpected)
    del classes


def test_every_self_ui_name_exists_in_the_ui(tree, module_ast):
    used = {node.attr for node in ast.walk(module_ast)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert used, "the module uses no self.ui widgets?"
    missing = used - set(ui_widgets(tree))
    assert not missing, f"self.ui names missing from the .ui: {sorted(missing)}"


def test_parameter_names_match_the_parameter_node_wrapper(tree, module_ast):
    fields = parameter_fields(module_ast)
    names = parameter_names(tree)
    assert sorted(names.values()) == sorted(fields), "SlicerParameterName set != wrapper fields"
    assert len(set(names.values())) == len(names), "one parameter bound to two widgets"
    widgets = ui_widgets(tree)
    for widget, parameter in names.items():
        annotation = fields[parameter][0]
        cls = widgets[widget]
        assert cls in CONNECTORS and CONNECTORS[cls](annotation), f"{widget} ({cls}) cannot hold {annotation}"


def test_choices_match_the_engine_options(module_ast):
    import sys

    sys.path.insert(0, str(REPO / "MAMLSegmentation"))
    from MAMLSegmentationLib import DEVICES, PHASES, REGISTRATION_PRESETS

    fields = parameter_fields(module_ast)

    def choices(name):
        annotation = ast.parse(fields[name][0], mode="eval").body
        call = annotation.slice.elts[1]
        return ast.literal_eval(call.args[0])

    assert tuple(choices("device")) == DEVICES  # the widget disables the "cuda" item by index
    from maml.backends import BACKENDS
    from MAMLSegmentationLib.logic import BACKENDS as LOGIC_BACKENDS

    assert tuple(choices("backend")) == BACKENDS == LOGIC_BACKENDS
    assert set(choices("registration")) <= set(REGISTRATION_PRESETS)
    # the overlay: a phase's attention map, or the uncertainty map
    assert set(choices("referencePhase")) == set(PHASES) == set(choices("heatmapPhase")) - {"uncertainty"}
    for name, (annotation, default) in fields.items():
        if annotation.startswith("Annotated[str, Choice(") and default is not None:
            assert ast.literal_eval(default) in choices(name), name


def test_module_uses_only_existing_lib_names(module_ast):
    import sys

    sys.path.insert(0, str(REPO / "MAMLSegmentation"))
    import MAMLSegmentationLib

    used = {node.attr for node in ast.walk(module_ast)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "lib"}
    assert used and not {name for name in used if not hasattr(MAMLSegmentationLib, name)}
    compile(MODULE_FILE.read_text(), str(MODULE_FILE), "exec")
    # Logic methods the widget calls exist on the Lib logic it inherits from.
    called = {node.func.attr for node in ast.walk(module_ast) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Attribute)
              and node.func.value.attr == "logic"}
    assert called and all(hasattr(MAMLSegmentationLib.MAMLSegmentationLogic, name) or name == "getParameterNode"
                          for name in called), called
