"""``maml prepare``: a hospital's folders to the nnU-Net v2 raw data set that ``maml train`` reads.

Two ways in:

- a CSV (columns ``case, arterial, venous, label``): images are NIfTI, NRRD or MHA files or DICOM
  series folders (``DIR::SERIESUID`` picks one series); labels are image files or DICOM SEG files
  (read with highdicom, segments mapped to liver/tumor by their label or coded property type);
- DICOM study folders (one folder per case, a study or a patient): the arterial and venous series are
  picked by SeriesDescription keywords and confirmed by acquisition time (arterial before venous).
  Whenever that leaves a doubt (several candidates, none, or times in the wrong order) nothing is
  guessed: a terminal user is asked, otherwise the case is skipped with one line that names the
  candidates and the way out (a CSV row or a ``--phase-map`` row).

Every label is checked against the venous image (the reference, as ``maml segment``'s default):
its values (a subset of background 0, liver 1, tumor 2, or of ``--label-map``), its grid (size,
spacing, origin, direction; a label stored in another axis order or orientation over the very same
voxels is re-indexed losslessly, never resampled) and its placement (liver labels lying in air
betray a flipped or shifted label). A bad case gives one line and is skipped; the run goes on.

Output (written into a temporary folder beside ``--out``, renamed into place at the end, removed on
any failure): ``imagesTr/CASE_0000.nii.gz`` (arterial), ``CASE_0001.nii.gz`` (venous),
``labelsTr/CASE.nii.gz`` (UInt8 on the venous grid), ``dataset.json`` (``data_kind: clinical``) and
``prepare.json`` (where every case came from, and what was skipped and why) and, from DICOM studies,
``phase_map.csv`` (the series chosen per case, for ``--phase-map``). Inputs are only read.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence, TextIO

import numpy as np

from ..errors import InputError

PHASES = ("arterial", "venous")  # channel 0, channel 1
REFERENCE_PHASE = "venous"
LABELS = {"background": 0, "liver": 1, "tumor": 2}
FILE_ENDING = ".nii.gz"

# SeriesDescription keywords (whole words, case-insensitive)
ARTERIAL_WORDS = frozenset({"arterial", "art", "arteriell", "arteriel", "early", "hap", "lap"})
VENOUS_WORDS = frozenset({"venous", "ven", "venos", "venoes", "portal", "portalvenous", "pv", "pvp"})

# DICOM SEG segments recognised without --label-map: segment label or property type meaning (folded),
# and SNOMED CT codes of the segmented property type.
SEGMENT_NAMES = {
    "liver": 1, "liver parenchyma": 1, "hepatic parenchyma": 1,
    "tumor": 2, "tumour": 2, "liver tumor": 2, "liver tumour": 2, "lesion": 2, "liver lesion": 2,
    "mass": 2, "liver mass": 2, "neoplasm": 2, "hcc": 2, "metastasis": 2, "liver metastasis": 2,
}
SEGMENT_CODES = {"10200004": 1, "108369006": 2, "4147007": 2, "52988006": 2}

# Grid tolerances of a label against its image: the same voxels, up to file-format rounding.
SPACING_RTOL = 1e-3
ORIGIN_TOL_VOXELS = 0.05
DIRECTION_ATOL = 1e-3
# More than this fraction of the labelled voxels in air (< AIR_HU in the venous image): the label
# is flipped or misplaced.
AIR_HU = -500.0
MAX_LABEL_IN_AIR = 0.02

_NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "RTSTRUCT", "RTPLAN", "RTDOSE", "KO", "REG", "DOC"})
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CaseRefused(InputError):
    """One case cannot be prepared; the run goes on without it."""


# --------------------------------------------------------------------------------------------------
# Label map (--label-map)
# --------------------------------------------------------------------------------------------------


@dataclass
class LabelMap:
    """Input label values (image files) and segment names (DICOM SEG) -> output values."""

    values: dict[int, int] = field(default_factory=dict)
    names: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, entries: Iterable[str] | None) -> "LabelMap":
        result = cls()
        for entry in entries or ():
            source, sep, target = entry.rpartition("=")
            target_value = _target_value(target.strip())
            if not sep or not source.strip() or target_value is None:
                raise InputError(f"--label-map {entry!r}: give SOURCE=TARGET, SOURCE a label value or "
                                 "a DICOM SEG segment name, TARGET background, liver or tumor (or 0, 1, 2)")
            source = source.strip()
            if re.fullmatch(r"-?\d+", source):
                result.values[int(source)] = target_value
            else:
                result.names[_fold(source)] = target_value
        return result

    def map_values(self, present: Iterable[int]) -> tuple[dict[int, int], list[int]]:
        """(value -> output value, values with no mapping). Without value entries the identity on
        0, 1, 2 applies; with them every non-zero value must be listed (0 is background unless
        mapped): a partial map would silently keep values the user may not have meant."""
        mapping = dict(self.values) if self.values else {v: v for v in LABELS.values()}
        mapping.setdefault(0, 0)
        unknown = sorted(int(v) for v in present if int(v) not in mapping)
        return mapping, unknown

    def segment_value(self, names: Sequence[str], code: str | None) -> int | None:
        """The output value of a segment: the user's names first, then the known names (a trailing
        number dropped: "Tumor 2" is a tumor), then the SNOMED CT code of its property type."""
        folded = [_fold(name) for name in names]
        for table in (self.names, SEGMENT_NAMES):
            for name in folded:
                for key in (name, re.sub(r"\s*\d+$", "", name)):
                    if key in table:
                        return table[key]
        return SEGMENT_CODES.get(code or "")


def _target_value(text: str) -> int | None:
    if text.casefold() in LABELS:
        return LABELS[text.casefold()]
    if text in {str(v) for v in LABELS.values()}:
        return int(text)
    return None


def _fold(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", str(text).casefold()).split())


def _label_names() -> str:
    return ", ".join(f"{name} {value}" for name, value in LABELS.items())


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


@dataclass
class CaseSource:
    """Where one case's phases and label come from (paths may be ``DIR::SERIESUID``)."""

    case: str
    arterial: str
    venous: str
    label: str
    origin: str  # "cases.csv row 3", "study folder P001"
    details: dict = field(default_factory=dict)  # the chosen series, for prepare.json


