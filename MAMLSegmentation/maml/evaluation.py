"""Segmentation metrics: Dice, ASSD and HD95 per case and label, with MONAI's surface distances.

Definitions (also written into every JSON result under ``"definitions"``):

- Dice = 2 |P ∩ G| / (|P| + |G|) of the binary masks of one label value. Both masks empty: Dice 1
  (nothing to find, nothing found); exactly one empty: Dice 0.
- Surfaces are MONAI's mask edges: the voxels of a mask that its binary erosion removes. Distances are
  Euclidean between voxel centres, in millimetres (the image spacing, array order z, y, x) or in
  voxels (unit spacing, as the MAML paper's Table 1 reports ASSD).
- ASSD (average symmetric surface distance) = the mean of the symmetric surface distances: the
  distances from every surface voxel of P to the surface of G and from every surface voxel of G to the
  surface of P, pooled, then averaged (``monai.metrics.compute_average_surface_distance`` with
  ``symmetric=True``).
- HD95 = the larger of the two directed 95th-percentile surface distances
  (``monai.metrics.compute_hausdorff_distance`` with ``percentile=95``), in millimetres.
- When either mask is empty a surface distance is undefined: it is NaN in the per-case table,
  excluded from the mean and standard deviation, and counted in the summary as ``n_undefined``.
- Mean and standard deviation are over cases (population standard deviation, ddof 0).
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError

METRICS = ("dice", "assd_mm", "assd_voxels", "hd95_mm")

DEFINITIONS = {
    "dice": "2|P∩G|/(|P|+|G|) per label; 1 when both masks are empty, 0 when exactly one is",
    "assd_mm": "average symmetric surface distance in mm: mean of the pooled distances from each "
               "surface voxel of P to the surface of G and of G to P (MONAI "
               "compute_average_surface_distance, symmetric=True, spacing = image spacing)",
    "assd_voxels": "the same with unit spacing (voxel units, as the MAML paper's Table 1)",
    "hd95_mm": "max of the two directed 95th-percentile surface distances in mm (MONAI "
               "compute_hausdorff_distance, percentile=95)",
    "surface": "MONAI mask edges: mask voxels removed by a binary erosion; Euclidean distances "
               "between voxel centres",
    "undefined": "surface distances are NaN when either mask is empty; NaNs are excluded from "
                 "mean and std and counted as n_undefined",
    "std": "population standard deviation over cases (ddof 0)",
}

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


# --------------------------------------------------------------------------------------------------
# Metrics of binary masks
# --------------------------------------------------------------------------------------------------


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {gt.shape}")
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def _crop_to_union(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to the bounding box of their union plus one background voxel per side.

    Surfaces and distances are unchanged (an erosion near the box sees the same neighbourhood);
    MONAI then works on a small array instead of the whole volume.
    """
    union = pred | gt
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        present = np.flatnonzero(union.any(axis=other))
        slices.append(slice(present[0], present[-1] + 1))
    pred = np.pad(pred[tuple(slices)], 1)
    gt = np.pad(gt[tuple(slices)], 1)
    return pred, gt


def monai_surface_available() -> bool:
    """MONAI's surface distances need scipy on the CPU (binary erosion, KD-tree)."""
    try:
        import scipy.ndimage  # noqa: F401
        import scipy.spatial  # noqa: F401
    except ImportError:
        return False
    return True


