"""Know when not to answer: is this image like the model's training data, and is the output plausible?

A checkpoint carries a training fingerprint (``metadata["fingerprint"]``, computed by
:mod:`maml.training.fingerprint` at the end of training or by ``maml fingerprint``): geometry and intensity
ranges of the training cases, output ranges (liver volume, tumor burden), and per phase the mean and
(shrunk) precision of the deepest encoder features pooled per sliding window, with distance
thresholds taken from held-out cases. Each ``maml segment`` is checked against it in three places:

1. before anything heavy: geometry (spacing, field of view), intensity and the memory the run needs;
2. after inference: the Mahalanobis distance of the pooled features of every window that covers
   the body (their mean decides, their maximum warns), the distance-based detection of silent failures shown for nnU-Net by Gonzalez et al.
   (Medical Image Analysis 2022);
3. on the output: liver volume, liver pieces, tumor burden, number of tumors, liver intensity.

Each check is ``ok``, ``warning`` or ``refused``; the report takes the worst. A refused run writes
nothing and the command exits with code 3, unless the user accepts out-of-distribution input.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import OutOfDistributionError

FINGERPRINT_VERSION = 1
OK, WARNING, REFUSED = "ok", "warning", "refused"
_SEVERITY = {OK: 0, WARNING: 1, REFUSED: 2}
# Windows with less body than this are mostly air: their features say little about the anatomy.
MIN_BODY_FRACTION = 0.5
PERCENTILES = (5, 50, 95)

# Tolerances, as factors of the training range (geometry, output) or in HU (intensity). A warning
# asks the reader to look twice; a refusal is reserved for inputs far outside what the model saw.
# Voxels coarser than the coarsest training voxels by half again lose detail the model never had to
# do without (8 mm slices for a model trained up to 5 mm); finer ones are resampled to its grid.
SPACING_WARN, SPACING_REFUSE = (0.8, 1.2), (0.5, 1.5)
EXTENT_WARN, EXTENT_REFUSE = (0.5, 1.5), (0.2, 3.0)
LIVER_VOLUME_WARN, LIVER_VOLUME_REFUSE = (0.6, 1.5), (0.2, 3.0)
INTENSITY_WARN_HU, INTENSITY_REFUSE_HU = 60.0, 250.0
BURDEN_WARN, BURDEN_REFUSE = 1.5, 3.0  # factors of the training cases' largest tumor burden
LIVER_PIECES_WARN, LIVER_PIECES_REFUSE = 3, 8
# Tumors found, as factors of the most any training case had (at least TUMOR_COUNT_FLOOR): dozens of
# "tumors" from a model that never saw more than a handful are what a network does on an image
# unlike its training data (noise, another scanner), so they are refused; a few more only warn.
TUMOR_COUNT_WARN, TUMOR_COUNT_REFUSE = 1.5, 3.0
TUMOR_COUNT_FLOOR = 3
# Orientation: mm beyond the training range of "how far above the liver the air inside the body is".
AIR_OFFSET_WARN_MM, AIR_OFFSET_REFUSE_MM = 40.0, 100.0
MIN_INTERNAL_AIR_ML = 20.0
# Orientation whatever the training data: in patient coordinates the lungs lie above the liver, so
# internal air this far below the liver's centre means the header's head-foot axis is reversed.
AIR_BELOW_LIVER_REFUSE_MM = 20.0
# Feature distance: the mean over a case's body windows is stable from case to case and decides; its
# maximum (one odd window) only warns. Limits lie beyond the largest held-out mean by multiples of
# the held-out means' spread, so a model trained on varied data (wide spread) keeps a wide margin
# and a narrow one a narrow margin: a fixed factor of the largest value would let a uniformly
# distant input pass one model and a typical case fail another.
FEATURE_MEAN_WARN_SD, FEATURE_MEAN_REFUSE_SD = 1.5, 3.0
MIN_CALIBRATION_CASES = 5  # fewer held-out means give no usable spread: fixed factors instead
FEATURE_MEAN_WARN, FEATURE_MEAN_REFUSE = 1.25, 1.5
FEATURE_MAX_WARN = 1.5
MEMORY_HEADROOM = 0.85  # of the memory available now


@dataclass
class Check:
    name: str
    status: str
    value: Any
    threshold: Any
    message: str


@dataclass
class DomainReport:
    status: str
    checks: list[Check] = field(default_factory=list)
    sentence: str = ""
    accepted_out_of_distribution: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "sentence": self.sentence,
                "accepted_out_of_distribution": self.accepted_out_of_distribution,
                "checks": [asdict(check) for check in self.checks]}

    @property
    def problems(self) -> list[Check]:
        return sorted((c for c in self.checks if c.status != OK), key=lambda c: -_SEVERITY[c.status])


def worst(statuses: Sequence[str]) -> str:
    return max(statuses, key=_SEVERITY.__getitem__, default=OK)


# --------------------------------------------------------------------------------------------------
# Feature statistics
# --------------------------------------------------------------------------------------------------


def shrunk_covariance(samples: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrinkage of the sample covariance of (N, C) towards a scaled identity: well
    conditioned even with fewer windows than feature channels (Ledoit and Wolf 2004)."""
    x = np.asarray(samples, dtype=np.float64)
    n, c = x.shape
    x = x - x.mean(0)
    sample = x.T @ x / n
    target = np.trace(sample) / c * np.eye(c)
    delta = ((sample - target) ** 2).sum()
    # sum over samples of ||x x^T - S||^2, expanded so that no (C, C) matrix is made per sample
    norms = (x ** 2).sum(1)
    spread = ((norms ** 2).sum() - 2 * np.einsum("nc,cd,nd->", x, sample, x)
              + n * (sample ** 2).sum()) / n ** 2
    shrinkage = 1.0 if delta <= 0 else min(max(spread, 0.0), delta) / delta
    return (1 - shrinkage) * sample + shrinkage * target