@dataclass
class Skipped:
    case: str
    reason: str


@dataclass
class PrepareResult:
    out: Path
    written: list[dict]
    skipped: list[Skipped]


def check_case_id(case: str, where: str) -> str:
    if not _CASE_ID.match(case):
        raise CaseRefused(f"{where}: case id {case!r} must start with a letter or digit and hold only "
                          "letters, digits, '.', '_' and '-' (it names the output files)")
    return case


def case_id_from_folder(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")


def read_cases_csv(path: str | os.PathLike) -> tuple[list[CaseSource], list[Skipped]]:
    """Rows of a CSV with columns case, arterial, venous, label (paths relative to the CSV's folder)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            rows = list(csv.reader(stream))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"--csv {path}: cannot read it ({error})") from error
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise InputError(f"--csv {path}: the file is empty; it needs a header: case,arterial,venous,label")
    header = [cell.strip().casefold() for cell in rows[0]]
    missing = [c for c in ("case", "arterial", "venous", "label") if c not in header]
    if missing:
        raise InputError(f"--csv {path}: no column {', '.join(missing)} in the header {rows[0]}; "
                         "the columns are case,arterial,venous,label")
    sources, skipped, seen = [], [], set()
    for number, row in enumerate(rows[1:], 2):
        values = {name: (row[i].strip() if i < len(row) else "") for i, name in enumerate(header)}
        where = f"{path.name} row {number}"
        case = values["case"] or f"row{number}"
        try:
            check_case_id(case, where)
            if case in seen:
                raise CaseRefused(f"{where}: case id {case!r} is given twice")
            empty = [c for c in ("arterial", "venous", "label") if not values[c]]
            if empty:
                raise CaseRefused(f"{where}: no {', '.join(empty)} given (every case needs both phases "
                                  "and a label)")
        except CaseRefused as error:
            skipped.append(Skipped(case, str(error)))
            continue
        seen.add(case)
        sources.append(CaseSource(case, *(_relative_to(path.resolve().parent, values[c]) for c in
                                          ("arterial", "venous", "label")), where))
    return sources, skipped


def _relative_to(folder: Path, text: str) -> str:
    from ..io import SERIES_SEPARATOR

    location, sep, uid = text.partition(SERIES_SEPARATOR)
    location = os.path.expanduser(location)
    if not os.path.isabs(location):
        location = str(folder / location)
    return location + (sep + uid if sep else "")


# --------------------------------------------------------------------------------------------------
# DICOM studies: series and phases
# --------------------------------------------------------------------------------------------------


@dataclass
class Series:
    uid: str
    folder: Path
    files: list[str]
    description: str = ""
    number: str = ""
    modality: str = ""
    time: str = ""  # acquisition, else content, else series time (HHMMSS.ffffff)
    rows: int = 0
    columns: int = 0
    referenced_series: tuple[str, ...] = ()

    @property
    def location(self) -> str:
        from ..io import SERIES_SEPARATOR

        return f"{self.folder}{SERIES_SEPARATOR}{self.uid}"

    @property
    def seconds(self) -> float | None:
        digits = re.sub(r"[^0-9.]", "", self.time)
        if len(digits) < 4:
            return None
        try:
            hours, minutes = int(digits[:2]), int(digits[2:4])
            seconds = float(digits[4:] or 0)
        except ValueError:
            return None
        return hours * 3600 + minutes * 60 + seconds

    def describe(self) -> str:
        clock = self.seconds
        when = "no time" if clock is None else "{:02d}:{:02d}:{:02d}".format(
            int(clock // 3600), int(clock % 3600 // 60), int(clock % 60))
        return (f"#{self.number or '?'} {self.description or '(no description)'!r} {when} "
                f"{self.columns}x{self.rows}x{len(self.files)} [{self.uid}]")


def scan_dicom(folder: Path) -> list[Series]:
    """Every DICOM series under ``folder`` (all depths), from the files' headers."""
    pydicom = _pydicom(f"DICOM study folder {folder}")
    from pydicom.errors import InvalidDicomError

    tags = ["SeriesInstanceUID", "SeriesDescription", "SeriesNumber", "Modality", "AcquisitionTime",
            "ContentTime", "SeriesTime", "Rows", "Columns", "ReferencedSeriesSequence"]
    by_uid: dict[str, Series] = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
            except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError):
                continue
            uid = str(header.get("SeriesInstanceUID", "")).strip()
            if not uid:
                continue
            series = by_uid.get(uid)
            if series is None:
                referenced = tuple(str(item.get("SeriesInstanceUID", ""))
                                   for item in header.get("ReferencedSeriesSequence", []) or [])
                series = by_uid[uid] = Series(
                    uid, Path(root), [], str(header.get("SeriesDescription", "")).strip(),
                    str(header.get("SeriesNumber", "") or "").strip(), str(header.get("Modality", "")).strip(),
                    "", int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0), referenced)
            series.files.append(path)
            time = next((str(header.get(k)).strip() for k in ("AcquisitionTime", "ContentTime", "SeriesTime")
                         if header.get(k)), "")
            if time and (not series.time or time < series.time):
                series.time = time
    return sorted(by_uid.values(), key=lambda s: (s.seconds is None, s.seconds or 0, s.number, s.uid))


