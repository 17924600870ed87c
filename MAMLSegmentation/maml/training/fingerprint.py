"""The training fingerprint a checkpoint carries, computed from its training data.

``maml train`` adds it at the end of training; ``maml fingerprint`` adds it to an existing
checkpoint. What it holds and how :mod:`maml.domain` uses it is described there. Feature statistics
come from the same sliding-window pass as ``maml segment`` (the same windows, padding and network),
so a distance measured at inference is comparable with those measured here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..domain import (FINGERPRINT_VERSION, body_percentiles, body_windows, case_distances,
                     feature_statistics, geometry_of, internal_air_offset_mm, label_volume_ml,
                     mahalanobis, percentiles_of)
from ..config import DEFAULT_OVERLAP
from ..errors import InputError
from ..model import LoadedModel


DATA_KINDS = ("synthetic", "clinical")


def dataset_data_kind(dataset_root: str | Path) -> str:
    """``data_kind`` of a raw data set: its dataset.json's entry (phantoms say "synthetic"), else
    "clinical"."""
    import json

    try:
        meta = json.loads((Path(dataset_root) / "dataset.json").read_text())
    except (OSError, ValueError):
        return "clinical"
    kind = meta.get("data_kind", "clinical")
    return kind if kind in DATA_KINDS else "clinical"


def _raw_geometries(dataset, case: str) -> list[dict]:
    import SimpleITK as sitk

    geometries = []
    for path in dataset.image_files(case):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        spacing, size = reader.GetSpacing()[::-1], reader.GetSize()[::-1]
        geometries.append({"spacing_mm": list(spacing),
                           "extent_mm": [s * n for s, n in zip(spacing, size)]})
    return geometries


def fingerprint_overlap(config) -> float:
    """Windows overlap by at least half a patch while the fingerprint is measured, whatever the
    model's own overlap: with a quarter the bundled model's training statistics came from 454
    windows instead of 1,051 and its feature distance refused 2 of the 7 unlike inputs instead of 4
    (``benchmarks/domain_check.py``; unseen phantoms passed either way, 2026-11-30)."""
    return max(float(config.inference.overlap), DEFAULT_OVERLAP)


def measure_case(model: LoadedModel, dataset, case: str, register: str | None,
                 device: str = "cpu") -> dict[str, Any]:
    """Everything the fingerprint pools from one case: raw geometry per phase, intensities in the
    body, the foreground and the liver, liver volume, tumor count and burden from the label map, and the
    pooled bottleneck features of every window."""
    import SimpleITK as sitk

    from .dataset import load_case_images
    from ..inference import SlidingWindowOptions, padding_of, window_alignment, window_bottleneck_features
    from ..preprocessing import preprocess_phases
    from ..stats import count_tumors

    config = model.config
    images, label = load_case_images(dataset, config, case, register)
    labels = sitk.GetArrayFromImage(label)
    liver = dataset.labels.get("liver", 1)
    tumor = dataset.labels.get("tumor", 2)
    spacing = geometry_of(label)["spacing_mm"]
    organ_ml = label_volume_ml(labels, [liver, tumor], spacing)
    intensity = {}
    for phase, image in images.items():
        values = sitk.GetArrayViewFromImage(image)
        intensity[phase] = {
            "body": body_percentiles(values, config.normalization[phase]),
            "foreground": percentiles_of(values[labels > 0]) if (labels > 0).any() else None,
            "liver": percentiles_of(values[labels == liver]) if (labels == liver).any() else None,
        }
    reference = images[config.phases[-1]]  # the venous phase of a two-phase model, as at inference
    air_offset = (internal_air_offset_mm(reference, labels == liver)
                  if config.normalization[config.phases[-1]] in ("ct", "ct_dataset") else None)
    case_input = preprocess_phases(images, config)
    features, body_fraction = window_bottleneck_features(
        model.network, case_input.data, case_input.phases,
        SlidingWindowOptions(config.patch_size, overlap=fingerprint_overlap(config), device=device,
                             align=window_alignment(config), pad_with=padding_of(config)),
        body=case_input.body)
    return {
        "case": case,
        "geometry": _raw_geometries(dataset, case),
        "intensity": intensity,
        "liver_volume_ml": organ_ml,
        "internal_air_offset_mm": air_offset,
        "tumor_count": count_tumors(label, tumor),
        "tumor_burden": float((labels == tumor).sum() / max((np.isin(labels, [liver, tumor])).sum(), 1)),
        "features": features,
        "body_fraction": body_fraction,
        "phases": case_input.phases,
    }


def _range(values: Sequence[float]) -> list[float]:
    return [float(np.min(values)), float(np.max(values))]


def build_fingerprint(train: Sequence[dict], calibration: Sequence[dict], phases: Sequence[str],
                      data_kind: str, dataset_name: str) -> dict[str, Any]:
    """Pools case measurements (:func:`measure_case`) into the fingerprint.

    Feature mean and precision come from the training cases' body windows; the distance limits from
    the calibration (held-out) cases, or from the training cases when there are none (then the
    limits are optimistic, and the fingerprint says so).
    """
    if not train:
        raise InputError("a fingerprint needs at least one training case")
    cases = [*train, *calibration]
    spacings = np.array([g["spacing_mm"] for c in cases for g in c["geometry"]])
    extents = np.array([g["extent_mm"] for c in cases for g in c["geometry"]])
    geometry = {"spacing_mm": {"min": spacings.min(0).tolist(), "max": spacings.max(0).tolist()},
                "extent_mm": {"min": extents.min(0).tolist(), "max": extents.max(0).tolist()}}
    intensity = {}
    for phase in phases:
        entry = {}
        for region in ("body", "foreground", "liver"):
            measured = [c["intensity"][phase][region] for c in cases if c["intensity"][phase][region]]
            if measured:
                entry[region] = {key: _range([m[key] for m in measured]) for key in measured[0]}
        intensity[phase] = entry
    features, limits_from = {}, "calibration cases" if calibration else "training cases"
    for index, phase in enumerate(phases):
        pooled = np.concatenate([c["features"][body_windows(c["body_fraction"], len(c["features"])),
                                               index] for c in train])
        stats = feature_statistics(pooled)
        held_out = [case_distances(c["features"], c["body_fraction"], phases, {phase: stats})[phase]
                    for c in (calibration or train)]
        stats.update({
            "training_distance_p99": float(np.percentile(mahalanobis(pooled, stats), 99)),
            "calibration_max": [round(d["max"], 3) for d in held_out],
            "calibration_mean": [round(d["mean"], 3) for d in held_out],
            "calibration_max_limit": float(max(d["max"] for d in held_out)),
            "calibration_mean_limit": float(max(d["mean"] for d in held_out)),
        })
        features[phase] = stats
    offsets = [c["internal_air_offset_mm"] for c in cases if c.get("internal_air_offset_mm") is not None]
    output = {"liver_volume_ml": _range([c["liver_volume_ml"] for c in cases]),
              "tumor_burden_max": float(max(c["tumor_burden"] for c in cases)),
              "tumor_count_max": int(max(c["tumor_count"] for c in cases)),
              # only when most cases show air inside the body: else the FOVs vary too much to judge
              "internal_air_offset_mm": _range(offsets) if len(offsets) >= 0.8 * len(cases) else None}
    return {
        "version": FINGERPRINT_VERSION,
        "data_kind": data_kind,
        "dataset": dataset_name,
        "training_cases": [c["case"] for c in train],
        "calibration_cases": [c["case"] for c in calibration],
        "limits_from": limits_from,
        "geometry": geometry,
        "intensity": intensity,
        "output": output,
        "features": features,
    }


def compute_fingerprint(model: LoadedModel, dataset_dir: str | Path, train_cases: Sequence[str],
                        calibration_cases: Sequence[str], register: str | None = None,
                        calibration_dataset_dir: str | Path | None = None,
                        calibration_register: str | None = None, data_kind: str | None = None,
                        device: str = "cpu",
                        progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """The fingerprint of ``model`` from its training cases, with distance limits from
    ``calibration_cases`` of the same data set and every case of ``calibration_dataset_dir``."""
    from .dataset import read_dataset

    dataset = read_dataset(dataset_dir)
    jobs = [(dataset, case, register, "train") for case in train_cases]
    jobs += [(dataset, case, register, "calibration") for case in calibration_cases]
    if calibration_dataset_dir is not None:
        extra = read_dataset(calibration_dataset_dir)
        jobs += [(extra, case, calibration_register, "calibration") for case in extra.cases]
    measured: dict[str, list[dict]] = {"train": [], "calibration": []}
    for done, (source, case, how, role) in enumerate(jobs):
        if progress is not None:
            progress(case, done, len(jobs))
        measured[role].append(measure_case(model, source, case, how, device))
    if progress is not None:
        progress("", len(jobs), len(jobs))
    kind = data_kind or dataset_data_kind(dataset_dir)
    return build_fingerprint(measured["train"], measured["calibration"], model.config.phases, kind,
                             dataset.name)