def feature_statistics(samples: np.ndarray) -> dict[str, Any]:
    """Mean and precision (inverse shrunk covariance) of (N, C) pooled window features."""
    import torch

    samples = np.asarray(samples, dtype=np.float64)
    covariance = shrunk_covariance(samples)
    precision = np.linalg.pinv(covariance, hermitian=True)
    return {"mean": torch.from_numpy(samples.mean(0)), "precision": torch.from_numpy(precision),
            "windows": int(samples.shape[0])}


def mahalanobis(features: np.ndarray, statistics: Mapping[str, Any]) -> np.ndarray:
    """Distance of each row of (N, C) features to the training windows' distribution."""
    mean = np.asarray(statistics["mean"], dtype=np.float64)
    precision = np.asarray(statistics["precision"], dtype=np.float64)
    centred = np.asarray(features, dtype=np.float64) - mean
    return np.sqrt(np.maximum(np.einsum("nc,cd,nd->n", centred, precision, centred), 0.0))


def body_windows(body_fraction: np.ndarray | None, count: int) -> np.ndarray:
    """Indices of the windows that cover the body (all, when none does or no mask was given)."""
    if body_fraction is None or not np.isfinite(body_fraction).any():
        return np.arange(count)
    chosen = np.flatnonzero(np.nan_to_num(body_fraction) >= MIN_BODY_FRACTION)
    return chosen if chosen.size else np.array([int(np.nanargmax(body_fraction))])


def case_distances(window_features: np.ndarray, body_fraction: np.ndarray | None,
                   phases: Sequence[str], feature_stats: Mapping[str, Mapping]) -> dict[str, dict]:
    """Per phase: the maximum and mean feature distance over the windows that cover the body."""
    chosen = body_windows(body_fraction, len(window_features))
    result = {}
    for index, phase in enumerate(phases):
        if phase not in feature_stats:
            continue
        distances = mahalanobis(window_features[chosen, index], feature_stats[phase])
        result[phase] = {"max": float(distances.max()), "mean": float(distances.mean())}
    return result