def _pydicom(what: str):
    try:
        import pydicom
    except ImportError:
        raise CaseRefused(f"{what}: reading DICOM headers needs pydicom; pip install highdicom (the "
                          "dicom extra), which brings it") from None
    return pydicom


def image_series(series: Iterable[Series]) -> list[Series]:
    return [s for s in series if s.modality.upper() not in _NON_IMAGE_MODALITIES and len(s.files) >= 2]


def phase_of(description: str) -> set[str]:
    """The phases a SeriesDescription names (none, one, or both when it is unclear)."""
    words = set(re.findall(r"[a-z]+", description.casefold()))
    phases = set()
    if words & ARTERIAL_WORDS:
        phases.add("arterial")
    if words & VENOUS_WORDS:
        phases.add("venous")
    return phases


@dataclass
class PhaseChoice:
    chosen: dict[str, Series]  # phase -> series, both phases when decided
    doubt: str = ""  # why it is not decided
    candidates: dict[str, list[Series]] = field(default_factory=dict)
    pair_in_doubt: bool = False  # one candidate each, but not a valid pair (same series, time order)


def pick_phases(series: Sequence[Series]) -> PhaseChoice:
    """The arterial and venous series by description keywords, confirmed by time; never a guess."""
    images = image_series(series)
    candidates = {phase: [s for s in images if phase in phase_of(s.description)] for phase in PHASES}
    problems = []
    for phase in PHASES:
        found = candidates[phase]
        if len(found) != 1:
            problems.append(f"{len(found) or 'no'} {phase} candidate{'s' if len(found) != 1 else ''}")
    if not problems:
        arterial, venous = candidates["arterial"][0], candidates["venous"][0]
        if arterial.uid == venous.uid:
            problems.append(f"one series {arterial.description!r} names both phases")
        elif arterial.seconds is not None and venous.seconds is not None and arterial.seconds >= venous.seconds:
            problems.append("the arterial candidate was not acquired before the venous one")
        else:
            return PhaseChoice({"arterial": arterial, "venous": venous}, "", candidates)
        return PhaseChoice({}, problems[0], candidates, pair_in_doubt=True)
    return PhaseChoice({}, "; ".join(problems), candidates)


