"""Folders of label maps: predictions matched to ground truth by file name, and scored."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError
from .metrics import evaluate_arrays, lesion_label_name
from .results import EvaluationResult

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def case_name(path: Path) -> str | None:
    """The case id of an image file name (its name without a known image suffix), else None."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def label_files(folder: str | Path) -> dict[str, Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"folder {folder} does not exist")
    files = {}
    for path in sorted(folder.iterdir()):
        case = case_name(path)
        if case is not None and path.is_file() and not path.name.startswith("."):
            if case in files:
                raise InputError(f"{folder}: case {case!r} has two files ({files[case].name}, {path.name})")
            files[case] = path
    return files


def parse_labels(specs: Sequence[str] | None, gt_dir: Path, gt_arrays: Sequence[np.ndarray] = ()
                 ) -> dict[str, int]:
    """Labels to score: ``name=value`` or plain values from the command line; else dataset.json's
    labels (in the ground-truth folder or its parent); else every non-zero value found."""
    if specs:
        labels = {}
        for spec in specs:
            name, _, value = spec.rpartition("=")
            try:
                number = int(value)
            except ValueError:
                raise InputError(f"label {spec!r} is not VALUE or NAME=VALUE with an integer value") from None
            labels[name or str(number)] = number
        return labels
    for candidate in (gt_dir / "dataset.json", gt_dir.parent / "dataset.json"):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
                return {str(k): int(v) for k, v in data["labels"].items() if int(v) != 0}
            except (KeyError, TypeError, ValueError, json.JSONDecodeError) as error:
                raise InputError(f"cannot read labels from {candidate}: {error}") from error
    values = sorted(set().union(*(set(np.unique(a).tolist()) for a in gt_arrays)) - {0})
    return {str(v): int(v) for v in values}


def resolve_lesion_label(labels: Sequence[str], requested: str | None) -> str | None:
    """The label scored lesion by lesion (see :func:`maml.evaluation.metrics.lesion_label_name`)."""
    try:
        return lesion_label_name(list(labels), requested)
    except ValueError as error:
        raise InputError(f"{error}; name one of them with --lesion-label") from None


def read_label_image(path: Path, what: str):
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"cannot read {what} {path}: {error}") from error
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise InputError(f"{what} {path} is not a 3D scalar label map")
    return image


def evaluate_images(pred_image, gt_image, labels: Mapping[str, int], case: str,
                    lesion_label: str | None = None) -> dict[str, dict]:
    """Metrics of a predicted label image against the ground truth; their grids must match.
    ``lesion_label``: also the lesion figures of that label (:func:`metrics.lesion_metrics`)."""
    import SimpleITK as sitk

    from ..preprocessing import check_same_grid

    try:
        check_same_grid({"ground truth": gt_image, "prediction": pred_image})
    except InputError as error:
        raise InputError(f"case {case!r}: {str(error).split('. Register')[0]}") from None
    pred = sitk.GetArrayViewFromImage(pred_image)
    gt = sitk.GetArrayViewFromImage(gt_image)
    spacing_zyx = tuple(reversed(gt_image.GetSpacing()))
    return evaluate_arrays(pred, gt, labels, spacing_zyx, lesion_label=lesion_label)


def case_rows(case: str, pred_image, gt_image, label_map: Mapping[str, int],
              lesion_label: str | None = None) -> list[dict]:
    """One result row per label of one case."""
    metrics = evaluate_images(pred_image, gt_image, label_map, case, lesion_label)
    return [{"case": case, "label": name, "value": label_map[name], **metrics[name]}
            for name in label_map]


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, labels: Sequence[str] | None = None,
                     progress: bool = False, lesion_label: str | None = None) -> EvaluationResult:
    """Scores every ground-truth case; files are matched by name. A missing prediction is an error.
    Lesions are scored for ``lesion_label`` (default: the label named tumor, if any)."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    gt_files = label_files(gt_dir)
    if not gt_files:
        raise InputError(f"ground-truth folder {gt_dir} has no label images ({', '.join(IMAGE_SUFFIXES)})")
    pred_files = label_files(pred_dir)
    missing = [case for case in gt_files if case not in pred_files]
    if missing:
        raise InputError(
            f"no prediction in {pred_dir} for case(s) {', '.join(missing[:10])}"
            + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        )
    import SimpleITK as sitk

    label_map = parse_labels(labels, gt_dir) if (labels or _has_dataset_json(gt_dir)) else None
    lesions = resolve_lesion_label(label_map, lesion_label) if label_map is not None else None
    iterator = gt_files.items()
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(gt_files), desc="evaluate", unit="case")
    rows = []
    pending = []
    for case, gt_path in iterator:
        gt_image = read_label_image(gt_path, "ground truth")
        pred_image = read_label_image(pred_files[case], "prediction")
        if label_map is None:
            pending.append((case, gt_image, pred_image))
            continue
        rows.extend(case_rows(case, pred_image, gt_image, label_map, lesions))
    if label_map is None:
        label_map = parse_labels(None, gt_dir, [sitk.GetArrayViewFromImage(g) for _, g, _ in pending])
        lesions = resolve_lesion_label(label_map, lesion_label)
        for case, gt_image, pred_image in pending:
            rows.extend(case_rows(case, pred_image, gt_image, label_map, lesions))
    return EvaluationResult.from_rows(label_map, rows, lesions)


def _has_dataset_json(gt_dir: Path) -> bool:
    return (gt_dir / "dataset.json").is_file() or (gt_dir.parent / "dataset.json").is_file()