def surface_metrics(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float]) -> dict[str, float]:
    """ASSD (mm and voxels) and HD95 (mm) of two binary masks; NaN when either is empty.

    Uses MONAI's ``compute_average_surface_distance`` / ``compute_hausdorff_distance`` when scipy is
    installed (MONAI needs it on the CPU); otherwise the same definitions computed with SimpleITK's
    exact Euclidean distance transform (``_surface_metrics_sitk``).
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {gt.shape}")
    if not pred.any() or not gt.any():
        return {"assd_mm": math.nan, "assd_voxels": math.nan, "hd95_mm": math.nan}
    pred, gt = _crop_to_union(pred, gt)
    spacing = [float(s) for s in spacing_zyx]
    if not monai_surface_available():
        return _surface_metrics_sitk(pred, gt, spacing)
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    y_pred = torch.from_numpy(pred)[None, None].float()
    y = torch.from_numpy(gt)[None, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assd_mm = compute_average_surface_distance(y_pred, y, include_background=True,
                                                   symmetric=True, spacing=spacing)
        assd_vox = compute_average_surface_distance(y_pred, y, include_background=True,
                                                    symmetric=True, spacing=None)
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95,
                                          directed=False, spacing=spacing)
    return {"assd_mm": float(assd_mm[0, 0]), "assd_voxels": float(assd_vox[0, 0]),
            "hd95_mm": float(hd95[0, 0])}


def mask_edges(mask: np.ndarray) -> np.ndarray:
    """MONAI's (scipy's) edges: mask XOR its binary erosion with the 6-connected cross, outside = 0."""
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    # Erosion with the cross: a voxel stays when it and its 6 face neighbours are all set.
    kernel = torch.zeros((1, 1, 3, 3, 3))
    kernel[0, 0, 1, 1, :] = kernel[0, 0, 1, :, 1] = kernel[0, 0, :, 1, 1] = 1
    count = F.conv3d(m, kernel, padding=1)[0, 0]
    eroded = (count >= 7 - 0.5).numpy()
    return mask & ~eroded


def _distances_to(edges_from: np.ndarray, edges_to: np.ndarray, spacing_zyx) -> np.ndarray:
    """Euclidean distance from each voxel of ``edges_from`` to the nearest voxel of ``edges_to``."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(edges_to.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    values = sitk.GetArrayViewFromImage(distance)[edges_from]
    # Voxels of ``edges_to`` itself are at distance 0 (Maurer gives <= 0 inside the set).
    return np.where(edges_to[edges_from], 0.0, np.maximum(values, 0.0)).astype(np.float64)


def _surface_metrics_sitk(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    edges_pred, edges_gt = mask_edges(pred), mask_edges(gt)
    out = {}
    for key, sp in (("mm", spacing), ("voxels", (1.0, 1.0, 1.0))):
        forward = _distances_to(edges_pred, edges_gt, sp)
        backward = _distances_to(edges_gt, edges_pred, sp)
        out[f"assd_{key}"] = float(np.concatenate([forward, backward]).mean())
        if key == "mm":
            out["hd95_mm"] = float(max(np.percentile(forward, 95), np.percentile(backward, 95)))
    return out


def label_metrics(pred: np.ndarray, gt: np.ndarray, value: int, spacing_zyx: Sequence[float],
                  surfaces: bool = True) -> dict[str, float]:
    """All metrics of one label value in two label maps (z, y, x)."""
    p = np.asarray(pred) == value
    g = np.asarray(gt) == value
    row = {"dice": dice_score(p, g), "gt_voxels": int(g.sum()), "pred_voxels": int(p.sum())}
    if surfaces:
        row.update(surface_metrics(p, g, spacing_zyx))
    return row


def evaluate_arrays(pred: np.ndarray, gt: np.ndarray, labels: Mapping[str, int],
                    spacing_zyx: Sequence[float], surfaces: bool = True) -> dict[str, dict[str, float]]:
    """label name -> metrics for two label maps on the same grid."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"label maps differ in shape: {pred.shape} vs {gt.shape}")
    return {name: label_metrics(pred, gt, value, spacing_zyx, surfaces)
            for name, value in labels.items()}


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------


def summarize(rows: Sequence[Mapping], labels: Sequence[str], metrics: Sequence[str] = METRICS
              ) -> dict[str, dict[str, dict[str, float]]]:
    """label -> metric -> {mean, std, n, n_undefined} over the per-case rows of that label."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for label in labels:
        summary[label] = {}
        for metric in metrics:
            values = [float(r[metric]) for r in rows if r["label"] == label and metric in r]
            finite = [v for v in values if not math.isnan(v)]
            summary[label][metric] = {
                "mean": float(np.mean(finite)) if finite else math.nan,
                "std": float(np.std(finite)) if finite else math.nan,
                "n": len(values),
                "n_undefined": len(values) - len(finite),
            }
    return summary


@dataclass
class EvaluationResult:
    labels: dict[str, int]
    rows: list[dict] = field(default_factory=list)  # one per case and label
    summary: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"definitions": DEFINITIONS, "labels": self.labels,
                "summary": _json_safe(self.summary), "cases": _json_safe(self.rows)}

    def csv_text(self) -> str:
        stream = io.StringIO()
        columns = ["case", "label", "value", *METRICS, "gt_voxels", "pred_voxels"]
        writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow(row)
        for statistic in ("mean", "std"):
            for label, value in self.labels.items():
                writer.writerow({"case": statistic, "label": label, "value": value,
                                 **{m: self.summary[label][m][statistic] for m in METRICS}})
        return stream.getvalue()

    def table(self) -> str:
        """A short human-readable summary."""
        lines = [f"{'label':<14}{'n':>4}  {'Dice':>15}  {'ASSD mm':>15}  {'ASSD vox':>15}  {'HD95 mm':>15}"]
        for label in self.labels:
            s = self.summary[label]
            cells = [f"{s[m]['mean']:7.4f}±{s[m]['std']:<7.4f}" for m in METRICS]
            lines.append(f"{label:<14}{s['dice']['n']:>4}  " + "  ".join(cells))
        return "\n".join(lines)