def ask_series(case: str, phase: str, series: Sequence[Series], candidates: Sequence[Series],
               stdin: TextIO | None = None, stdout: TextIO | None = None) -> Series | None:
    """Asks on a terminal which series is ``phase``; None when the user skips the case."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    marked = {s.uid for s in candidates}
    print(f"case {case}: which series is the {phase} phase?", file=stdout)
    for index, item in enumerate(series, 1):
        print(f"  {index}. {item.describe()}{'  <- keyword' if item.uid in marked else ''}", file=stdout)
    while True:
        print(f"  {phase} series [1-{len(series)}, s to skip the case]: ", end="", file=stdout, flush=True)
        answer = stdin.readline()
        if not answer or answer.strip().casefold() in {"s", "skip"}:
            return None
        if answer.strip().isdigit() and 1 <= int(answer) <= len(series):
            return series[int(answer) - 1]


def read_phase_map(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """--phase-map: CSV case,arterial,venous; values are a SeriesInstanceUID, a series number or an
    exact SeriesDescription within that case's folder."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            rows = [r for r in csv.reader(stream) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"--phase-map {path}: cannot read it ({error})") from error
    header = [c.strip().casefold() for c in rows[0]] if rows else []
    if not all(c in header for c in ("case", "arterial", "venous")):
        raise InputError(f"--phase-map {path}: the header must be case,arterial,venous")
    result = {}
    for row in rows[1:]:
        values = {name: (row[i].strip() if i < len(row) else "") for i, name in enumerate(header)}
        result[values["case"]] = {phase: values[phase] for phase in PHASES}
    return result


def _find_series(series: Sequence[Series], key: str) -> Series | None:
    for test in (lambda s: s.uid == key, lambda s: s.number == key, lambda s: s.description == key):
        found = [s for s in series if test(s)]
        if len(found) == 1:
            return found[0]
    return None


def _seg_label_of_study(series: Sequence[Series], venous: Series) -> str:
    segs = [s for s in series if s.modality.upper() == "SEG"]
    if len(segs) > 1:
        segs = [s for s in segs if venous.uid in s.referenced_series] or segs
    if not segs:
        raise CaseRefused("no label: the folder holds no DICOM SEG and no --labels folder was given")
    if len(segs) > 1 or len(segs[0].files) != 1:
        raise CaseRefused("several DICOM SEG objects (" + "; ".join(s.describe() for s in segs)
                          + "); name the label with --labels DIR (DIR/CASE.dcm) or a CSV row")
    return segs[0].files[0]


def _label_in_folder(labels_dir: Path, case: str, folder_name: str) -> str:
    from ..io import IMAGE_SUFFIXES

    for name in dict.fromkeys((case, folder_name)):
        for suffix in (*IMAGE_SUFFIXES, ".dcm"):
            if (labels_dir / f"{name}{suffix}").is_file():
                return str(labels_dir / f"{name}{suffix}")
        if (labels_dir / name).is_dir():
            return str(labels_dir / name)
    raise CaseRefused(f"no label in {labels_dir} ({case}.nii.gz, {case}.nrrd, {case}.mha, {case}.dcm "
                      f"or a folder {case}/ holding a DICOM SEG)")


def dicom_cases(studies: str | os.PathLike, labels_dir: str | os.PathLike | None = None,
                phase_map: dict[str, dict[str, str]] | None = None,
                choose: Callable[[str, str, list[Series], list[Series]], Series | None] | None = None,
                report: Callable[[str], None] = print) -> tuple[list[CaseSource], list[Skipped]]:
    """One case per subfolder of ``studies``; phases picked as described in the module docstring.
    ``choose(case, phase, all_series, candidates)`` asks a user; None means skip on doubt."""
    studies = Path(studies)
    if not studies.is_dir():
        raise InputError(f"--dicom {studies}: no such folder")
    folders = sorted(p for p in studies.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"--dicom {studies}: no case folders in it (one folder per study or patient)")
    sources, skipped, seen = [], [], set()
    for folder in folders:
        case = case_id_from_folder(folder.name)
        where = f"study folder {folder.name}"
        try:
            if not case:
                raise CaseRefused(f"{where}: its name gives no usable case id")
            if case in seen:
                raise CaseRefused(f"{where}: its case id {case!r} is already taken by another folder")
            series = scan_dicom(folder)
            images = image_series(series)
            if not images:
                raise CaseRefused(f"{where}: no DICOM image series in it")
            # a missing label is known before anybody is asked about the phases
            if labels_dir is not None:
                label = _label_in_folder(Path(labels_dir), case, folder.name)
            elif not any(s.modality.upper() == "SEG" for s in series):
                raise CaseRefused("no label: the folder holds no DICOM SEG and no --labels folder was given")
            entry = (phase_map or {}).get(case) or (phase_map or {}).get(folder.name)
            chosen = _choose_phases(case, folder, images, series, entry, choose)
            if labels_dir is None:
                label = _seg_label_of_study(series, chosen["venous"])
        except CaseRefused as error:
            message = str(error) if str(error).startswith(where) else f"{where}: {error}"
            skipped.append(Skipped(case or folder.name, message))
            report(f"case {case or folder.name}: skipped: {message}")
            continue
        seen.add(case)
        details = {phase: {"series_uid": s.uid, "description": s.description, "number": s.number,
                           "time": s.time, "folder": str(s.folder)} for phase, s in chosen.items()}
        sources.append(CaseSource(case, chosen["arterial"].location, chosen["venous"].location, label,
                                  where, details))
    unknown = sorted(set(phase_map or {}) - {case_id_from_folder(f.name) for f in folders}
                     - {f.name for f in folders})
    if unknown:
        report(f"note: --phase-map names case(s) with no folder in {studies}: {', '.join(unknown)}")
    return sources, skipped