# --------------------------------------------------------------------------------------------------
# Measurements shared by the fingerprint and the checks
# --------------------------------------------------------------------------------------------------


def geometry_of(image) -> dict[str, list[float]]:
    """Spacing and physical extent (z, y, x) in mm of a SimpleITK image."""
    spacing = list(image.GetSpacing())[::-1]
    size = list(image.GetSize())[::-1]
    return {"spacing_mm": spacing, "extent_mm": [s * n for s, n in zip(spacing, size)]}


def body_percentiles(values: np.ndarray, scheme: str) -> dict[str, float]:
    from .preprocessing import body_mask

    inside = np.asarray(values)[body_mask(values, scheme)]
    if inside.size == 0:
        inside = np.asarray(values).ravel()
    return percentiles_of(inside)


def percentiles_of(values: np.ndarray) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size > 2_000_000:  # a regular subsample: same percentiles, a fraction of the time
        values = values[:: values.size // 1_000_000]
    return {f"p{q:02d}": float(v) for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}


def label_volume_ml(labels: np.ndarray, values: Sequence[int], spacing_zyx: Sequence[float]) -> float:
    return float(np.isin(labels, list(values)).sum() * np.prod(spacing_zyx) / 1000.0)


def count_pieces(mask: np.ndarray, min_fraction: float = 0.02) -> int:
    """Connected components (26-connected) holding at least ``min_fraction`` of the mask."""
    import SimpleITK as sitk

    if not mask.any():
        return 0
    components = sitk.GetArrayFromImage(
        sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True))
    sizes = np.bincount(components.ravel())[1:]
    return int((sizes >= min_fraction * sizes.sum()).sum())


def internal_air_offset_mm(image, liver: np.ndarray) -> float | None:
    """How far (mm, towards the head) the air inside the body (the lungs) lies above the liver's
    centre: positive in a patient as scanned, negative in an image flipped head to foot. None for
    too little air inside the body or no liver. ``image`` in HU, ``liver`` a mask on its grid."""
    from scipy import ndimage

    from .preprocessing import BODY_HU

    if not liver.any():
        return None
    body = sitk_array(image) > BODY_HU
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]  # holes of each axial slice: the lungs
    air = ndimage.binary_fill_holes(body, in_plane) & ~body
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    if air.sum() * voxel_ml < MIN_INTERNAL_AIR_ML:
        return None

    def height(mask) -> float:
        centre = np.argwhere(mask).mean(0)[::-1]  # (x, y, z) index
        return float(image.TransformContinuousIndexToPhysicalPoint(centre.tolist())[2])

    return height(air) - height(liver)


def sitk_array(image) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image)


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimated_memory_bytes(reference, config, n_phases: int) -> int:
    """What a run needs at its peak: the model-grid accumulators (input channels, class
    probabilities, heatmaps, disagreement, weights) and the reference-grid outputs (probabilities,
    attention, uncertainty, labels and the registered phases), in float32."""
    geometry = geometry_of(reference)
    model_voxels = math.prod(max(1, math.ceil(e / s)) for e, s in zip(geometry["extent_mm"],
                                                                      config.spacing))
    input_voxels = math.prod(reference.GetSize())
    k = config.num_classes
    return 4 * (model_voxels * (2 * n_phases + k + 4) + input_voxels * (k + 2 * n_phases + 3))


# --------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------


def _range_check(name: str, value: float, low: float, high: float, warn: tuple[float, float],
                 refuse: tuple[float, float], unit: str, what: str) -> Check:
    refuse_range = [low * refuse[0], high * refuse[1]]
    warn_range = [low * warn[0], high * warn[1]]
    if not refuse_range[0] <= value <= refuse_range[1]:
        status = REFUSED
    elif not warn_range[0] <= value <= warn_range[1]:
        status = WARNING
    else:
        status = OK
    message = (f"{what} {value:.3g} {unit} (training cases {low:.3g}-{high:.3g} {unit})").replace(" )", ")")
    return Check(name, status, round(float(value), 4),
                 {"warning_outside": [round(v, 4) for v in warn_range],
                  "refused_outside": [round(v, 4) for v in refuse_range]}, message)