def _json_safe(value):
    """NaN/inf -> None so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results(result: EvaluationResult, out: str | Path) -> tuple[Path, Path]:
    """Writes OUT.json and OUT.csv (``out`` may end in .json, .csv or neither)."""
    from .io import write_text_atomic  # lazily: SimpleITK stays unloaded for pure scoring

    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() in (".json", ".csv") else out
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    write_text_atomic(json_path, json.dumps(result.to_dict(), indent=2))
    write_text_atomic(csv_path, result.csv_text())
    return json_path, csv_path


# --------------------------------------------------------------------------------------------------
# Folders of label maps
# --------------------------------------------------------------------------------------------------


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


def read_label_image(path: Path, what: str):
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"cannot read {what} {path}: {error}") from error
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise InputError(f"{what} {path} is not a 3D scalar label map")
    return image


def evaluate_images(pred_image, gt_image, labels: Mapping[str, int], case: str) -> dict[str, dict]:
    """Metrics of a predicted label image against the ground truth; their grids must match."""
    import SimpleITK as sitk

    from .preprocessing import check_same_grid

    try:
        check_same_grid({"ground truth": gt_image, "prediction": pred_image})
    except InputError as error:
        raise InputError(f"case {case!r}: {str(error).split('. Register')[0]}") from None
    pred = sitk.GetArrayViewFromImage(pred_image)
    gt = sitk.GetArrayViewFromImage(gt_image)
    spacing_zyx = tuple(reversed(gt_image.GetSpacing()))
    return evaluate_arrays(pred, gt, labels, spacing_zyx)


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, labels: Sequence[str] | None = None,
                     progress: bool = False) -> EvaluationResult:
    """Scores every ground-truth case; files are matched by name. A missing prediction is an error."""
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
        rows.extend(_case_rows(case, pred_image, gt_image, label_map))
    if label_map is None:
        label_map = parse_labels(None, gt_dir, [sitk.GetArrayViewFromImage(g) for _, g, _ in pending])
        for case, gt_image, pred_image in pending:
            rows.extend(_case_rows(case, pred_image, gt_image, label_map))
    result = EvaluationResult(dict(label_map), rows)
    result.summary = summarize(rows, list(label_map))
    return result


def _has_dataset_json(gt_dir: Path) -> bool:
    return (gt_dir / "dataset.json").is_file() or (gt_dir.parent / "dataset.json").is_file()


def _case_rows(case, pred_image, gt_image, label_map) -> list[dict]:
    metrics = evaluate_images(pred_image, gt_image, label_map, case)
    return [{"case": case, "label": name, "value": label_map[name], **metrics[name]}
            for name in label_map]


# --------------------------------------------------------------------------------------------------
# A model on a data set: every head (fused and each phase alone)
# --------------------------------------------------------------------------------------------------


def evaluate_model(model_path: str | Path, dataset_dir: str | Path, register: str | None = "deformable",
                   heads: Sequence[str] | None = None, predictions_dir: str | Path | None = None,
                   device: str = "auto", progress: bool = False, postprocess: bool = True,
                   backend: str = "auto") -> dict[str, EvaluationResult]:
    """Segments every case of an nnU-Net raw data set with a model and scores each head.

    Heads: "fused" (all phases) and each phase alone (the model's own head for that phase, as when a
    phase is missing), the paper's Tables 1 and 2. Phases not on the label map's grid are aligned
    first (``register``: a :mod:`maml.registration` preset, "transforms" for the data set's
    transform files, or None to reject them); predictions are made on that grid and compared with
    the label map there. ``predictions_dir``: also write HEAD/CASE.nii.gz label maps.
    ``postprocess``: apply the model's post-processing (off: the raw labels, e.g. to tune it).
    ``backend``: auto, torch or openvino (:mod:`maml.backends`).
    """
    import SimpleITK as sitk

    from .training.dataset import load_case_images, read_dataset
    from .inference import predict_case
    from .model import load_model

    from .backends import resolve_engine

    resolve_engine(device, backend)  # a wrong or missing backend fails before the first case
    model = load_model(model_path)
    dataset = read_dataset(dataset_dir)
    if len(dataset.channel_names) != len(model.config.phases):
        raise InputError(f"data set {dataset.root} has {len(dataset.channel_names)} channels; model "
                         f"{model.config.name!r} takes phases {model.config.phases}")
    heads = list(heads) if heads else ["fused", *model.config.phases]
    for head in heads:
        if head != "fused" and head not in model.config.phases:
            raise InputError(f"head {head!r} is neither 'fused' nor one of the model's phases "
                             f"{model.config.phases}")
    labels = {label.name: label.value for label in model.config.labels if label.value != 0}
    rows: dict[str, list[dict]] = {head: [] for head in heads}
    iterator = dataset.cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(dataset.cases, desc="evaluate model", unit="case")
    for case in iterator:
        # load_case_images maps channel k to phase k of the configuration it is given
        images, label = load_case_images(dataset, model.config, case, register)
        for head in heads:
            inputs = images if head == "fused" else {head: images[head]}
            prediction = predict_case(model, inputs, device=device, postprocess=postprocess,
                                      backend=backend)
            if predictions_dir is not None:
                path = Path(predictions_dir) / head / f"{case}{dataset.file_ending}"
                path.parent.mkdir(parents=True, exist_ok=True)
                sitk.WriteImage(prediction.labels, str(path), True)
            metrics = evaluate_images(prediction.labels, label, labels, case)
            rows[head].extend({"case": case, "label": name, "value": labels[name], **metrics[name]}
                              for name in labels)
    results = {}
    for head in heads:
        result = EvaluationResult(dict(labels), rows[head])
        result.summary = summarize(rows[head], list(labels))
        results[head] = result
    return results


def write_model_results(results: Mapping[str, EvaluationResult], out: str | Path,
                        info: Mapping | None = None) -> tuple[Path, Path]:
    """OUT.json ({"heads": {head: result}}) and OUT.csv (a head column first)."""
    from .io import write_text_atomic  # lazily: SimpleITK stays unloaded for pure scoring

    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() in (".json", ".csv") else out
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    payload = {"definitions": DEFINITIONS, **(dict(info) if info else {}),
               "heads": {head: {k: v for k, v in result.to_dict().items() if k != "definitions"}
                         for head, result in results.items()}}
    write_text_atomic(json_path, json.dumps(payload, indent=2))
    lines = []
    for index, (head, result) in enumerate(results.items()):
        text = result.csv_text().splitlines()
        if index == 0:
            lines.append("head," + text[0])
        lines += [f"{head},{line}" for line in text[1:]]
    write_text_atomic(csv_path, "\n".join(lines) + "\n")
    return json_path, csv_path