def _choose_phases(case, folder, images, series, mapped, choose) -> dict[str, Series]:
    """``mapped``: this case's --phase-map row, if any."""
    if mapped:
        chosen = {}
        for phase in PHASES:
            found = _find_series(images, mapped[phase])
            if found is None:
                raise CaseRefused(f"--phase-map gives {phase} {mapped[phase]!r}, which names no "
                                  "single series here: " + "; ".join(s.describe() for s in images))
            chosen[phase] = found
        return chosen
    decision = pick_phases(series)
    if decision.chosen:
        return decision.chosen
    if choose is not None:
        chosen = {}
        for phase in PHASES:
            if len(decision.candidates[phase]) == 1 and not decision.pair_in_doubt:
                chosen[phase] = decision.candidates[phase][0]  # only the other phase is in doubt
                continue
            picked = choose(case, phase, images, decision.candidates[phase])
            if picked is None:
                raise CaseRefused(f"skipped at the prompt ({decision.doubt})")
            chosen[phase] = picked
        if chosen["arterial"].uid == chosen["venous"].uid:
            raise CaseRefused("the same series was chosen for both phases")
        return chosen
    listing = "; ".join(f"{s.describe()} in {_relative(s.folder, folder)}" for s in images)
    raise CaseRefused(
        f"phases not decided ({decision.doubt}); series: {listing}. Choose in a terminal, or add "
        f"'{case},ARTERIAL,VENOUS' (series UID or number) to a --phase-map CSV, or give the case as a "
        "--csv row (case,arterial,venous,label with SERIES_FOLDER::SERIESUID)")


def _relative(path: Path, start: Path) -> str:
    try:
        return str(path.relative_to(start)) + "/"
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------


def is_dicom_seg(path: Path) -> Path | None:
    """The DICOM SEG file ``path`` is or (a folder) holds alone, else None."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        if path.is_file() and not path.name.lower().endswith(".dcm"):
            return None  # an image file (NIfTI, NRRD, MHA)
        _pydicom(f"label {path}")

    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    segs = []
    for candidate in files:
        try:
            header = pydicom.dcmread(candidate, stop_before_pixels=True, specific_tags=["Modality"])
        except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError):
            continue
        if str(header.get("Modality", "")).upper() == "SEG":
            segs.append(candidate)
    if len(segs) > 1:
        raise CaseRefused(f"label folder {path} holds {len(segs)} DICOM SEG files; give one file")
    return segs[0] if segs else None


def read_label(path: str, reference, label_map: LabelMap) -> tuple[object, list[str]]:
    """The label map (UInt8, 0/1/2) on ``reference``'s grid, and notes; CaseRefused when it is bad."""
    import SimpleITK as sitk

    location = Path(path)
    if not location.exists():
        raise CaseRefused(f"label ({path}): no such file or folder")
    seg_file = is_dicom_seg(location)
    if seg_file is not None:
        array, notes = _read_seg_label(seg_file, reference, label_map)
    else:
        if location.is_dir():
            raise CaseRefused(f"label ({path}): a folder without a DICOM SEG; give a label image file "
                              "(NIfTI, NRRD, MHA) or a DICOM SEG file")
        try:
            image = sitk.ReadImage(str(location))
        except RuntimeError:
            raise CaseRefused(f"label ({path}): not a readable image file (NIfTI, NRRD, MHA or DICOM SEG)") from None
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise CaseRefused(f"label ({path}): a 3D scalar label map is needed, this is "
                              f"{image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} component(s)")
        image, notes = _on_reference_grid(image, reference, path)
        array = _mapped_values(sitk.GetArrayFromImage(image), label_map, path)
    _check_placement(array, reference, path)
    label = sitk.GetImageFromArray(array.astype(np.uint8))
    label.CopyInformation(reference)
    return label, notes


