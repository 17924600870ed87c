"""Which loaded volume is the arterial phase and which the venous one, guessed from names.

The guess reads each scalar volume's name and, for a volume loaded from DICOM, its series
description (Slicer names such volumes "<series number>: <series description>" already; the DICOM
database is asked when it is there). A name hints at one phase when one of its words does:

- arterial: "art", "arterial", "arteriel(le)", "ap", "lap", "hap", "late arterial", "early arterial";
- venous: "ven", "venous", "veineux", "portal", "portovenous", "pv", "pvp", "vp".

A name that hints at both (e.g. "arterial to venous") or neither is left to the user. One volume is
never picked for both phases, and a selection the user made is kept.
"""

from __future__ import annotations

import re

ARTERIAL_WORDS = {"art", "arterial", "arteriel", "arterielle", "ap", "lap", "hap", "eap", "arteries"}
VENOUS_WORDS = {"ven", "venous", "veineux", "veineuse", "portal", "portovenous", "pv", "pvp", "vp", "portalvenous"}
_SPLIT = re.compile(r"[^a-z0-9]+|(?<=[a-z])(?=[0-9])|(?<=[0-9])(?=[a-z])")
SERIES_DESCRIPTION_TAG = "0008,103e"


def _words(text: str) -> set:
    return {w for w in _SPLIT.split(text.lower()) if w}


def phaseHint(text: str) -> str | None:
    """"arterial", "venous" or ``None`` (no hint, or hints at both) for a volume name or description."""
    words = _words(text)
    arterial = bool(words & ARTERIAL_WORDS) or any(w.startswith("arteri") for w in words)
    venous = bool(words & VENOUS_WORDS) or any(w.startswith(("venous", "portal")) for w in words)
    if arterial == venous:
        return None
    return "arterial" if arterial else "venous"


def dicomSeriesDescription(node, instanceValue=None) -> str:
    """The DICOM SeriesDescription of a volume loaded from DICOM ("" otherwise). ``instanceValue``:
    (SOP instance UID, tag) -> value, default Slicer's DICOM database."""
    uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids:
        return ""
    if instanceValue is None:
        import slicer

        database = getattr(slicer, "dicomDatabase", None)
        if database is None:
            return ""
        instanceValue = database.instanceValue
    return instanceValue(uids[0], SERIES_DESCRIPTION_TAG) or ""


def guessPhaseVolumes(volumes, selected=None, instanceValue=None) -> dict:
    """{phase: node} for the phases not in ``selected`` ({phase: node or None}) that one volume hints
    at unambiguously. With no hint at all and nothing selected, a single volume is the venous phase
    (the reference); a volume is never given to both phases."""
    selected = {phase: node for phase, node in (selected or {}).items() if node is not None}
    taken = {id(node) for node in selected.values()}
    candidates = {"arterial": [], "venous": []}
    for node in volumes:
        if id(node) in taken:
            continue
        hint = phaseHint(node.GetName() or "") or phaseHint(dicomSeriesDescription(node, instanceValue))
        if hint:
            candidates[hint].append(node)
    guess = {}
    for phase, nodes in candidates.items():
        if phase not in selected and len(nodes) == 1:
            guess[phase] = nodes[0]
    volumes = list(volumes)
    if not guess and not selected and len(volumes) == 1:
        guess["venous"] = volumes[0]
    return guess


def phaseVolumeCandidates(scene) -> list:
    """The scene's scalar volumes that can be a phase: not label maps, not this module's attention
    maps (they carry the attribute "MAMLSegmentation.phase")."""
    nodes = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetAttribute("MAMLSegmentation.phase"):
            continue
        nodes.append(node)
    return nodes
