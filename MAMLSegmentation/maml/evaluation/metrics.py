"""Segmentation metrics: Dice, ASSD and HD95 per case and label (MONAI's surface distances), and
lesion-level detection and Dice of one lesion label.

This module is the bottom of :mod:`maml.evaluation`: it imports numpy, scipy, MONAI and SimpleITK but
nothing else of ``maml`` (the runtime never imports it; a test holds both to that).

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
- Lesions: see :func:`lesion_metrics` and :func:`summarize_lesions`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

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
    "lesions": "reference lesions: 26-connected components of the lesion label in the ground truth; "
               "predicted lesions: 26-connected components of that label in the prediction",
    "detected": "a reference lesion is detected when any predicted lesion overlaps it by one voxel "
                "or more",
    "false_positive": "a predicted lesion that overlaps no reference lesion",
    "lesion_dice": "per reference lesion: Dice of the lesion and the union of the predicted lesions "
                   "that overlap it; 0 when it is missed",
    "lesion_sensitivity": "detected reference lesions / all reference lesions, pooled over cases",
    "false_positives_per_case": "false-positive predicted lesions / cases",
    "lesion_wise_dice": "per case (the BraTS 2023 lesion-wise Dice): the sum of the "
                        "reference lesions' Dice over (reference lesions + false-positive predicted "
                        "lesions), so each missed or false lesion counts as Dice 0; 1 when the case "
                        "has neither; then mean and std over cases",
    "detected_lesion_dice": "LiTS per-lesion Dice (the scoring TriALS's evaluation reuses): mean "
                            "lesion Dice over the detected reference lesions of all cases",
    "size_bins": "reference lesion volume (voxels x voxel volume): < 1 mL, 1-10 mL, > 10 mL; per bin "
                 "the lesions, those detected and their mean lesion Dice (missed ones count 0)",
}

LESION_LABEL_DEFAULT = "tumor"
# (name, lower bound inclusive, upper bound inclusive) in mL; < 1 mL, 1-10 mL, > 10 mL
SIZE_BINS_ML = (("<1 mL", 0.0, 1.0), ("1-10 mL", 1.0, 10.0), (">10 mL", 10.0, math.inf))
LESION_COLUMNS = ("lesions_reference", "lesions_detected", "lesions_false_positive", "lesion_wise_dice")
# 26-connectivity: lesions touching at an edge or a corner are one lesion
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)

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
                    spacing_zyx: Sequence[float], surfaces: bool = True,
                    lesion_label: str | None = None) -> dict[str, dict]:
    """label name -> metrics for two label maps on the same grid; the row of ``lesion_label`` (a
    name in ``labels``) also carries :func:`lesion_metrics`."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"label maps differ in shape: {pred.shape} vs {gt.shape}")
    rows = {name: label_metrics(pred, gt, value, spacing_zyx, surfaces) for name, value in labels.items()}
    if lesion_label is not None:
        value = labels[lesion_label]
        rows[lesion_label].update(lesion_metrics(pred == value, gt == value, spacing_zyx))
    return rows


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



# --------------------------------------------------------------------------------------------------
# Lesions
# --------------------------------------------------------------------------------------------------


def lesion_label_name(labels: Sequence[str], requested: str | None = None) -> str | None:
    """The label whose connected components are lesions: ``requested`` if given (it must be one of
    ``labels``), else the one named "tumor" (any case); None when there is none."""
    if requested is not None:
        if requested not in labels:
            raise ValueError(f"lesion label {requested!r} is not one of the labels scored "
                             f"({', '.join(labels)})")
        return requested
    return next((name for name in labels if name.lower() == LESION_LABEL_DEFAULT), None)


def size_bin(volume_ml: float) -> str:
    """The size bin of a lesion volume: < 1 mL, 1-10 mL (both ends included), > 10 mL."""
    if volume_ml < 1.0:
        return SIZE_BINS_ML[0][0]
    return SIZE_BINS_ML[1][0] if volume_ml <= 10.0 else SIZE_BINS_ML[2][0]