def _mapped_values(array: np.ndarray, label_map: LabelMap, path: str) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise CaseRefused(f"label ({path}): holds non-integer values; a label map holds "
                              f"{_label_names()}")
        array = array.astype(np.int64)
    present = np.unique(array)
    mapping, unknown = label_map.map_values(present)
    if unknown:
        shown = ", ".join(map(str, unknown[:8]))
        names = {value: name for name, value in LABELS.items()}
        suggestion = " ".join(f"{int(v)}={names.get(mapping.get(int(v), 2), 'tumor')}"
                              for v in present if int(v) != 0)
        raise CaseRefused(f"label ({path}): holds value(s) {shown}, not among {_label_names()}; map "
                          f"every value with --label-map, e.g. --label-map {suggestion} (unlisted "
                          "values stay unmapped; 0 is background)")
    lookup = np.zeros(int(present.max()) - int(present.min()) + 1, np.uint8)
    for value in present:
        lookup[int(value) - int(present.min())] = mapping[int(value)]
    return lookup[array - int(present.min())]


def _grid_differences(reference, image) -> list[str]:
    differences = []
    if image.GetSize() != reference.GetSize():
        differences.append(f"size {_fmt(image.GetSize())} vs {_fmt(reference.GetSize())}")
    if not np.allclose(image.GetSpacing(), reference.GetSpacing(), rtol=SPACING_RTOL, atol=0):
        differences.append(f"spacing {_fmt(image.GetSpacing())} vs {_fmt(reference.GetSpacing())} mm")
    tolerance = ORIGIN_TOL_VOXELS * min(reference.GetSpacing())
    if np.max(np.abs(np.subtract(image.GetOrigin(), reference.GetOrigin()))) > tolerance:
        differences.append(f"origin {_fmt(image.GetOrigin())} vs {_fmt(reference.GetOrigin())} mm")
    if np.max(np.abs(np.subtract(image.GetDirection(), reference.GetDirection()))) > DIRECTION_ATOL:
        differences.append(f"orientation {_orientation(image)} vs {_orientation(reference)}")
    return differences


def _orientation(image) -> str:
    import SimpleITK as sitk

    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in values) + ")"


def _on_reference_grid(image, reference, path: str):
    """``image`` on ``reference``'s grid: as it is, or re-indexed when only its axis order or
    orientation differs over the same voxels; anything else is refused (never resampled)."""
    differences = _grid_differences(reference, image)
    if not differences:
        return image, []
    import SimpleITK as sitk

    if any(d.startswith("orientation") for d in differences) and image.GetNumberOfPixels() == reference.GetNumberOfPixels():
        reoriented = sitk.DICOMOrient(image, _orientation(reference))
        if not _grid_differences(reference, reoriented):
            return reoriented, [f"label stored as {_orientation(image)}, re-indexed to the image's "
                                f"{_orientation(reference)} (same voxels)"]
    raise CaseRefused(f"label ({path}) is not on the {REFERENCE_PHASE} image's grid: "
                      + "; ".join(differences) + f"; export the label on the {REFERENCE_PHASE} series")


