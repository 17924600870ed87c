"""Training data: nnU-Net v2 raw data sets, the preprocessing cache, patch sampling, augmentation.

Layout read (nnU-Net v2 raw): ``DATASET/dataset.json`` (``channel_names`` {"0": name, ...},
``labels`` {name: value}, ``file_ending``), ``imagesTr/CASE_XXXX<ending>`` (one file per channel),
``labelsTr/CASE<ending>``. Channel k is the phase named by ``channel_names[k]``.

Cache (``OUT/preprocessed``): per case ``CASE.npy`` (float32 (P, z, y, x), resampled to the model
spacing and normalised by :func:`maml.preprocessing.preprocess_phases`), ``CASE_seg.npy`` (uint8
(z, y, x) labels on the same grid), ``CASE_fg.npz`` (sampled voxel coordinates per foreground class)
and ``CASE.json`` (grids and the source files' sizes and times, to notice a changed input).
``plan.json`` records what the cache was made for; a different plan rebuilds it.

Patch sampling is a pure function of (seed, epoch, rank, index): an item is the same whatever the
number of loader workers, a resumed run replays exactly, and ranks of a distributed run draw
different patches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import NORMALIZATION_SCHEMES, Label, ModelConfig
from ..errors import InputError
from ..io import atomic_path, write_text_atomic


CACHE_VERSION = 1
MAX_FOREGROUND_SAMPLES = 10000  # per class and case, as nnU-Net
CHANNEL_NAME_NORMALIZATION = {"ct": "ct_dataset", "nonorm": "none", "zscore": "mr", "mr": "mr", "t1": "mr",
                              "t2": "mr", "flair": "mr", "t1ce": "mr", "t1gd": "mr"}


# --------------------------------------------------------------------------------------------------
# The raw data set
# --------------------------------------------------------------------------------------------------


@dataclass
class RawDataset:
    root: Path
    name: str
    channel_names: list[str]  # as written in dataset.json, channel order
    labels: dict[str, int]  # name -> value, sorted by value
    file_ending: str
    cases: list[str]  # sorted case ids that have a label file

    def image_files(self, case: str) -> list[Path]:
        return [self.root / "imagesTr" / f"{case}_{c:04d}{self.file_ending}"
                for c in range(len(self.channel_names))]

    def label_file(self, case: str) -> Path:
        return self.root / "labelsTr" / f"{case}{self.file_ending}"


def read_dataset(root: str | Path) -> RawDataset:
    """Reads dataset.json and lists the training cases; any missing file is an error naming it."""
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise InputError(f"data set {root}: no dataset.json (an nnU-Net v2 raw data set is expected)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read {meta_path}: {error}") from error
    channels = meta.get("channel_names", meta.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise InputError(f"{meta_path}: 'channel_names' must map channel numbers to names")
    try:
        order = sorted(channels, key=int)
    except ValueError:
        raise InputError(f"{meta_path}: channel_names keys must be numbers, got {sorted(channels)}") from None
    if [int(k) for k in order] != list(range(len(order))):
        raise InputError(f"{meta_path}: channel numbers must be 0..{len(order) - 1}, got {order}")
    labels_raw = meta.get("labels")
    if not isinstance(labels_raw, dict) or not labels_raw:
        raise InputError(f"{meta_path}: 'labels' must map label names to values")
    labels = {}
    for name, value in labels_raw.items():
        if isinstance(value, (list, tuple)):
            raise InputError(f"{meta_path}: label {name!r} is a region ({value}); region-based "
                             "training is not supported, give one value per label")
        try:
            labels[str(name)] = int(value)
        except (TypeError, ValueError):
            raise InputError(f"{meta_path}: label {name!r} has a non-integer value {value!r}") from None
    labels = dict(sorted(labels.items(), key=lambda item: item[1]))
    if sorted(labels.values()) != list(range(len(labels))) or len(labels) < 2:
        raise InputError(f"{meta_path}: label values must be 0..N-1 (0 background), got "
                         f"{sorted(labels.values())}")
    ending = str(meta.get("file_ending", ".nii.gz"))
    labels_dir = root / "labelsTr"
    if not labels_dir.is_dir():
        raise InputError(f"data set {root}: no labelsTr folder")
    cases = sorted(p.name[: -len(ending)] for p in labels_dir.iterdir()
                   if p.name.endswith(ending) and not p.name.startswith("."))
    if not cases:
        raise InputError(f"data set {root}: labelsTr has no {ending} files")
    dataset = RawDataset(root, str(meta.get("name", root.name)), [str(channels[k]) for k in order],
                         labels, ending, cases)
    for case in cases:
        for path in dataset.image_files(case):
            if not path.is_file():
                raise InputError(f"data set {root}: case {case!r} has no image {path.name} in imagesTr")
    return dataset


def phase_names(dataset: RawDataset) -> list[str]:
    """Phase names from the channel names; repeated names (e.g. "CT", "CT") get the channel number."""
    names = dataset.channel_names
    if len(set(names)) == len(names):
        return list(names)
    return [f"{name}_{index}" for index, name in enumerate(names)]


def config_for_dataset(base: ModelConfig, dataset: RawDataset, normalization: str | None = None
                       ) -> ModelConfig:
    """``base`` (a preset or file) adapted to the data set's phases and labels.

    Normalisation per phase: ``normalization`` if given; else the base's scheme for a phase of that
    name; else nnU-Net's channel-name keywords ("CT" -> ct, "noNorm" -> none, MR names -> mr); else
    the base's scheme when all its phases share one (the presets are CT), else z-score ("mr").
    Label colours are kept for labels whose names the base knows.
    """
    from copy import deepcopy

    config = deepcopy(base)
    phases = phase_names(dataset)
    base_schemes = set(base.normalization.values())
    schemes = {}
    for channel, phase in zip(dataset.channel_names, phases):
        if normalization is not None:
            if normalization not in NORMALIZATION_SCHEMES:
                raise InputError(f"normalization {normalization!r} is not one of {NORMALIZATION_SCHEMES}")
            schemes[phase] = normalization
        elif phase in base.normalization:
            schemes[phase] = base.normalization[phase]
        elif channel.casefold() in CHANNEL_NAME_NORMALIZATION:
            schemes[phase] = CHANNEL_NAME_NORMALIZATION[channel.casefold()]
        elif len(base_schemes) == 1:
            schemes[phase] = next(iter(base_schemes))
        else:
            schemes[phase] = "mr"
    colours = {label.name: label.color for label in base.labels}
    config.phases = phases
    config.normalization = schemes
    config.labels = [Label(value, name, colours.get(name, (0.5, 0.5, 0.5)))
                     for name, value in dataset.labels.items()]
    config.validate()
    return config


def split_cases(cases: Sequence[str], fold: int | str = 0, n_folds: int = 5,
                val_cases: int | None = None) -> tuple[list[str], list[str]]:
    """(train, validation) from sorted case ids.

    ``val_cases``: the last N sorted cases validate. Otherwise fold K of ``n_folds`` contiguous
    blocks of the sorted ids (``numpy.array_split``); fold "all" trains on everything.
    """
    cases = sorted(cases)
    if val_cases is not None:
        if not 0 <= val_cases < len(cases):
            raise InputError(f"--val-cases {val_cases}: the data set has {len(cases)} cases; "
                             "at least one must remain for training")
        return cases[: len(cases) - val_cases], cases[len(cases) - val_cases:]
    if str(fold) == "all":
        return list(cases), []
    fold = int(fold)
    if not 0 <= fold < n_folds:
        raise InputError(f"fold {fold} is not in 0..{n_folds - 1} (or 'all')")
    if len(cases) < n_folds:
        raise InputError(f"{len(cases)} cases cannot be split into {n_folds} folds; "
                         "use --val-cases N or --fold all")
    blocks = np.array_split(np.arange(len(cases)), n_folds)
    val = [cases[i] for i in blocks[fold]]
    return [c for c in cases if c not in val], val


# --------------------------------------------------------------------------------------------------
# Preprocessing cache
# --------------------------------------------------------------------------------------------------


@dataclass
class CaseData:
    """One preprocessed case. Arrays are memory-mapped from the cache."""

    case_id: str
    data: np.ndarray  # float32 (P, z, y, x)
    seg: np.ndarray  # uint8 (z, y, x)
    foreground: dict[int, np.ndarray]  # class value -> (N, 3) int voxel coordinates
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def label_file(self) -> Path:
        return Path(self.meta["label_file"])


def cache_plan(config: ModelConfig, dataset: RawDataset, register: str | None) -> dict:
    return {
        "version": CACHE_VERSION,
        "dataset": str(dataset.root.resolve()),
        "phases": config.phases,
        "channel_names": dataset.channel_names,
        "labels": dataset.labels,
        "spacing": list(config.spacing),
        "normalization": config.normalization,
        "intensity_properties": config.intensity_properties,
        "register": register,
    }


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        np.save(stream, array)


def _atomic_save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        np.savez(stream, **arrays)


def _source_stamp(paths: Sequence[Path]) -> list[list]:
    return [[str(p), p.stat().st_size, int(p.stat().st_mtime_ns)] for p in paths]


def case_seed(case: str) -> int:
    """A seed fixed by the case id: per-case sampling does not depend on case order or rank."""
    return int.from_bytes(hashlib.sha256(case.encode()).digest()[:4], "little")


def foreground_locations(seg: np.ndarray, classes: Sequence[int], seed: int = 0,
                         max_samples: int = MAX_FOREGROUND_SAMPLES) -> dict[int, np.ndarray]:
    """Up to ``max_samples`` random voxel coordinates (N, 3) per class present in ``seg``."""
    rng = np.random.default_rng(seed)
    out = {}
    for value in classes:
        coords = np.argwhere(seg == value).astype(np.int32)
        if len(coords) > max_samples:
            coords = coords[np.sort(rng.choice(len(coords), max_samples, replace=False))]
        out[int(value)] = coords
    return out


def read_case_image(path: Path, case: str, what: str):
    """One image of a case; an unreadable file is an input error naming the case and the file."""
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"case {case!r}: cannot read {what} {path}: {error}") from error


def load_case_images(dataset: RawDataset, config: ModelConfig, case: str, register: str | None = None):
    """{phase: image} and the label image of one case, all on one grid.

    The reference grid is the label's. A phase on another grid is registered onto the first phase
    on the label grid when ``register`` names a preset of :mod:`maml.registration`, else rejected.
    """
    from ..preprocessing import check_same_grid

    label = read_case_image(dataset.label_file(case), case, "label map")
    images = {phase: read_case_image(path, case, f"phase {phase!r}")
              for phase, path in zip(config.phases, dataset.image_files(case))}
    on_grid, off_grid = [], []
    for phase, image in images.items():
        try:
            check_same_grid({"label": label, phase: image})
            on_grid.append(phase)
        except InputError as error:
            off_grid.append((phase, error))
    if not off_grid:
        return images, label
    if not on_grid:
        raise InputError(f"case {case!r}: no phase is on the label map's grid; the label map must "
                         f"share the grid of a phase ({off_grid[0][1]})")
    if register is None:
        phase, error = off_grid[0]
        detail = str(error).split(". Register")[0]
        raise InputError(
            f"case {case!r}: phase {phase!r} is not on the grid of phase {on_grid[0]!r} and the label "
            f"map ({detail.split(': ', 1)[-1]}); co-register the phases first or pass --register "
            "PRESET to register them during preprocessing"
        )
    reference_phase = on_grid[0]
    reference = images[reference_phase]
    for phase, _ in off_grid:
        if register == TRANSFORMS:
            images[phase] = _apply_given_transform(dataset, case, phase, reference_phase, images[phase],
                                                   reference)
        else:
            try:
                from ..registration import register as register_images
            except ImportError as error:
                raise InputError(f"--register {register}: maml.registration cannot be imported "
                                 f"({error}); use --register {TRANSFORMS} with transform files or "
                                 "co-register the phases first") from error
            result = register_images(reference, images[phase], preset=register)
            images[phase] = result.registered
        check_same_grid({reference_phase: reference, phase: images[phase]})
    return images, label


TRANSFORMS = "transforms"


def transform_file(dataset: RawDataset, case: str, phase: str, reference_phase: str) -> Path:
    """DATASET/transforms/CASE_<phase>_to_<reference>.tfm (as the phantom writes them)."""
    return dataset.root / "transforms" / f"{case}_{phase}_to_{reference_phase}.tfm"


def _apply_given_transform(dataset, case, phase, reference_phase, moving, reference):
    """Resamples ``moving`` onto ``reference``'s grid with the data set's transform file, which maps
    reference (fixed) points to moving points: the convention of elastix and ``sitk.Resample``."""
    import SimpleITK as sitk

    path = transform_file(dataset, case, phase, reference_phase)
    if not path.is_file():
        raise InputError(f"case {case!r}: --register {TRANSFORMS} needs {path} (a transform from "
                         f"the {reference_phase!r} grid to phase {phase!r})")
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError as error:
        raise InputError(f"case {case!r}: cannot read transform {path}: {error}") from error
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(reference)
    resampler.SetTransform(transform)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    resampler.UseNearestNeighborExtrapolatorOn()
    return resampler.Execute(moving)


def preprocess_case(dataset: RawDataset, config: ModelConfig, case: str, register: str | None = None
                    ) -> tuple[np.ndarray, np.ndarray, dict]:
    """(data (P, z, y, x) float32, seg (z, y, x) uint8, meta) of one case on the model grid.

    Labels go to the model grid by one-hot linear interpolation and argmax (nnU-Net resamples
    segmentations per class the same way), which keeps small structures better than nearest.
    """
    import SimpleITK as sitk

    from ..preprocessing import one_hot, preprocess_phases, resample_probabilities_to_reference

    images, label = load_case_images(dataset, config, case, register)
    try:
        pre = preprocess_phases(images, config)
    except InputError as error:
        raise InputError(f"case {case!r}: {error}") from error
    label_array = sitk.GetArrayFromImage(label)
    unknown = sorted(set(np.unique(label_array).tolist()) - set(dataset.labels.values()))
    if unknown:
        raise InputError(f"case {case!r}: label map has values {unknown} that dataset.json does not "
                         f"list (labels {dataset.labels})")
    probs = resample_probabilities_to_reference(one_hot(label_array, config.num_classes),
                                                pre.input_geometry, pre.model_geometry)
    seg = np.argmax(probs, axis=0).astype(np.uint8)
    meta = {
        "case": case,
        "model_geometry": pre.model_geometry.to_dict(),
        "label_geometry": pre.input_geometry.to_dict(),
        "label_file": str(dataset.label_file(case)),
        "sources": _source_stamp([*dataset.image_files(case), dataset.label_file(case)]),
        "class_voxels": {str(v): int((seg == v).sum()) for v in range(config.num_classes)},
    }
    return pre.data, seg, meta


def dataset_intensity_properties(dataset: RawDataset, config: ModelConfig, cases: Sequence[str],
                                 register: str | None = None, progress: bool = True
                                 ) -> dict[str, dict[str, float]]:
    """Foreground (label > 0) CT statistics per "ct_dataset" phase over ``cases``, as nnU-Net's
    fingerprint: up to MAX_FOREGROUND_SAMPLES voxel values per case and phase, pooled."""
    import SimpleITK as sitk

    from ..preprocessing import intensity_properties

    phases = [p for p in config.phases if config.normalization[p] == "ct_dataset"]
    if not phases:
        return {}
    pooled: dict[str, list[np.ndarray]] = {p: [] for p in phases}
    iterator = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc="intensity statistics", unit="case")
    for case in iterator:
        images, label = load_case_images(dataset, config, case, register)
        foreground = sitk.GetArrayViewFromImage(label) > 0
        rng = np.random.default_rng(case_seed(case))
        for phase in phases:
            values = sitk.GetArrayViewFromImage(images[phase])[foreground]
            if values.size > MAX_FOREGROUND_SAMPLES:
                values = rng.choice(values, MAX_FOREGROUND_SAMPLES, replace=False)
            pooled[phase].append(np.asarray(values, dtype=np.float64))
    out = {}
    for phase in phases:
        try:
            out[phase] = intensity_properties(np.concatenate(pooled[phase]))
        except InputError:
            raise InputError(f"data set {dataset.root}: the label maps of the training cases have no "
                             f"foreground, so phase {phase!r} has no CT statistics ('ct_dataset')") from None
    return out


class PreprocessedCache:
    """The OUT/preprocessed folder."""

    def __init__(self, folder: str | Path, config: ModelConfig, dataset: RawDataset,
                 register: str | None = None):
        self.folder = Path(folder)
        self.config = config
        self.dataset = dataset
        self.register = register
        self.plan = cache_plan(config, dataset, register)

    def paths(self, case: str) -> dict[str, Path]:
        return {"data": self.folder / f"{case}.npy", "seg": self.folder / f"{case}_seg.npy",
                "fg": self.folder / f"{case}_fg.npz", "meta": self.folder / f"{case}.json"}

    def prepare_folder(self) -> None:
        """Creates the folder; a cache made for another plan is emptied (call on one rank only)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        plan_path = self.folder / "plan.json"
        if plan_path.is_file():
            try:
                old = json.loads(plan_path.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old != json.loads(json.dumps(self.plan)):
                for path in self.folder.iterdir():
                    if path.is_file():
                        path.unlink()
        write_text_atomic(plan_path, json.dumps(self.plan, indent=2))

    def is_current(self, case: str) -> bool:
        paths = self.paths(case)
        if not all(p.is_file() for p in paths.values()):
            return False
        try:
            meta = json.loads(paths["meta"].read_text())
            sources = _source_stamp([*self.dataset.image_files(case), self.dataset.label_file(case)])
        except (OSError, json.JSONDecodeError):
            return False
        return meta.get("sources") == sources

    def build(self, cases: Sequence[str], progress: bool = True, rank: int = 0, world_size: int = 1
              ) -> int:
        """Preprocesses the cases not yet cached (rank r takes every world_size-th). Returns count."""
        todo = [c for i, c in enumerate(cases) if i % world_size == rank and not self.is_current(c)]
        iterator = todo
        if progress and todo:
            from tqdm import tqdm

            iterator = tqdm(todo, desc="preprocess", unit="case")
        classes = list(range(1, self.config.num_classes))
        for case in iterator:
            data, seg, meta = preprocess_case(self.dataset, self.config, case, self.register)
            paths = self.paths(case)
            fg = foreground_locations(seg, classes, case_seed(case))
            _atomic_save_npy(paths["data"], data.astype(np.float32, copy=False))
            _atomic_save_npy(paths["seg"], seg)
            _atomic_save_npz(paths["fg"], {f"class_{k}": v for k, v in fg.items()})
            write_text_atomic(paths["meta"], json.dumps(meta, indent=1))  # last: marks it complete
        return len(todo)

    def load(self, case: str, mmap: bool = True) -> CaseData:
        paths = self.paths(case)
        mode = "r" if mmap else None
        data = np.load(paths["data"], mmap_mode=mode)
        seg = np.load(paths["seg"], mmap_mode=mode)
        with np.load(paths["fg"]) as archive:
            foreground = {int(k.split("_")[1]): archive[k] for k in archive.files}
        meta = json.loads(paths["meta"].read_text())
        return CaseData(case, data, seg, foreground, meta)
