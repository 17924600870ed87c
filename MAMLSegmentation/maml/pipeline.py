"""The main job: phase images in, tumor segmentation, attention maps and statistics out.

read -> register onto the reference phase -> preprocess -> MAML inference -> labels, attention maps
and statistics in the reference phase's geometry -> files. The shell (`maml segment`), the Slicer
console and the Slicer GUI all run this one function (Slicer through the command line).
"""

from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import SimpleITK as sitk

from .config import DEFAULT_REGISTRATION, DEFAULT_REGISTRATION_ENGINE
from .errors import InputError, ModelError, RegistrationError
from .model import LoadedModel, load_model

# step name -> (start, end) of the overall fraction, roughly the time each step takes on a CPU
STEPS = {
    "load": (0.0, 0.05),
    "register": (0.05, 0.35),
    "inference": (0.35, 0.9),
    "statistics": (0.9, 0.95),
    "write": (0.95, 1.0),
}
DEFAULT_MODEL_NAME = "maml_liver_demo.pt"

ProgressCallback = Callable[[str, float, str], None]  # (step, overall fraction, message)


def default_model_path() -> Path:
    """The demo model bundled with the extension (``$MAML_MODEL`` overrides it)."""
    if os.environ.get("MAML_MODEL"):
        return Path(os.environ["MAML_MODEL"])
    return Path(__file__).resolve().parent.parent / "Resources" / "Models" / DEFAULT_MODEL_NAME


@dataclass
class SegmentOptions:
    registration: str = DEFAULT_REGISTRATION  # one of maml.config.REGISTRATION_PRESETS
    registration_engine: str = DEFAULT_REGISTRATION_ENGINE  # one of REGISTRATION_ENGINES
    reference: str | None = None  # default: "venous" when given, else the first given phase
    device: str = "auto"
    backend: str = "auto"  # one of maml.config.BACKENDS
    tta: bool = False  # mirroring test-time augmentation (8 flips: slower, slightly better)
    overlap: float | None = None  # of the sliding windows; None: the model's own
    batch_size: int = 2
    # Phases that stay dissimilar after registration are most likely of different patients (or
    # scans): refused unless the user says otherwise.
    allow_poor_registration: bool = False
    postprocess: bool = True  # the model's own post-processing (maml.postprocessing)
    # Write results even when the image lies outside the model's training data (maml.domain);
    # the domain check then says "warning" and why.
    accept_out_of_distribution: bool = False
    # Also write segmentation.dcm (maml.dicomseg), referencing the reference phase's DICOM series
    # (read from a DICOM folder, or the folder dicom_source the phase's file was exported from).
    dicom_seg: bool = False
    dicom_source: str | None = None


@dataclass
class SegmentationResult:
    """Everything in the reference phase's geometry."""

    labels: sitk.Image
    attention: dict[str, sitk.Image]
    uncertainty: sitk.Image | None
    phases_on_reference: dict[str, sitk.Image]  # every given phase on the reference grid
    transforms: dict[str, sitk.Transform]  # moving phase -> transform (reference point -> phase point)
    reference: str
    stats: dict[str, Any]
    label_names: dict[int, str] = field(default_factory=dict)
    dicom_source_files: list[str] = field(default_factory=list)  # for segmentation.dcm when asked


class _Reporter:
    def __init__(self, progress: ProgressCallback | None):
        self.progress = progress
        self.timings: dict[str, float] = {}
        self._started: dict[str, float] = {}

    def __call__(self, step: str, fraction: float = 0.0, message: str = "") -> None:
        self._started.setdefault(step, time.perf_counter())
        start, end = STEPS[step]
        if self.progress is not None:
            self.progress(step, start + (end - start) * min(max(fraction, 0.0), 1.0), message or step)

    def done(self, step: str) -> None:
        self.timings[step] = round(time.perf_counter() - self._started.pop(step, time.perf_counter()), 3)


