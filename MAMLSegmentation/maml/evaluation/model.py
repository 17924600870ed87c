"""A model on an nnU-Net raw data set: every head (fused and each phase alone) segments every case and
is scored, the paper's Tables 1 and 2; the "ensemble" head (the mean of the phase heads'
probabilities) scores a model trained as the paper's MS+Ensemble."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import InputError
from .folders import case_rows, resolve_lesion_label
from .metrics import DEFINITIONS
from .results import EvaluationResult, result_paths

ENSEMBLE_HEAD = "ensemble"


def evaluate_model(model_path: str | Path, dataset_dir: str | Path, register: str | None = "deformable",
                   heads: Sequence[str] | None = None, predictions_dir: str | Path | None = None,
                   device: str = "auto", progress: bool = False, postprocess: bool = True,
                   backend: str = "auto", lesion_label: str | None = None,
                   overlap: float | None = None) -> dict[str, EvaluationResult]:
    """Segments every case of an nnU-Net raw data set with a model and scores each head.

    Heads: "fused" (all phases) and each phase alone (the model's own head for that phase, as when a
    phase is missing), the paper's Tables 1 and 2; "ensemble" (asked for by name): the mean of the
    phase heads' probabilities, each head seeing its own phase, then the model's post-processing
    (the paper's MS+Ensemble, e.g. a model trained with ``--joint-weight 0``). Phases not on the label map's grid are aligned
    first (``register``: a :mod:`maml.registration` preset, "transforms" for the data set's
    transform files, or None to reject them); predictions are made on that grid and compared with
    the label map there. ``predictions_dir``: also write HEAD/CASE.nii.gz label maps.
    ``postprocess``: apply the model's post-processing (off: the raw labels, e.g. to tune it).
    ``backend``: auto, torch or openvino (:mod:`maml.backends`). ``lesion_label``: the label scored
    lesion by lesion (default: the model's label named tumor, if any).
    """
    import SimpleITK as sitk

    from ..backends import resolve_engine
    from ..training.dataset import load_case_images, read_dataset
    from ..inference import predict_case
    from ..model import load_model

    resolve_engine(device, backend)  # a wrong or missing backend fails before the first case
    model = load_model(model_path)
    dataset = read_dataset(dataset_dir)
    if len(dataset.channel_names) != len(model.config.phases):
        raise InputError(f"data set {dataset.root} has {len(dataset.channel_names)} channels; model "
                         f"{model.config.name!r} takes phases {model.config.phases}")
    heads = list(heads) if heads else ["fused", *model.config.phases]
    for head in heads:
        if head == ENSEMBLE_HEAD and len(model.config.phases) < 2:
            raise InputError(f"head {ENSEMBLE_HEAD!r} averages the phase heads of a model with two "
                             f"or more phases; model {model.config.name!r} has {model.config.phases}")
        if head not in ("fused", ENSEMBLE_HEAD) and head not in model.config.phases:
            raise InputError(f"head {head!r} is neither 'fused', {ENSEMBLE_HEAD!r} nor one of the "
                             f"model's phases {model.config.phases}")
    labels = {label.name: label.value for label in model.config.labels if label.value != 0}
    lesions = resolve_lesion_label(labels, lesion_label)
    rows: dict[str, list[dict]] = {head: [] for head in heads}
    iterator = dataset.cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(dataset.cases, desc="evaluate model", unit="case")
    keep = ENSEMBLE_HEAD in heads
    for case in iterator:
        # load_case_images maps channel k to phase k of the configuration it is given
        images, label = load_case_images(dataset, model.config, case, register)
        predictions = {}
        # the phase heads first: the ensemble reuses their probabilities
        for head in sorted(heads, key=lambda h: h == ENSEMBLE_HEAD):
            if head == ENSEMBLE_HEAD:
                for phase in model.config.phases:
                    if phase not in predictions:
                        predictions[phase] = predict_case(
                            model, {phase: images[phase]}, device=device, postprocess=postprocess,
                            backend=backend, overlap=overlap, keep_probabilities=True)
                labels_image = ensemble_labels(model, [predictions[p] for p in model.config.phases],
                                               postprocess)
            else:
                inputs = images if head == "fused" else {head: images[head]}
                predictions[head] = predict_case(model, inputs, device=device, postprocess=postprocess,
                                                 backend=backend, overlap=overlap,
                                                 keep_probabilities=keep and head != "fused")
                labels_image = predictions[head].labels
            if predictions_dir is not None:
                path = Path(predictions_dir) / head / f"{case}{dataset.file_ending}"
                path.parent.mkdir(parents=True, exist_ok=True)
                sitk.WriteImage(labels_image, str(path), True)
            rows[head].extend(case_rows(case, labels_image, label, labels, lesions))
    return {head: EvaluationResult.from_rows(labels, rows[head], lesions) for head in heads}


def ensemble_labels(model, phase_predictions: Sequence, postprocess: bool):
    """The label image of the mean of the phase heads' probabilities (each a CasePrediction with
    probabilities, on one grid), post-processed as the model's other heads are."""
    import numpy as np
    import SimpleITK as sitk

    from ..preprocessing import labels_from_probabilities

    mean = np.mean([p.probabilities for p in phase_predictions], axis=0)
    label_array = labels_from_probabilities(mean)
    if postprocess and not model.config.postprocessing.is_identity:
        from ..postprocessing import postprocess as apply_postprocessing

        reference = phase_predictions[0].labels
        spacing_zyx = tuple(reversed(reference.GetSpacing()))
        label_array = apply_postprocessing(label_array, spacing_zyx, model.config)
    image = sitk.GetImageFromArray(label_array)
    image.CopyInformation(phase_predictions[0].labels)
    return image


def write_model_results(results: Mapping[str, EvaluationResult], out: str | Path,
                        info: Mapping | None = None) -> list[Path]:
    """OUT.json ({"heads": {head: result}}), OUT.csv and, when lesions were scored,
    OUT_lesions.csv (both with a head column first); returns the paths written."""
    from ..io import write_text_atomic  # lazily: SimpleITK stays unloaded for pure scoring

    json_path, csv_path, lesions_path = result_paths(out)
    payload = {"definitions": DEFINITIONS, **(dict(info) if info else {}),
               "heads": {head: {k: v for k, v in result.to_dict().items() if k != "definitions"}
                         for head, result in results.items()}}
    write_text_atomic(json_path, json.dumps(payload, indent=2))
    write_text_atomic(csv_path, _with_head_column({h: r.csv_text() for h, r in results.items()}))
    if all(result.lesion_label is None for result in results.values()):
        return [json_path, csv_path]
    write_text_atomic(lesions_path, _with_head_column({h: r.lesion_csv_text() for h, r in results.items()}))
    return [json_path, csv_path, lesions_path]


def _with_head_column(texts: Mapping[str, str]) -> str:
    """CSV texts with the same header, one per head, as one CSV with a head column first."""
    lines = []
    for index, (head, text) in enumerate(texts.items()):
        rows = text.splitlines()
        if index == 0:
            lines.append("head," + rows[0])
        lines += [f"{head},{line}" for line in rows[1:]]
    return "\n".join(lines) + "\n"