def check_geometry(images: Mapping[str, Any], fingerprint: Mapping) -> list[Check]:
    checks = []
    ranges = fingerprint["geometry"]
    for phase, image in images.items():
        geometry = geometry_of(image)
        for key, warn, refuse, what in (("spacing_mm", SPACING_WARN, SPACING_REFUSE, "voxel spacing"),
                                        ("extent_mm", EXTENT_WARN, EXTENT_REFUSE, "field of view")):
            low, high = ranges[key]["min"], ranges[key]["max"]
            for axis, name in enumerate("zyx"):
                checks.append(_range_check(f"{phase}.{key}.{name}", geometry[key][axis], low[axis],
                                           high[axis], warn, refuse, "mm",
                                           f"{phase} {what} along {name}"))
    return checks


def _intensity_check(name: str, value: float, low: float, high: float, what: str) -> Check:
    outside = max(low - value, value - high, 0.0)
    status = REFUSED if outside > INTENSITY_REFUSE_HU else WARNING if outside > INTENSITY_WARN_HU else OK
    return Check(name, status, round(value, 2),
                 {"training_range": [round(low, 2), round(high, 2)],
                  "warning_beyond_hu": INTENSITY_WARN_HU, "refused_beyond_hu": INTENSITY_REFUSE_HU},
                 f"{what} {value:.0f} (training cases {low:.0f} to {high:.0f})")


def check_intensity(images: Mapping[str, Any], fingerprint: Mapping, config) -> list[Check]:
    import SimpleITK as sitk

    checks = []
    for phase, image in images.items():
        known = fingerprint["intensity"].get(phase)
        if not known:
            continue
        scheme = config.normalization[phase]
        measured = body_percentiles(sitk.GetArrayViewFromImage(image), scheme)
        for key, value in measured.items():
            low, high = known["body"][key]
            checks.append(_intensity_check(f"{phase}.body_intensity.{key}", value, low, high,
                                           f"{phase} body intensity {key}"))
    return checks


def check_memory(reference, config, n_phases: int, available: int | None = None) -> Check:
    needed = estimated_memory_bytes(reference, config, n_phases)
    available = available_memory_bytes() if available is None else available
    if available is None:
        return Check("memory", OK, needed, None, f"needs about {needed / 1e9:.1f} GB")
    status = REFUSED if needed > MEMORY_HEADROOM * available else OK
    return Check("memory", status, needed, int(MEMORY_HEADROOM * available),
                 f"needs about {needed / 1e9:.1f} GB of memory, {available / 1e9:.1f} GB available")


def feature_mean_limits(stats: Mapping[str, Any]) -> tuple[float, float]:
    """(warning, refusal) limits of a case's mean feature distance, from the held-out cases' means:
    their largest plus multiples of their standard deviation, or fixed factors of the largest when
    too few cases were held out to measure a spread."""
    largest = float(stats["calibration_mean_limit"])
    held_out = np.asarray(stats.get("calibration_mean", []), dtype=np.float64)
    if held_out.size < MIN_CALIBRATION_CASES:
        return FEATURE_MEAN_WARN * largest, FEATURE_MEAN_REFUSE * largest
    spread = float(held_out.std(ddof=1))
    return largest + FEATURE_MEAN_WARN_SD * spread, largest + FEATURE_MEAN_REFUSE_SD * spread