def connected_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a binary mask: (component index per voxel, 0 outside; count)."""
    from scipy import ndimage

    return ndimage.label(np.asarray(mask, dtype=bool), structure=CONNECTIVITY_26)


def lesion_metrics(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float]) -> dict:
    """Lesion detection and lesion Dice of one case: binary masks of the lesion label (z, y, x).

    Reference lesions are the 26-connected components of ``gt``, predicted lesions those of
    ``pred``. A reference lesion is detected when any predicted lesion overlaps it (one voxel is
    enough, as the LiTS scoring's ``min_overlap=0`` detection and the ATLAS/ISLES lesion F1); a
    predicted lesion that overlaps no reference lesion is a false positive.

    A reference lesion's Dice is that of the lesion and the union of the predicted lesions that
    overlap it (0 when missed), as the BraTS 2023 lesion-wise metrics compute it per ground-truth
    component (https://github.com/rachitsaluja/brats_val_2023; the rules are outlined at
    https://synapse.org/Synapse:syn51156910/discussion/threadId=10357). The case's lesion-wise Dice is
    their sum over (reference lesions + false positives), so every missed and every false lesion
    counts as a 0. Unlike BraTS we neither dilate the reference before matching nor drop small
    components: every voxel counts. The LiTS per-lesion Dice (``detected_lesion_dice`` in
    :func:`summarize_lesions`) is the mean over detected lesions only (Bilic et al., "The Liver
    Tumor Segmentation Benchmark (LiTS)", Med. Image Anal. 84, 2023; TriALS's evaluation scripts,
    https://github.com/xmed-lab/TriALS eval_scripts, reuse that scoring); LiTS first merges
    reference lesions that one predicted lesion spans, which we do not, and labels components with
    scipy's default 6-connectivity where we use 26.

    Returns counts, ``lesion_wise_dice``, ``lesions`` (one dict per reference lesion: volume_ml,
    size_bin, detected, dice) and ``false_positive_volumes_ml``.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {gt.shape}")
    voxel_ml = float(np.prod([float(s) for s in spacing_zyx])) / 1000.0
    if pred.any() or gt.any():
        # components and overlaps are those of the union's bounding box: label a small array
        pred, gt = _crop_to_union(pred, gt)
    reference, n_reference = connected_lesions(gt)
    predicted, n_predicted = connected_lesions(pred)
    reference_sizes = np.bincount(reference.ravel(), minlength=n_reference + 1)
    predicted_sizes = np.bincount(predicted.ravel(), minlength=n_predicted + 1)
    both = (reference > 0) & (predicted > 0)
    # every (reference, predicted) pair that shares a voxel
    pairs = np.unique(np.stack([reference[both], predicted[both]]), axis=1)
    # voxels of a reference lesion covered by any predicted lesion = its intersection with the union
    # of the predicted lesions that overlap it
    covered = np.bincount(reference[both], minlength=n_reference + 1)
    lesions = []
    for index in range(1, n_reference + 1):
        partners = pairs[1][pairs[0] == index]
        volume = int(reference_sizes[index])
        dice = (2.0 * int(covered[index]) / (volume + int(predicted_sizes[partners].sum()))
                if partners.size else 0.0)
        lesions.append({"volume_ml": volume * voxel_ml, "size_bin": size_bin(volume * voxel_ml),
                        "detected": bool(partners.size), "dice": dice})
    false_positives = sorted(set(range(1, n_predicted + 1)) - set(pairs[1].tolist()))
    n_detected = sum(lesion["detected"] for lesion in lesions)
    denominator = n_reference + len(false_positives)
    lesion_wise = sum(lesion["dice"] for lesion in lesions) / denominator if denominator else 1.0
    return {"lesions_reference": n_reference, "lesions_detected": n_detected,
            "lesions_false_positive": len(false_positives), "lesion_wise_dice": lesion_wise,
            "lesions": lesions,
            "false_positive_volumes_ml": [int(predicted_sizes[i]) * voxel_ml for i in false_positives]}


def summarize_lesions(rows: Sequence[Mapping]) -> dict:
    """Lesion figures over a set of cases: the :func:`lesion_metrics` of each case (rows without
    them are skipped). Sensitivity pools the lesions of all cases (NaN when there are none)."""
    rows = [r for r in rows if "lesions" in r]
    lesions = [lesion for r in rows for lesion in r["lesions"]]
    detected = [lesion for lesion in lesions if lesion["detected"]]
    false_positives = sum(int(r["lesions_false_positive"]) for r in rows)
    per_case = [float(r["lesion_wise_dice"]) for r in rows]
    bins = {}
    for name, _, _ in SIZE_BINS_ML:
        members = [lesion for lesion in lesions if lesion["size_bin"] == name]
        found = sum(lesion["detected"] for lesion in members)
        dices = [lesion["dice"] for lesion in members]
        bins[name] = {"lesions": len(members), "detected": found,
                      "sensitivity": found / len(members) if members else math.nan,
                      "dice_mean": float(np.mean(dices)) if dices else math.nan,
                      "dice_std": float(np.std(dices)) if dices else math.nan}
    return {
        "cases": len(rows),
        "reference_lesions": len(lesions),
        "detected_lesions": len(detected),
        "lesion_sensitivity": len(detected) / len(lesions) if lesions else math.nan,
        "false_positives": false_positives,
        "false_positives_per_case": false_positives / len(rows) if rows else math.nan,
        "lesion_wise_dice": {"mean": float(np.mean(per_case)) if per_case else math.nan,
                             "std": float(np.std(per_case)) if per_case else math.nan,
                             "n": len(per_case)},
        "detected_lesion_dice": float(np.mean([l["dice"] for l in detected])) if detected else math.nan,
        "size_bins": bins,
    }
