"""Tumor and liver statistics from a label map, in physical units.

:func:`compute_statistics` returns the machine-readable summary written to ``stats.json`` (and shown
in Slicer's table). Definitions:

- Volumes (mL) are voxel counts times the voxel volume ``|det(direction)| * prod(spacing) / 1000``,
  so oblique images are handled.
- ``liver_volume_ml`` is the whole organ: liver parenchyma (``liver_label``) **plus** tumor voxels;
  ``liver_parenchyma_volume_ml`` is the liver label alone. ``tumor_volume_ml`` counts every tumor
  voxel, including components too small to be listed as tumors.
- ``tumor_burden`` = ``tumor_volume_ml / liver_volume_ml`` (tumor over liver including tumors, a
  fraction in 0..1), the usual total-tumor-volume / total-liver-volume ratio. It is ``None`` when the
  label map has no liver parenchyma (a burden relative to a missing liver means nothing).
- Tumors are the connected components of the tumor label with 26-connectivity (voxels touching by a
  face, an edge or a corner belong to the same tumor). Components smaller than ``min_tumor_ml``
  (default 0.01 mL = 10 mm^3, a sphere of about 2.7 mm: below what CT resolves as a lesion, the size
  of a network's stray voxels) are not listed; their number and volume are reported as
  ``ignored_tumor_components`` / ``ignored_tumor_volume_ml``. Tumors are sorted by volume,
  largest first, and numbered from 1 in that order.
- ``diameter_mm``: the largest 3D diameter, the greatest distance between the centres of two voxels
  of the tumor. This is the Feret diameter of ITK's ``LabelShapeStatisticsImageFilter`` (what Slicer's
  Segment Statistics reports); for a voxelised sphere it equals the sphere's diameter within a
  fraction of a voxel. It is computed here in O(n) (extreme points along 256 directions, exact search
  among them, then farthest-point refinement) because ITK's O(n^2) search takes minutes on a large
  tumor. It never exceeds the true value and stays within 0.1 % of it (adversarial point sets); the
  tests check it against ITK and an exact search.
- ``axial_diameter_mm``: the longest in-plane diameter over the tumor's slices (same voxel-centre
  definition), the RECIST-like figure; ``axial_slice_index`` is the slice (k) where it is found.
  "Axial" means the image's own slice plane (the acquisition plane; axial for an axial CT).
- ``centroid_lps``: the centre of mass in LPS millimetres; ``centroid_index``: the nearest voxel
  index (i, j, k) of that point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError

__all__ = ["DEFAULT_MIN_TUMOR_ML", "compute_statistics", "count_tumors", "label_name_map",
           "max_distance", "tumor_enhancement", "add_enhancement"]

DEFAULT_MIN_TUMOR_ML = 0.01

_N_DIRECTIONS = 256
_EXACT_LIMIT = 3000  # below this many points the farthest pair is found by brute force


def label_name_map(label_names) -> dict[int, str]:
    """``{value: name}`` from a mapping, a sequence of names indexed by value, or a sequence of
    objects with ``value`` and ``name`` (``maml.config.Label``). ``None`` gives ``{}``."""
    if label_names is None:
        return {}
    if isinstance(label_names, Mapping):
        return {int(k): str(v) for k, v in label_names.items()}
    if isinstance(label_names, Sequence) and not isinstance(label_names, str):
        result = {}
        for index, item in enumerate(label_names):
            if hasattr(item, "value") and hasattr(item, "name"):
                result[int(item.value)] = str(item.name)
            else:
                result[index] = str(item)
        return result
    raise InputError(f"label names: expected a mapping or a list, got {type(label_names).__name__}")


def _check_labels(labels) -> np.ndarray:
    if not isinstance(labels, sitk.Image):
        raise InputError(f"label map: expected a SimpleITK image, got {type(labels).__name__}")
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"label map: a scalar 3D image is needed, got {labels.GetDimension()}D with "
            f"{labels.GetNumberOfComponentsPerPixel()} component(s) per voxel"
        )
    array = sitk.GetArrayViewFromImage(labels)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise InputError("label map: voxels must be whole numbers (a label map, not an image)")
    return array


def _voxel_volume_ml(image: sitk.Image) -> float:
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    return abs(float(np.linalg.det(direction))) * float(np.prod(image.GetSpacing())) / 1000.0


def _index_to_physical_matrix(image: sitk.Image) -> np.ndarray:
    """3x3 matrix M with physical offset = M @ (delta i, delta j, delta k)."""
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    return direction * np.asarray(image.GetSpacing(), float)[None, :]


# --------------------------------------------------------------------------------------------------
# Farthest pair of points
# --------------------------------------------------------------------------------------------------


def _directions(n: int) -> np.ndarray:
    """``n`` unit vectors spread evenly over a hemisphere (Fibonacci lattice); +/- covers the sphere."""
    i = np.arange(n) + 0.5
    z = i / n  # 0..1: the upper hemisphere
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    r = np.sqrt(1.0 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _brute_force(points: np.ndarray) -> tuple[float, int, int]:
    best, bi, bj = -1.0, 0, 0
    step = max(1, 1_000_000 // max(len(points), 1))  # blocks of ~1e6 pairs (24 MB)
    for start in range(0, len(points), step):
        block = points[start : start + step]
        d2 = ((block[:, None, :] - points[None, :, :]) ** 2).sum(axis=2)
        flat = int(np.argmax(d2))
        i, j = divmod(flat, len(points))
        if d2[i, j] > best:
            best, bi, bj = float(d2[i, j]), start + i, j
    return math.sqrt(best), bi, bj


def max_distance(points: np.ndarray) -> float:
    """The greatest distance between two of ``points`` (n x 3, mm); 0 for fewer than two points."""
    points = np.asarray(points, float)
    if len(points) < 2:
        return 0.0
    if len(points) <= _EXACT_LIMIT:
        return _brute_force(points)[0]
    # Candidates: the extreme points along many directions (they include points very near both ends
    # of the diameter), the exact farthest pair among them, then farthest-point refinement over all
    # points, which only ever lengthens the pair.
    centred = points - points.mean(axis=0)
    candidates = set()
    dirs = _directions(_N_DIRECTIONS)
    for start in range(0, len(dirs), 16):
        proj = centred @ dirs[start : start + 16].T
        candidates.update(np.argmax(proj, axis=0).tolist())
        candidates.update(np.argmin(proj, axis=0).tolist())
    cand = np.fromiter(candidates, int)
    d, i, j = _brute_force(points[cand])
    a, b = int(cand[i]), int(cand[j])
    for _ in range(20):
        improved = False
        for end, other in ((a, b), (b, a)):
            d2 = ((points - points[end]) ** 2).sum(axis=1)
            far = int(np.argmax(d2))
            if math.sqrt(d2[far]) > d + 1e-9:
                d = math.sqrt(float(d2[far]))
                a, b = end, far
                improved = True
                break
        if not improved:
            break
    return d


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (the farthest pair is always among them)."""
    padded = np.pad(mask, 1)
    interior = padded[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for shift in (-1, 1):
            interior &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~interior


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def compute_statistics(
    labels: sitk.Image,
    liver_label: int = 1,
    tumor_label: int = 2,
    label_names=None,
    min_tumor_ml: float = DEFAULT_MIN_TUMOR_ML,
) -> dict:
    """Tumor count, per-tumor volume/diameters/centroid, liver volume and tumor burden.

    ``labels``: a 3D integer label map (any spacing and direction). ``label_names``: ``{value: name}``,
    a list of names indexed by value, or ``maml.config.Label`` objects; used for
    ``label_volumes_ml``. See the module docstring for every definition. Returns plain Python types
    (JSON-ready).
    """
    array = _check_labels(labels)
    if min_tumor_ml < 0 or not math.isfinite(min_tumor_ml):
        raise InputError(f"min_tumor_ml must be a finite number >= 0, got {min_tumor_ml}")
    voxel_ml = _voxel_volume_ml(labels)
    names = label_name_map(label_names)

    count_of = _label_counts(array)
    tumor_voxels = count_of.get(int(tumor_label), 0)
    parenchyma_voxels = count_of.get(int(liver_label), 0)

    kept, n_kept, kept_voxels, n_components = _tumor_components(labels, tumor_label, min_tumor_ml)

    tumors = []
    if n_kept:
        shape = sitk.LabelShapeStatisticsImageFilter()
        shape.Execute(kept)
        kept_array = sitk.GetArrayViewFromImage(kept)
        matrix = _index_to_physical_matrix(labels)
        for lab in range(1, n_kept + 1):
            tumors.append(_tumor_entry(lab, shape, kept_array, matrix, labels, voxel_ml))

    tumor_ml = tumor_voxels * voxel_ml
    liver_ml = (parenchyma_voxels + tumor_voxels) * voxel_ml
    burden = tumor_ml / liver_ml if parenchyma_voxels > 0 else None

    label_volumes = {}
    for value in sorted(set(count_of) | set(names)):
        if value == 0:
            continue
        label_volumes[names.get(value, str(value))] = count_of.get(value, 0) * voxel_ml

    return {
        "tumor_count": n_kept,
        "tumors": tumors,
        "tumor_volume_ml": tumor_ml,
        "liver_volume_ml": liver_ml,
        "liver_parenchyma_volume_ml": parenchyma_voxels * voxel_ml,
        "tumor_burden": burden,
        "voxel_volume_ml": voxel_ml,
        "min_tumor_ml": float(min_tumor_ml),
        "ignored_tumor_components": int(n_components - n_kept),
        "ignored_tumor_volume_ml": (tumor_voxels - kept_voxels) * voxel_ml,
        "label_volumes_ml": label_volumes,
        "liver_label": int(liver_label),
        "tumor_label": int(tumor_label),
    }


def _label_counts(array: np.ndarray) -> dict[int, int]:
    """Voxels per label value. A histogram where the values are small non-negative integers: sorting
    the 39 million voxels of a full-size CT (``np.unique``) takes a second."""
    flat = array.ravel()
    if flat.size and 0 <= flat.min() and flat.max() < 2**16:
        return {value: int(count) for value, count in enumerate(np.bincount(flat)) if count}
    values, counts = np.unique(flat, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def count_tumors(labels: sitk.Image, tumor_label: int = 2,
                 min_tumor_ml: float = DEFAULT_MIN_TUMOR_ML) -> int:
    """How many tumors :func:`compute_statistics` lists for ``labels``."""
    return _tumor_components(labels, tumor_label, min_tumor_ml)[1]


def _tumor_components(labels: sitk.Image, tumor_label: int, min_tumor_ml: float):
    """The listed tumors: 26-connected components of at least ``min_tumor_ml``, numbered from 1 by
    decreasing size. Returns (component image, how many kept, their voxels, how many components).
    Tumor ``id`` i of :func:`compute_statistics` is the voxels equal to i here."""
    voxel_ml = _voxel_volume_ml(labels)
    tumor_mask = sitk.Cast(labels == int(tumor_label), sitk.sitkUInt8)
    components = sitk.ConnectedComponentImageFilter()
    components.FullyConnectedOn()  # 26-connectivity
    cc = components.Execute(tumor_mask)
    n_components = components.GetObjectCount()
    min_voxels = max(1, math.ceil(min_tumor_ml / voxel_ml - 1e-9)) if min_tumor_ml > 0 else 1
    relabel = sitk.RelabelComponentImageFilter()
    relabel.SetMinimumObjectSize(min_voxels)
    relabel.SortByObjectSizeOn()
    kept = relabel.Execute(cc)
    n_kept = relabel.GetNumberOfObjects()
    kept_voxels = int(sum(relabel.GetSizeOfObjectsInPixels()[:n_kept]))
    return kept, n_kept, kept_voxels, n_components


def add_tumor_means(stats: dict, labels: sitk.Image, values: sitk.Image, key: str) -> None:
    """Adds ``key``: the mean of ``values`` (an image on the label grid) over each tumor of
    ``stats["tumors"]`` (from :func:`compute_statistics` on the same labels)."""
    if not stats.get("tumors"):
        return
    kept, n_kept, _, _ = _tumor_components(labels, stats["tumor_label"], stats["min_tumor_ml"])
    ids = sitk.GetArrayViewFromImage(kept).ravel()
    array = sitk.GetArrayViewFromImage(values).ravel().astype(np.float64)
    sums = np.bincount(ids, weights=array, minlength=n_kept + 1)
    counts = np.bincount(ids, minlength=n_kept + 1)
    for tumor in stats["tumors"]:
        tumor[key] = round(float(sums[tumor["id"]] / max(counts[tumor["id"]], 1)), 4)


def _tumor_entry(lab, shape, kept_array, matrix, labels, voxel_ml) -> dict:
    x0, y0, z0, sx, sy, sz = shape.GetBoundingBox(lab)
    mask = kept_array[z0 : z0 + sz, y0 : y0 + sy, x0 : x0 + sx] == lab
    # Physical offsets of boundary voxel centres (k, j, i order -> i, j, k for the matrix).
    kji = np.argwhere(_boundary(mask))
    ijk = kji[:, ::-1].astype(float)
    diameter = max_distance(ijk @ matrix.T)

    axial, axial_k = 0.0, z0
    for k in np.unique(kji[:, 0]):
        plane = kji[kji[:, 0] == k]
        # In-plane: the boundary of the 3D mask on this slice has the same extreme points as the
        # slice's own outline (interior voxels of the slice are never the farthest pair).
        d = max_distance(plane[:, ::-1].astype(float) @ matrix.T)
        if d > axial:
            axial, axial_k = d, z0 + int(k)

    centroid = shape.GetCentroid(lab)
    index = labels.TransformPhysicalPointToContinuousIndex(centroid)
    return {
        "id": lab,
        "volume_ml": shape.GetNumberOfPixels(lab) * voxel_ml,
        "voxels": int(shape.GetNumberOfPixels(lab)),
        "diameter_mm": diameter,
        "axial_diameter_mm": axial,
        "axial_slice_index": axial_k,
        "centroid_lps": [float(c) for c in centroid],
        "centroid_index": [int(round(c)) for c in index],
        "bounding_box_index": [x0, y0, z0, sx, sy, sz],
    }


# --------------------------------------------------------------------------------------------------
# Enhancement across phases (research features)
# --------------------------------------------------------------------------------------------------

ARTERIAL, VENOUS = "arterial", "venous"
SHELL_MM = 5.0  # the surrounding liver: parenchyma within this distance of the tumor
RIM_MM = 2.0  # the tumor's rim (where a capsule would be): its outer voxel layer, within this of its border
APHE_MARGIN_HU = 20.0  # tumor brighter than the liver shell in the arterial phase by at least this
WASHOUT_MARGIN_HU = 10.0  # tumor darker than the liver shell in the venous phase by at least this
MIN_CORE_VOXELS = 30  # fewer voxels deeper than RIM_MM: the tumor counts as having no core
CAPSULE_MARGIN_HU = 5.0  # venous rim brighter than both the tumor's core and the liver shell by this
ENHANCEMENT_NOTE = ("research features computed from the images, not a LI-RADS category and not a "
                    "diagnosis")


def _check_phases_on_grid(labels: sitk.Image, phases: Mapping[str, sitk.Image]) -> dict[str, np.ndarray]:
    arrays = {}
    for name, image in phases.items():
        same = (isinstance(image, sitk.Image) and image.GetSize() == labels.GetSize()
                and np.allclose(image.GetSpacing(), labels.GetSpacing(), atol=1e-4)
                and np.allclose(image.GetOrigin(), labels.GetOrigin(), atol=1e-3)
                and np.allclose(image.GetDirection(), labels.GetDirection(), atol=1e-5))
        if not same:
            raise InputError(f"phase {name!r}: not on the label map's grid; resample (register) it onto "
                             "the reference phase first")
        arrays[name] = sitk.GetArrayViewFromImage(image)
    return arrays


def _median(values: np.ndarray) -> float | None:
    return float(np.median(values)) if values.size else None


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def tumor_enhancement(
    labels: sitk.Image,
    phases: Mapping[str, sitk.Image],
    liver_label: int = 1,
    tumor_label: int = 2,
    min_tumor_ml: float = DEFAULT_MIN_TUMOR_ML,
) -> list[dict]:
    """How each listed tumor enhances in each phase, in the order (and numbering) of
    :func:`compute_statistics`'s ``tumors``.

    ``phases``: phase name -> CT image (HU) on the label map's grid (the registered phases). Per tumor:
    ``tumor_median_hu`` (median HU of the tumor's voxels), ``liver_median_hu`` (median HU of the liver
    parenchyma within ``SHELL_MM`` of the tumor), ``contrast_hu`` (tumor minus liver), ``rim_median_hu``
    and ``core_median_hu`` (tumor voxels within / deeper than ``RIM_MM`` of its border; no core when
    fewer than ``MIN_CORE_VOXELS`` are deeper), per phase;
    ``None`` where there are no such voxels. Flags, ``None`` when the phase they need is missing:

    - ``aphe``: the interior (the core, or the whole tumor when it has none: "nonrim") minus the
      liver >= ``APHE_MARGIN_HU`` in the arterial phase (arterial-phase hyperenhancement);
    - ``washout``: the interior ("nonperipheral") minus the liver <= -``WASHOUT_MARGIN_HU`` in the
      venous phase (darker than the liver; hypovascular lesions and cysts are darker too, so read it
      together with ``aphe``);
    - ``capsule``: venous rim median >= both the core and the liver medians + ``CAPSULE_MARGIN_HU``
      (an enhancing rim); ``None`` for a tumor too thin to have a core (nothing to tell a rim from).

    These are research features measured on the images, not a LI-RADS category.
    """
    array = _check_labels(labels)
    hu = _check_phases_on_grid(labels, phases)
    kept, n_kept, _, _ = _tumor_components(labels, tumor_label, min_tumor_ml)
    if not n_kept:
        return []
    shape_filter = sitk.LabelShapeStatisticsImageFilter()
    shape_filter.Execute(kept)
    kept_array = sitk.GetArrayViewFromImage(kept)
    spacing_zyx = np.asarray(labels.GetSpacing(), float)[::-1]
    pad = np.ceil(max(SHELL_MM, RIM_MM) / spacing_zyx).astype(int) + 1
    results = []
    for lab in range(1, n_kept + 1):
        x0, y0, z0, sx, sy, sz = shape_filter.GetBoundingBox(lab)
        lo = np.maximum(np.array([z0, y0, x0]) - pad, 0)
        hi = np.minimum(np.array([z0 + sz, y0 + sy, x0 + sx]) + pad, array.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        tumor = kept_array[box] == lab
        distance = _signed_distance_mm(tumor, spacing_zyx)  # < 0 inside the tumor
        regions = {
            "tumor": tumor,
            "liver": (array[box] == liver_label) & (distance > 0) & (distance <= SHELL_MM),
            "rim": tumor & (distance >= -RIM_MM),
            "core": tumor & (distance < -RIM_MM),
        }
        if regions["core"].sum() < MIN_CORE_VOXELS:  # the median of a few voxels is noise
            regions["core"] = np.zeros_like(tumor)
        medians = {region: {name: _median(np.asarray(values[box][mask], float))
                            for name, values in hu.items()} for region, mask in regions.items()}
        results.append(_enhancement_entry(medians, int(regions["liver"].sum())))
    return results


def _signed_distance_mm(mask: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """Distance (mm) of each voxel centre to the mask's border: negative inside, positive outside."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    return sitk.GetArrayFromImage(distance)


def _enhancement_entry(medians: dict, shell_voxels: int) -> dict:
    tumor, liver, rim, core = (medians[r] for r in ("tumor", "liver", "rim", "core"))
    contrast = {phase: _difference(tumor[phase], liver[phase]) for phase in tumor}
    # The flags read the tumor's interior (LI-RADS speaks of "nonrim" APHE and "nonperipheral"
    # washout): its core, or the whole tumor when it is too thin to have one.
    interior = {phase: core[phase] if core[phase] is not None else tumor[phase] for phase in tumor}
    arterial = _difference(interior.get(ARTERIAL), liver.get(ARTERIAL))
    venous = _difference(interior.get(VENOUS), liver.get(VENOUS))
    capsule = None
    # A tumor too thin to have a core has no rim to tell from its body: no capsule flag (None).
    if VENOUS in rim and None not in (rim[VENOUS], core[VENOUS], liver[VENOUS]):
        capsule = rim[VENOUS] - max(core[VENOUS], liver[VENOUS]) >= CAPSULE_MARGIN_HU
    return {
        "tumor_median_hu": tumor,
        "liver_median_hu": liver,
        "contrast_hu": contrast,
        "rim_median_hu": rim,
        "core_median_hu": core,
        "aphe": None if arterial is None else arterial >= APHE_MARGIN_HU,
        "washout": None if venous is None else venous <= -WASHOUT_MARGIN_HU,
        "capsule": capsule,
        "liver_shell_mm": SHELL_MM,
        "liver_shell_voxels": shell_voxels,
        "rim_mm": RIM_MM,
        "margins_hu": {"aphe": APHE_MARGIN_HU, "washout": WASHOUT_MARGIN_HU, "capsule": CAPSULE_MARGIN_HU},
        "note": ENHANCEMENT_NOTE,
    }


def add_enhancement(stats: dict, labels: sitk.Image, phases: Mapping[str, sitk.Image]) -> dict:
    """Adds ``enhancement`` (see :func:`tumor_enhancement`) to each tumor of ``stats`` (from
    :func:`compute_statistics` on the same ``labels``); returns ``stats``."""
    entries = tumor_enhancement(labels, phases, stats["liver_label"], stats["tumor_label"],
                                stats["min_tumor_ml"])
    for tumor, entry in zip(stats["tumors"], entries):
        tumor["enhancement"] = entry
    return stats