def resolve_model(model: LoadedModel | str | Path | None, device: str = "cpu",
                  lazy: bool = False) -> LoadedModel:
    """The model given (or the bundled one). ``lazy``: its network loaded only when used (see
    :func:`maml.model.load_model`), for a backend that may not need it."""
    if isinstance(model, LoadedModel):
        return model
    if model is None:
        path = default_model_path()
        if not path.is_file():
            raise ModelError(f"no model given and the bundled demo model {path} is missing: pass --model")
        return load_model(path, device, lazy)
    from .models import resolve_model as installed_or_file

    return load_model(installed_or_file(model), device, lazy)


def choose_reference(given: list[str], model_phases: list[str], reference: str | None) -> str:
    if reference is not None:
        if reference not in given:
            raise InputError(f"reference phase {reference!r} is not among the given phases {given}")
        return reference
    if "venous" in given:
        return "venous"
    return [p for p in model_phases if p in given][0]


def check_registration(quality: dict, phase: str, reference: str, allow_poor: bool) -> None:
    from .registration import MIN_NMI_AFTER

    after = quality.get("after")
    if quality.get("preset") == "none":
        return  # the user says the phases are aligned already; the quality report still warns
    if not allow_poor and after is not None and after < MIN_NMI_AFTER:
        raise RegistrationError(
            f"the {phase} phase stays dissimilar to the {reference} phase after registration "
            f"(normalised mutual information {after:.3f} < {MIN_NMI_AFTER}): are they of the same "
            f"patient and scan? (--allow-poor-registration segments anyway)")


def segment(
    images: Mapping[str, sitk.Image | str | Path],
    model: LoadedModel | str | Path | None = None,
    options: SegmentOptions | None = None,
    progress: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
) -> SegmentationResult:
    """Segment one case. ``images`` maps phase names to images or paths; any phase may be missing."""
    from .attention import attention_windows
    from .backends import resolve_engine
    from .inference import predict_case
    from .io import read_image
    from .registration import register
    from .stats import add_enhancement, add_tumor_means, compute_statistics

    options = options or SegmentOptions()
    report = _Reporter(progress)
    report("load", 0.0, "loading the model and images")
    device, backend = resolve_engine(options.device, options.backend)
    loaded = resolve_model(model, device, lazy=backend == "openvino")
    config = loaded.config
    if not images:
        raise InputError(f"no phase images given; model {config.name!r} takes {config.phases}")
    unknown = [p for p in images if p not in config.phases]
    if unknown:
        raise InputError(f"phase(s) {unknown} are not phases of model {config.name!r}: {config.phases}")
    phases = {name: (image if isinstance(image, sitk.Image) else read_image(image, f"phase {name!r}"))
              for name, image in images.items()}
    reference = choose_reference(list(phases), config.phases, options.reference)
    dicom_source = _dicom_source(options, phases[reference], reference)  # refused before the work
    checks = check_input(loaded, phases, reference, options)
    report.done("load")

    on_reference = {reference: phases[reference]}
    transforms, quality = {}, {}
    moving = [p for p in phases if p != reference]
    report("register", 0.0, f"registering onto the {reference} phase")
    for index, phase in enumerate(moving):
        def stage(fraction: float, message: str, index=index, phase=phase) -> None:
            report("register", (index + fraction) / len(moving), f"{phase}: {message}")

        result = register(phases[reference], phases[phase], options.registration,
                          progress=stage, cancel=cancel, engine=options.registration_engine)
        check_registration(result.quality, phase, reference, options.allow_poor_registration)
        on_reference[phase] = result.registered
        transforms[phase] = result.transform
        quality[phase] = result.quality
    report.done("register")

    report("inference", 0.0, "MAML inference")
    prediction = predict_case(
        loaded, on_reference, mirror=options.tta, device=str(device), batch_size=options.batch_size,
        overlap=options.overlap,
        progress=lambda f: report("inference", f, "MAML inference"), cancel=cancel,
        postprocess=options.postprocess, backend=backend)
    attention = mask_attention_outside_body(prediction.attention, on_reference[reference], config)
    report.done("inference")

    report("statistics", 0.0, "tumor statistics")
    label_names = {label.value: label.name for label in config.labels}
    values = {label.name: label.value for label in config.labels}
    stats = compute_statistics(prediction.labels, liver_label=values.get("liver", 1),
                               tumor_label=values.get("tumor", 2), label_names=label_names)
    add_tumor_means(stats, prediction.labels, prediction.uncertainty, "mean_uncertainty")
    add_enhancement(stats, prediction.labels, on_reference)
    stats["attention_window"] = attention_windows(attention, prediction.labels)
    report.done("statistics")
    domain = check_result(loaded, prediction, on_reference, checks, options, stats["tumor_count"])
    stats.update({
        "reference_phase": reference,
        "phases": list(phases),
        "head": prediction.head,
        "postprocessing": (asdict(config.postprocessing) if options.postprocess else None),
        "domain_check": domain.to_dict(),
        "registration": {"preset": options.registration, "engine": options.registration_engine,
                         "phases": quality},
        "device": device if device == "cpu" else f"{device} ({_gpu_name()})",
        "backend": prediction.backend,
        "model": {
            "name": config.name, "path": str(loaded.path) if loaded.path else None,
            "sha256": loaded.sha256, "phases": config.phases,
            "labels": [{"value": l.value, "name": l.name, "color": list(l.color)} for l in config.labels],
            "intended_use": config.intended_use,
            "data_kind": model_data_kind(loaded),
        },
        "host": platform.node(),
        "timings": dict(report.timings),
    })
    return SegmentationResult(prediction.labels, attention, prediction.uncertainty, on_reference,
                              transforms, reference, stats, label_names, dicom_source)