def check_features(distances: Mapping[str, Mapping[str, float]], fingerprint: Mapping) -> list[Check]:
    checks = []
    for phase, measured in distances.items():
        stats = fingerprint["features"][phase]
        mean = measured["mean"]
        warn, refuse = feature_mean_limits(stats)
        status = REFUSED if mean > refuse else WARNING if mean > warn else OK
        checks.append(Check(f"{phase}.feature_distance.mean", status, round(mean, 2),
                            {"warning_above": round(warn, 2), "refused_above": round(refuse, 2)},
                            f"{phase} feature distance {mean:.1f}, threshold {refuse:.1f}"))
        largest, warn = measured["max"], FEATURE_MAX_WARN * float(stats["calibration_max_limit"])
        checks.append(Check(f"{phase}.feature_distance.max", WARNING if largest > warn else OK,
                            round(largest, 2), {"warning_above": round(warn, 2)},
                            f"{phase} feature distance of the most unusual window {largest:.1f}, "
                            f"threshold {warn:.1f}"))
    return checks


def check_output(labels: np.ndarray, spacing_zyx: Sequence[float], phases_on_reference: Mapping,
                 fingerprint: Mapping, liver: int, tumor: int) -> list[Check]:
    import SimpleITK as sitk

    output = fingerprint["output"]
    organ = np.isin(labels, [liver, tumor])
    volume = label_volume_ml(labels, [liver, tumor], spacing_zyx)
    low, high = output["liver_volume_ml"]
    checks = [_range_check("liver_volume_ml", volume, low, high, LIVER_VOLUME_WARN, LIVER_VOLUME_REFUSE,
                           "mL", "liver volume (with tumors)")]
    pieces = count_pieces(organ)
    status = (REFUSED if pieces >= LIVER_PIECES_REFUSE else WARNING if pieces >= LIVER_PIECES_WARN
              else OK)
    checks.append(Check("liver_pieces", status, pieces,
                        {"warning_from": LIVER_PIECES_WARN, "refused_from": LIVER_PIECES_REFUSE},
                        f"the liver comes in {pieces} separate pieces"))
    burden = float((labels == tumor).sum() / organ.sum()) if organ.any() else 0.0
    most = max(float(output["tumor_burden_max"]), 0.02)
    status = (REFUSED if burden > BURDEN_REFUSE * most else WARNING if burden > BURDEN_WARN * most
              else OK)
    checks.append(Check("tumor_burden", status, round(burden, 4),
                        {"warning_above": round(BURDEN_WARN * most, 4),
                         "refused_above": round(BURDEN_REFUSE * most, 4)},
                        f"tumor burden {100 * burden:.1f} % (training cases up to {100 * most:.1f} %)"))
    known_offset = output.get("internal_air_offset_mm")
    reference = next(iter(phases_on_reference.values()), None)
    if known_offset and reference is not None:
        offset = internal_air_offset_mm(reference, labels == liver)
        if offset is not None:
            low, high = known_offset
            outside = max(low - offset, offset - high, 0.0)
            status = (REFUSED if outside > AIR_OFFSET_REFUSE_MM or offset < -AIR_BELOW_LIVER_REFUSE_MM
                      else WARNING if outside > AIR_OFFSET_WARN_MM else OK)
            checks.append(Check("orientation.internal_air_above_liver_mm", status, round(offset, 1),
                                {"training_range": [round(low, 1), round(high, 1)],
                                 "warning_beyond_mm": AIR_OFFSET_WARN_MM,
                                 "refused_beyond_mm": AIR_OFFSET_REFUSE_MM,
                                 "refused_below_mm": -AIR_BELOW_LIVER_REFUSE_MM},
                                f"the air inside the body (lungs) lies {offset:.0f} mm above the "
                                f"liver (training cases {low:.0f} to {high:.0f} mm): is the image "
                                "flipped head to foot?"))
    if organ.sum() >= 100:
        for phase, image in phases_on_reference.items():
            known = fingerprint["intensity"].get(phase, {}).get("liver")
            if not known:
                continue
            value = float(np.median(sitk.GetArrayViewFromImage(image)[labels == liver]))
            lo, hi = known["p50"]
            checks.append(_intensity_check(f"{phase}.liver_intensity.p50", value, lo, hi,
                                           f"{phase} median intensity inside the found liver"))
    return checks