def _read_seg_label(seg_file: Path, reference, label_map: LabelMap) -> tuple[np.ndarray, list[str]]:
    """A DICOM SEG's segments painted onto ``reference``'s grid (liver first, tumor over it)."""
    import SimpleITK as sitk

    try:
        import highdicom as hd
    except ImportError:
        raise CaseRefused(f"label ({seg_file}) is a DICOM SEG, which needs highdicom: pip install "
                          "highdicom (the dicom extra)") from None
    try:
        seg = hd.seg.segread(str(seg_file))
    except Exception as error:  # noqa: BLE001 - highdicom raises many kinds on a bad file
        raise CaseRefused(f"label ({seg_file}): cannot read the DICOM SEG ({error})") from None
    targets, unknown = {}, []
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        kind = description.segmented_property_type
        names = [str(description.segment_label), str(kind.meaning)]
        value = label_map.segment_value(names, str(kind.value))
        if value is None:
            unknown.append(f"{description.segment_label!r} ({number})")
        else:
            targets[number] = value
    if unknown:
        raise CaseRefused(f"label ({seg_file}): DICOM SEG segment(s) {', '.join(unknown)} are not "
                          f"known as liver or tumor; map them with --label-map 'NAME=tumor' "
                          "(or =liver, =background)")
    reference_volume = hd.Volume.from_simpleitk(reference)
    result = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.uint8)
    for number, value in sorted(targets.items(), key=lambda item: item[1]):
        if value == 0:
            continue
        try:
            volume = seg.get_volume(segment_numbers=[number], combine_segments=True, relabel=True,
                                    dtype=np.uint8)
            inside = int(np.count_nonzero(volume.array))
            matched = volume.match_geometry(reference_volume, tol=ORIGIN_TOL_VOXELS * min(reference.GetSpacing()))
        except (RuntimeError, ValueError) as error:
            raise CaseRefused(f"label ({seg_file}): DICOM SEG segment {number} is not on the "
                              f"{REFERENCE_PHASE} image's grid ({str(error).splitlines()[0][:160]}); "
                              f"export the label on the {REFERENCE_PHASE} series") from None
        mask = sitk.GetArrayFromImage(matched.to_simpleitk()) > 0
        if int(np.count_nonzero(mask)) != inside:
            raise CaseRefused(f"label ({seg_file}): DICOM SEG segment {number} reaches outside the "
                              f"{REFERENCE_PHASE} image; export the label on the {REFERENCE_PHASE} series")
        result[mask] = value
    return result, []


def _check_placement(array: np.ndarray, reference, path: str) -> None:
    import SimpleITK as sitk

    foreground = array > 0
    if not np.any(array == LABELS["liver"]) and not np.any(array == LABELS["tumor"]):
        raise CaseRefused(f"label ({path}): no liver or tumor voxels; an empty label teaches nothing")
    intensities = sitk.GetArrayViewFromImage(reference)[foreground]
    in_air = float(np.mean(intensities < AIR_HU))
    if in_air > MAX_LABEL_IN_AIR:
        raise CaseRefused(f"label ({path}): {100 * in_air:.0f}% of its liver/tumor voxels lie in air "
                          f"(< {AIR_HU:.0f} HU) in the {REFERENCE_PHASE} image: a flipped or shifted label?")


# --------------------------------------------------------------------------------------------------
# Writing the data set
# --------------------------------------------------------------------------------------------------


def _clean(image):
    """A copy without the source's metadata (DICOM tags stay out of the training set)."""
    import SimpleITK as sitk

    copy = sitk.Image(image)
    for key in copy.GetMetaDataKeys():
        copy.EraseMetaData(key)
    return copy


def prepare_case(source: CaseSource, folder: Path, label_map: LabelMap) -> list[str]:
    """Reads, checks and writes one case into ``folder``; returns notes; CaseRefused when bad."""
    import SimpleITK as sitk

    from ..io import read_image, write_image
    from ..preprocessing import check_same_grid

    images = {}
    for phase in PHASES:
        try:
            images[phase] = read_image(getattr(source, phase), phase)
        except InputError as error:
            raise CaseRefused(str(error)) from None
    _check_same_patient(images)
    label, notes = read_label(source.label, images[REFERENCE_PHASE], label_map)
    try:
        check_same_grid({"venous": images["venous"], "arterial": images["arterial"]})
    except InputError:
        notes.append("arterial phase on another grid than the venous: train with --register")
    if not np.any(sitk.GetArrayViewFromImage(label) == LABELS["tumor"]):
        notes.append("no tumor in the label")
    case = source.case
    write_image(_clean(images["arterial"]), folder / "imagesTr" / f"{case}_0000{FILE_ENDING}")
    write_image(_clean(images["venous"]), folder / "imagesTr" / f"{case}_0001{FILE_ENDING}")
    write_image(label, folder / "labelsTr" / f"{case}{FILE_ENDING}")
    return notes


def _check_same_patient(images: dict) -> None:
    """Phases of two patients (DICOM PatientID), or volumes that share no space, make no case."""
    from ..io import dicom_files

    files = {phase: dicom_files(image) for phase, image in images.items()}
    if all(files.values()):
        try:
            import pydicom

            ids = {phase: str(pydicom.dcmread(f[0], stop_before_pixels=True,
                                              specific_tags=["PatientID"]).get("PatientID", "")).strip()
                   for phase, f in files.items()}
        except (ImportError, OSError, ValueError):
            ids = {}
        if ids and all(ids.values()) and len(set(ids.values())) > 1:
            raise CaseRefused("the phases are of different patients (PatientID "
                              + ", ".join(f"{phase} {value!r}" for phase, value in ids.items()) + ")")
    boxes = [_physical_box(image) for image in images.values()]
    low, high = np.maximum(boxes[0][0], boxes[1][0]), np.minimum(boxes[0][1], boxes[1][1])
    if np.any(low >= high):
        raise CaseRefused("the arterial and venous volumes share no space (different patients, or a "
                          "series that is not the abdomen?)")