def _dicom_source(options: SegmentOptions, reference_image: sitk.Image, reference: str) -> list[str]:
    if not options.dicom_seg:
        return []
    from .dicomseg import dicom_source_files

    return dicom_source_files(reference_image, reference, options.dicom_source)


def model_data_kind(loaded: LoadedModel) -> str | None:
    fingerprint = loaded.metadata.get("fingerprint") or {}
    return loaded.metadata.get("data_kind") or fingerprint.get("data_kind")


def check_input(loaded: LoadedModel, phases: Mapping[str, sitk.Image], reference: str,
                options: SegmentOptions) -> list:
    """The checks made before any heavy work (maml.domain): geometry and intensity against the
    training fingerprint, refused at once when far outside it, then the memory the run needs."""
    from . import domain

    config, fingerprint = loaded.config, loaded.metadata.get("fingerprint")
    if fingerprint:
        checks = domain.check_geometry(phases, fingerprint) + domain.check_intensity(
            phases, fingerprint, config)
    else:
        checks = [domain.missing_fingerprint_check(config.name,
                                                   str(loaded.path) if loaded.path else None)]
    early = domain.summarize(checks, config.name, model_data_kind(loaded),
                             options.accept_out_of_distribution)
    domain.raise_if_refused(early)
    memory = domain.check_memory(phases[reference], config, len(phases))
    if memory.status == domain.REFUSED:
        raise InputError(f"phase {reference!r}: segmenting it {memory.message}; check the voxel "
                         "spacing in its header, or crop the image to the abdomen")
    return checks + [memory]