def tumor_count_limits(output: Mapping[str, Any]) -> tuple[int, int] | None:
    """(warn above, refused above) for the number of tumors, or None for a fingerprint made before
    the count was recorded."""
    if output.get("tumor_count_max") is None:
        return None
    most = max(int(output["tumor_count_max"]), TUMOR_COUNT_FLOOR)
    return math.floor(TUMOR_COUNT_WARN * most), math.floor(TUMOR_COUNT_REFUSE * most)


def check_tumor_count(count: int, fingerprint: Mapping) -> list[Check]:
    """The number of tumors listed (as the statistics count them) against the training cases'."""
    output = fingerprint["output"]
    limits = tumor_count_limits(output)
    if limits is None:
        return []
    warn, refuse = limits
    status = REFUSED if count > refuse else WARNING if count > warn else OK
    return [Check("tumor_count", status, int(count), {"warning_above": warn, "refused_above": refuse},
                  f"{count} tumors found (training cases had up to {int(output['tumor_count_max'])})")]


def fingerprint_summary(fingerprint: dict[str, Any] | None) -> dict[str, Any] | None:
    """The plain-data part of a fingerprint (no matrices): for ``maml info`` and the model card."""
    if not fingerprint:
        return None
    summary = {key: value for key, value in fingerprint.items() if key != "features"}
    summary["training_cases"] = len(fingerprint.get("training_cases", []))
    summary["calibration_cases"] = len(fingerprint.get("calibration_cases", []))
    summary["feature_distance_limits"] = {
        phase: _limits_summary(stats) for phase, stats in fingerprint.get("features", {}).items()}
    counts = tumor_count_limits(fingerprint.get("output", {}))
    if counts is not None:
        summary["tumor_count_limits"] = {"warning_above": counts[0], "refused_above": counts[1]}
    return summary


def _limits_summary(stats: Mapping[str, Any]) -> dict[str, Any]:
    warn, refuse = feature_mean_limits(stats)
    return {"max": round(stats["calibration_max_limit"], 3), "mean": round(stats["calibration_mean_limit"], 3),
            "mean_warning_above": round(warn, 3), "mean_refused_above": round(refuse, 3),
            "windows": stats["windows"], "channels": int(len(stats["mean"]))}


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def data_kind_words(data_kind: str | None) -> str:
    return {"synthetic": "synthetic phantoms only",
            "clinical": "clinical images"}.get(data_kind or "", "data of an unknown kind")


def missing_fingerprint_check(model_name: str, model_path: str | None) -> Check:
    where = model_path or "MODEL"
    return Check("fingerprint", WARNING, None, None,
                 f"model {model_name!r} carries no training fingerprint, so nothing checks whether "
                 f"this image resembles its training data (add one: maml fingerprint --model {where} "
                 f"--dataset TRAINING_DATA --write NEW_MODEL)")


def summarize(checks: Sequence[Check], model_name: str, data_kind: str | None,
              accept_out_of_distribution: bool) -> DomainReport:
    report = DomainReport(worst([c.status for c in checks]), list(checks))
    problems = report.problems
    if report.status == OK:
        report.sentence = (f"The image resembles the training data of {model_name} "
                           f"({len(checks)} checks passed).")
    elif report.status == WARNING:
        report.sentence = ("Caution: " + "; ".join(c.message for c in problems[:3])
                           + ". Check the result carefully before using it.")
    else:
        first = problems[0].message
        report.sentence = (f"{model_name} was trained on {data_kind_words(data_kind)} and this image "
                           f"lies outside its training data ({first})")
        if accept_out_of_distribution:
            report.status = WARNING
            report.accepted_out_of_distribution = True
            report.sentence += (": results written because out-of-distribution input was accepted; "
                                "do not trust them.")
        else:
            report.sentence += (": no result written. Use a model trained on images like this one, "
                                "or --accept-out-of-distribution to see the output anyway")
    return report


def raise_if_refused(report: DomainReport) -> None:
    if report.status == REFUSED:
        raise OutOfDistributionError(report.sentence)