def _physical_box(image) -> tuple[np.ndarray, np.ndarray]:
    size = np.array(image.GetSize()) - 1
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
                        for corner in np.array(np.meshgrid(*[[0, n] for n in size])).T.reshape(-1, 3)])
    return corners.min(axis=0), corners.max(axis=0)


def check_out_folder(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"--out {out} exists and is not empty; choose a new folder or add --force "
                         "to replace it")


def prepare(sources: Sequence[CaseSource], out: str | os.PathLike, label_map: LabelMap | None = None,
            skipped: Sequence[Skipped] = (), force: bool = False, name: str | None = None,
            report: Callable[[str], None] = print, inputs: dict | None = None) -> PrepareResult:
    """Writes the cases into ``out`` all at once (temporary folder, then rename). Cases that fail
    their checks are skipped with one line each; no written case is an error and leaves nothing."""
    from ..io import write_json

    out = Path(out)
    label_map = label_map or LabelMap()
    check_out_folder(out, force)
    skipped = list(skipped)
    temporary = out.parent / f".{out.name}.prepare-{uuid.uuid4().hex[:10]}.tmp"
    written = []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        (temporary / "imagesTr").mkdir(parents=True)
        (temporary / "labelsTr").mkdir()
        for index, source in enumerate(sources, 1):
            prefix = f"[{index}/{len(sources)}] case {source.case}"
            try:
                notes = prepare_case(source, temporary, label_map)
            except CaseRefused as error:
                skipped.append(Skipped(source.case, f"{source.origin}: {error}"))
                report(f"{prefix}: skipped: {source.origin}: {error}")
                continue
            written.append({"case": source.case, "origin": source.origin, "arterial": source.arterial,
                            "venous": source.venous, "label": source.label, "notes": notes,
                            **({"series": source.details} if source.details else {})})
            report(f"{prefix}: written" + (f" ({'; '.join(notes)})" if notes else ""))
        if not written:
            raise InputError(f"no case could be prepared ({len(skipped)} skipped, see the lines above); "
                             f"nothing was written to {out}")
        write_json({
            "name": name or out.name,
            "description": "Two-phase contrast-enhanced liver CT prepared by maml prepare",
            "channel_names": {"0": "arterial", "1": "venous"},
            "labels": dict(LABELS),
            "numTraining": len(written),
            "file_ending": FILE_ENDING,
            # Read by maml train / maml fingerprint: a model trained on this says what it saw.
            "data_kind": "clinical",
        }, temporary / "dataset.json")
        chosen = [w for w in written if "series" in w]
        if chosen:  # the phases as picked or answered: --phase-map replays them without asking
            rows = ["case,arterial,venous"] + [f"{w['case']},{w['series']['arterial']['series_uid']},"
                                               f"{w['series']['venous']['series_uid']}" for w in chosen]
            (temporary / "phase_map.csv").write_text("\n".join(rows) + "\n")
        write_json({"inputs": inputs or {}, "written": written,
                    "skipped": [{"case": s.case, "reason": s.reason} for s in skipped]},
                   temporary / "prepare.json")
        _move_into_place(temporary, out)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return PrepareResult(out, written, skipped)


def _move_into_place(temporary: Path, out: Path) -> None:
    previous = None
    if out.exists():
        previous = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:10]}.tmp"
        os.rename(out, previous)
    try:
        os.rename(temporary, out)
    except OSError as error:
        if previous is not None:
            os.rename(previous, out)
        raise InputError(f"cannot move the prepared data set into {out}: {error.strerror or error}") from None
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def summary(result: PrepareResult) -> list[str]:
    lines = [f"written: {len(result.written)} case(s) to {result.out} (imagesTr: CASE_0000 arterial, "
             "CASE_0001 venous; labelsTr; dataset.json; prepare.json)"]
    register = [w["case"] for w in result.written if any("--register" in n for n in w["notes"])]
    if register:
        lines.append(f"note: {len(register)} case(s) have the arterial phase on another grid "
                     f"({', '.join(register[:5])}{', ...' if len(register) > 5 else ''}): "
                     "train with --register deformable")
    if result.skipped:
        lines.append(f"skipped: {len(result.skipped)} case(s):")
        lines.extend(f"  {s.case}: {s.reason}" for s in result.skipped)
    lines.append(f"next: maml plan --dataset {result.out} --out plans.json; "
                 f"maml train --dataset {result.out} --out run")
    return lines