def check_result(loaded: LoadedModel, prediction, on_reference: Mapping[str, sitk.Image],
                 checks: list, options: SegmentOptions, tumor_count: int):
    """The input checks, plus the feature distance of every window that covers the body and the
    plausibility of the output (``tumor_count``: the tumors the statistics list); raises
    OutOfDistributionError when refused (nothing is written)."""
    from . import domain

    config, fingerprint = loaded.config, loaded.metadata.get("fingerprint")
    checks = list(checks)
    if fingerprint:
        values = {label.name: label.value for label in config.labels}
        distances = domain.case_distances(prediction.window_features, prediction.window_body_fraction,
                                          prediction.phases, fingerprint["features"])
        checks += domain.check_features(distances, fingerprint)
        labels = sitk.GetArrayViewFromImage(prediction.labels)
        spacing = prediction.labels.GetSpacing()[::-1]
        checks += domain.check_output(labels, spacing, on_reference, fingerprint,
                                      values.get("liver", 1), values.get("tumor", 2))
        checks += domain.check_tumor_count(tumor_count, fingerprint)
    report = domain.summarize(checks, config.name, model_data_kind(loaded),
                              options.accept_out_of_distribution)
    domain.raise_if_refused(report)
    return report


def mask_attention_outside_body(attention: dict[str, sitk.Image], reference_image: sitk.Image,
                                config) -> dict[str, sitk.Image]:
    """Attention maps set to 0 in air (reference phase below BODY_HU), for CT models only.

    Normalisation clips air and fat to one value, so there the network sees a constant input and its
    attention is an artefact (stripes from the upsampling) that would distract in a heatmap."""
    from .preprocessing import BODY_HU

    if not attention or any(config.normalization[p] not in ("ct", "ct_dataset") for p in attention):
        return attention
    air = sitk.GetArrayFromImage(reference_image) < BODY_HU
    masked = {}
    for phase, image in attention.items():
        values = sitk.GetArrayFromImage(image)
        values[air] = 0.0
        out = sitk.GetImageFromArray(values)
        out.CopyInformation(image)
        masked[phase] = out
    return masked


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def write_result(result: SegmentationResult, out_dir: str | Path, overview: bool = True,
                 progress: ProgressCallback | None = None) -> Path:
    """Writes every output at once: a half-finished or failed write leaves nothing behind."""
    from .io import atomic_output_dir, write_image, write_json
    from .overview import write_overview
    from .registration import write_transform

    report = _Reporter(progress)
    report("write", 0.0, f"writing results to {out_dir}")
    images = {"segmentation.nii.gz": result.labels, "uncertainty.nii.gz": result.uncertainty,
              **{f"attention_{phase}.nii.gz": heatmap for phase, heatmap in result.attention.items()},
              **{f"{phase}_registered.nii.gz": result.phases_on_reference[phase] for phase in result.transforms}}
    images = {name: image for name, image in images.items() if image is not None}
    with atomic_output_dir(out_dir) as folder:
        # Compressing a full-size float volume takes seconds and SimpleITK releases the GIL while it
        # writes: the images go out side by side, while this thread draws the overview.
        with ThreadPoolExecutor(max_workers=max(1, min(len(images), os.cpu_count() or 1))) as pool:
            written = [pool.submit(write_image, image, folder / name) for name, image in images.items()]
            if result.dicom_source_files:
                _write_dicom_seg(result, folder / "segmentation.dcm")
            for phase, transform in result.transforms.items():
                write_transform(transform, folder / f"transform_{phase}.h5")
            if overview:
                report("write", 0.5, "drawing the overview picture")
                write_overview(folder / "overview.png", result.phases_on_reference, result.labels,
                               result.attention or None, result.stats, label_names=result.label_names)
            for future in written:
                future.result()  # the first failure, if any, fails the whole write
        report.done("write")
        result.stats["timings"].update(report.timings)
        write_json(result.stats, folder / "stats.json")
    return Path(out_dir)


def _write_dicom_seg(result: SegmentationResult, path: Path) -> None:
    from .dicomseg import write_dicom_seg

    labels = result.stats.get("model", {}).get("labels", [])
    colors = {label["name"]: label["color"] for label in labels if "color" in label}
    write_dicom_seg(result.labels, result.dicom_source_files, path,
                    {"liver": result.stats["liver_label"], "tumor": result.stats["tumor_label"]}, colors)
