"""Import a trained nnU-Net v2 model folder as a one-phase MAML model.

An nnU-Net v2 results folder (``RESULTS/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION``) holds
``plans.json`` (spacing, patch size, network topology, intensity statistics), ``dataset.json``
(channels, labels) and one folder per trained fold (``fold_0/checkpoint_final.pth`` ...). This
module reads them without importing nnU-Net (whose dependencies would replace Slicer's torch) and
writes a MAML checkpoint whose only phase is the given one: the engine's backbone mirrors nnU-Net's
PlainConvUNet, so the weights load key for key. Several folds become a :class:`FoldEnsemble`, and
the configuration records nnU-Net's way of predicting (logits blended over mirrors, windows and
folds; the mirror axes its training allowed), so that inference gives nnU-Net's own result.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .config import LIVER_LABELS, InferenceConfig, Label, ModelConfig, NetworkConfig
from .errors import InputError, ModelError
from .model import file_sha256, save_checkpoint
from .network import FoldEnsemble, MAMLNet, load_nnunet_weights

DATA_KINDS = ("clinical", "research", "synthetic", "unknown")
TUMOR_WORDS = ("tumor", "tumour", "lesion", "cancer", "metasta", "hcc", "neoplasm", "mass", "carcinoma")
# nnU-Net normalisation class -> this engine's scheme; the others have no equivalent here.
NORMALIZATIONS = {"CTNormalization": "ct_dataset", "NoNormalization": "none"}
# Image readers whose arrays keep the file's voxel order (as this engine's SimpleITK reading does).
READERS = ("SimpleITKIO", "NibabelIO", "Tiff3DIO")


@dataclass
class NNUNetFolder:
    """What an nnU-Net v2 model folder says, read and checked."""

    path: Path
    trainer: str
    plans_name: str
    configuration_name: str
    plans: dict
    dataset: dict
    configuration: dict  # the configuration's plans entry, inheritance resolved

    @property
    def dataset_name(self) -> str:
        return str(self.plans.get("dataset_name") or self.path.parent.name)

    def available_folds(self, checkpoint: str) -> list[str]:
        folds = [p.name[len("fold_"):] for p in sorted(self.path.glob("fold_*"))
                 if (p / checkpoint).is_file()]
        return sorted(folds, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))

    def checkpoint_path(self, fold: str, checkpoint: str) -> Path:
        return self.path / f"fold_{fold}" / checkpoint


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"{path} is missing: {what}; give the folder nnU-Net wrote for one "
                         "configuration (RESULTS/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path} is not readable JSON: {error}") from error
    if not isinstance(data, dict):
        raise InputError(f"{path} does not hold a JSON object")
    return data


def read_model_folder(folder: str | Path) -> NNUNetFolder:
    """Reads plans.json and dataset.json of an nnU-Net v2 model folder."""
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"nnU-Net model folder {path} does not exist")
    parts = path.name.split("__")
    if len(parts) != 3:
        raise InputError(f"nnU-Net model folder {path}: its name should be TRAINER__PLANS__CONFIGURATION "
                         "(e.g. nnUNetTrainer__nnUNetPlans__3d_fullres), as nnU-Net names it")
    trainer, plans_name, configuration_name = parts
    plans = _read_json(path / "plans.json", "nnU-Net's plans of the model")
    dataset = _read_json(path / "dataset.json", "nnU-Net's dataset description of the model")
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or configuration_name not in configurations:
        raise InputError(f"{path / 'plans.json'} has no configuration {configuration_name!r} "
                         f"(it has {sorted(configurations or {})})")
    configuration = _resolve_configuration(configurations, configuration_name, path)
    return NNUNetFolder(path, trainer, str(plans.get("plans_name", plans_name)), configuration_name,
                        plans, dataset, configuration)


def _resolve_configuration(configurations: dict, name: str, path: Path) -> dict:
    """A configuration with what it inherits (``inherits_from``) filled in."""
    chain, current = [], name
    while current is not None:
        if current in chain or current not in configurations:
            raise InputError(f"{path / 'plans.json'}: configuration {name!r} inherits from a missing "
                             f"or circular configuration {current!r}")
        chain.append(current)
        current = configurations[current].get("inherits_from")
    merged: dict = {}
    for entry in reversed(chain):
        merged.update(configurations[entry])
    return merged


# --------------------------------------------------------------------------------------------------
# Plans -> ModelConfig
# --------------------------------------------------------------------------------------------------


def _short(name: Any) -> str:
    return str(name).rsplit(".", 1)[-1]


def network_config(model: NNUNetFolder) -> NetworkConfig:
    """The PlainConvUNet topology of the plans as this engine's NetworkConfig (refused when the
    network is one the engine does not mirror)."""
    where = f"{model.path / 'plans.json'} ({model.configuration_name})"
    config = model.configuration
    if config.get("previous_stage"):
        raise InputError(f"{where} is a cascade stage that needs the previous stage's segmentation; "
                         "import a 3d_fullres (or 3d_lowres) configuration instead")
    if "architecture" in config:
        architecture = config["architecture"]
        class_name = _short(architecture.get("network_class_name"))
        kwargs = dict(architecture.get("arch_kwargs") or {})
    else:  # plans written by nnU-Net v2 before 2.4
        class_name = _short(config.get("UNet_class_name"))
        kernels = config.get("conv_kernel_sizes") or [[]]
        base, top = config.get("UNet_base_num_features", 32), config.get("unet_max_num_features", 320)
        kwargs = {
            "features_per_stage": [min(base * 2 ** s, top) for s in range(len(kernels))],
            "kernel_sizes": kernels, "strides": config.get("pool_op_kernel_sizes"),
            "n_conv_per_stage": config.get("n_conv_per_stage_encoder"),
            "n_conv_per_stage_decoder": config.get("n_conv_per_stage_decoder"),
            "conv_bias": True, "conv_op": "Conv3d" if len(kernels[0]) == 3 else "Conv2d",
        }
    if class_name != "PlainConvUNet":
        raise InputError(f"{where} uses the network {class_name!r}; this engine mirrors nnU-Net's "
                         "PlainConvUNet (the default nnUNetPlans) only")
    if _short(kwargs.get("conv_op")) != "Conv3d":
        raise InputError(f"{where} is a 2D configuration; import a 3D one (3d_fullres)")
    if _short(kwargs.get("norm_op", "InstanceNorm3d")) != "InstanceNorm3d":
        raise InputError(f"{where} normalises with {_short(kwargs.get('norm_op'))}; the engine's "
                         "backbone uses InstanceNorm3d as nnU-Net's default plans do")
    norm = kwargs.get("norm_op_kwargs") or {}
    if float(norm.get("eps", 1e-5)) != 1e-5 or not norm.get("affine", True):
        raise InputError(f"{where}: instance norm settings {norm} differ from nnU-Net's default "
                         "(eps 1e-5, affine), which the engine's backbone uses")
    if kwargs.get("dropout_op"):
        raise InputError(f"{where} uses dropout; the engine's backbone has none")
    nonlin = _short(kwargs.get("nonlin", "LeakyReLU"))
    slope = float((kwargs.get("nonlin_kwargs") or {}).get("negative_slope", 1e-2))
    if nonlin != "LeakyReLU" or slope != 1e-2:
        raise InputError(f"{where}: nonlinearity {nonlin} (slope {slope}) is not nnU-Net's default "
                         "LeakyReLU(0.01), which the engine's backbone uses")
    features = [int(f) for f in kwargs["features_per_stage"]]
    net = NetworkConfig(
        base_features=features[0], max_features=max(features),
        kernel_sizes=[[int(k) for k in ks] for ks in kwargs["kernel_sizes"]],
        strides=[[int(s) for s in st] for st in kwargs["strides"]],
        n_conv_per_stage=[int(n) for n in _per_stage(kwargs["n_conv_per_stage"], len(features))],
        n_conv_per_stage_decoder=[int(n) for n in _per_stage(kwargs["n_conv_per_stage_decoder"],
                                                            len(features) - 1)],
        conv_bias=bool(kwargs.get("conv_bias", True)),
        deep_supervision=True,
    )
    if net.features_per_stage != features:
        raise InputError(f"{where}: features per stage {features} do not double from "
                         f"{features[0]} up to {max(features)} as the engine's backbone builds them")
    try:
        net.validate()
    except ModelError as error:
        raise InputError(f"{where}: {error}") from error
    return net


def _per_stage(value, count: int) -> list:
    return [value] * count if isinstance(value, int) else list(value)


def normalization(model: NNUNetFolder) -> tuple[str, dict[str, float] | None]:
    """(engine scheme, intensity properties) of the model's only channel."""
    schemes = model.configuration.get("normalization_schemes") or ["CTNormalization"]
    scheme = _short(schemes[0])
    if scheme not in NORMALIZATIONS:
        raise InputError(f"{model.path / 'plans.json'}: the model normalises its input with {scheme}; "
                         f"the engine reproduces {', '.join(NORMALIZATIONS)} only (CT models use "
                         "CTNormalization)")
    if NORMALIZATIONS[scheme] != "ct_dataset":
        return NORMALIZATIONS[scheme], None
    stats = (model.plans.get("foreground_intensity_properties_per_channel") or {}).get("0")
    keys = {"low": "percentile_00_5", "high": "percentile_99_5", "mean": "mean", "std": "std"}
    if not isinstance(stats, dict) or any(k not in stats for k in keys.values()):
        raise InputError(f"{model.path / 'plans.json'} has no foreground intensity statistics of "
                         "channel 0 (foreground_intensity_properties_per_channel), which "
                         "CTNormalization needs")
    return "ct_dataset", {ours: float(stats[theirs]) for ours, theirs in keys.items()}


def check_channels(model: NNUNetFolder) -> str:
    channels = model.dataset.get("channel_names") or model.dataset.get("modality") or {}
    if len(channels) != 1:
        raise InputError(f"{model.path / 'dataset.json'}: the model takes {len(channels)} input "
                         f"channels {dict(channels)}; import a one-channel (one-phase) model, or "
                         "register the phases and train one nnU-Net model per phase")
    return str(next(iter(channels.values())))


def model_labels(model: NNUNetFolder) -> dict[str, int]:
    """dataset.json's labels as name -> value (0..K-1); region-based label sets are refused."""
    labels = model.dataset.get("labels")
    where = model.path / "dataset.json"
    if not isinstance(labels, dict) or not labels:
        raise InputError(f"{where} has no labels")
    if model.dataset.get("regions_class_order") or any(
            isinstance(v, (list, tuple)) and len(v) != 1 for v in labels.values()):
        raise InputError(f"{where} defines region-based labels (overlapping regions, "
                         "regions_class_order); the engine segments one label per voxel: import a "
                         "model trained on plain labels")
    values = {}
    for name, value in labels.items():
        value = value[0] if isinstance(value, (list, tuple)) else value
        try:
            values[str(name)] = int(value)
        except (TypeError, ValueError):
            raise InputError(f"{where}: label {name!r} has no integer value ({value!r})") from None
    if sorted(values.values()) != list(range(len(values))):
        raise InputError(f"{where}: label values {sorted(values.values())} are not 0..{len(values) - 1}")
    return values


def parse_label_map(items: Sequence[str] | None) -> dict[str, int]:
    """``["liver=1", "tumor=2"]`` -> {"liver": 1, "tumor": 2}."""
    result = {}
    for item in items or []:
        name, _, value = item.partition("=")
        if name not in ("liver", "tumor") or not value.strip().isdigit():
            raise InputError(f"--label-map entry {item!r}: write liver=VALUE and/or tumor=VALUE "
                             "with the model's label values (dataset.json)")
        result[name] = int(value)
    return result


def infer_label_map(labels: Mapping[str, int], given: Mapping[str, int] | None, where) -> dict[str, int]:
    """Which of the model's label values are liver and tumor: given, else from the label names."""
    given = dict(given or {})
    for name, value in given.items():
        if value not in labels.values() or value == 0:
            raise InputError(f"--label-map {name}={value}: the model's foreground labels are "
                             f"{ {k: v for k, v in labels.items() if v} }")
    if len(set(given.values())) != len(given):
        raise InputError(f"--label-map gives liver and tumor the same value {given}")
    found = dict(given)
    for name, value in labels.items():
        lower = name.lower()
        if value == 0 or value in found.values():
            continue
        if any(word in lower for word in TUMOR_WORDS):
            found.setdefault("tumor", value)
        elif "liver" in lower or "hepat" in lower:
            found.setdefault("liver", value)
    if "liver" not in found:
        raise InputError(f"{where}: the model has no liver label (labels {labels}); name it with "
                         "--label-map liver=VALUE (and tumor=VALUE) if one of them is the liver")
    return found


def model_config(model: NNUNetFolder, phase: str, label_map: Mapping[str, int], mirror_axes,
                 name: str | None = None) -> ModelConfig:
    labels = model_labels(model)
    by_value = {v: k for k, v in labels.items()}
    ours = {label.name: label for label in LIVER_LABELS}
    renamed = {value: role for role, value in label_map.items()}
    config_labels = []
    for value in range(len(labels)):
        role = "background" if value == 0 else renamed.get(value)
        if role in ours:
            config_labels.append(Label(value, role, ours[role].color))
        else:
            config_labels.append(Label(value, by_value[value], (0.5, 0.5, 0.5)))
    scheme, properties = normalization(model)
    reader = _short(model.plans.get("image_reader_writer", "SimpleITKIO"))
    if reader not in READERS:
        raise InputError(f"{model.path / 'plans.json'}: the model was trained on images read with "
                         f"{reader}, which reorients them; the engine reads voxels in file order "
                         f"({', '.join(READERS)})")
    if list(model.plans.get("transpose_forward", [0, 1, 2])) != [0, 1, 2]:
        raise InputError(f"{model.path / 'plans.json'}: the model works on transposed axes "
                         f"(transpose_forward {model.plans['transpose_forward']}); the engine imports "
                         "models on (z, y, x) arrays only")
    config = ModelConfig(
        name=name or f"{model.dataset_name}-{model.configuration_name}-{phase}",
        phases=[phase],
        labels=config_labels,
        spacing=[float(s) for s in model.configuration["spacing"]],
        patch_size=[int(p) for p in model.configuration["patch_size"]],
        normalization={phase: scheme},
        network=network_config(model),
        intensity_properties={phase: properties} if properties else {},
        inference=InferenceConfig(blend="logits", mirror_axes=[int(a) for a in mirror_axes],
                                  resampling="nnunet"),
    )
    try:
        config.validate()
    except ModelError as error:
        raise InputError(f"nnU-Net model folder {model.path}: {error}") from error
    return config


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def read_nnunet_checkpoint(path: Path) -> dict:
    """An nnU-Net checkpoint's network weights and inference settings.

    nnU-Net pickles plain Python and numpy values beside the tensors; they are read with
    ``weights_only=True`` and numpy's scalar types allowed, so a file cannot run code.
    """
    if not path.is_file():
        raise InputError(f"nnU-Net checkpoint {path} does not exist; choose folds with --folds and the "
                         "file with --checkpoint (checkpoint_final.pth or checkpoint_best.pth)")
    import numpy as np

    try:
        from numpy._core.multiarray import scalar  # numpy 2
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar
    # Checkpoints name numpy's scalar by the module of the numpy that wrote them.
    allowed = [np.dtype, (scalar, "numpy.core.multiarray.scalar"),
               (scalar, "numpy._core.multiarray.scalar")]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    try:
        with torch.serialization.safe_globals(allowed):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise InputError(f"nnU-Net checkpoint {path} is not readable: {str(error).splitlines()[0]}") \
            from error
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise InputError(f"{path} is not an nnU-Net v2 checkpoint (no network_weights)")
    return checkpoint


def _mirror_axes(checkpoint: dict) -> list[int]:
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    return [] if axes is None else [int(a) for a in axes]


def import_nnunet(folder: str | Path, phase: str, out: str | Path, folds: Sequence[str] | None = None,
                  checkpoint: str = "checkpoint_final.pth", label_map: Mapping[str, int] | None = None,
                  data_kind: str = "unknown", name: str | None = None) -> Path:
    """Writes ``out``: a one-phase MAML checkpoint of the model's folds (averaged at inference)."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", phase or ""):
        raise InputError(f"--phase {phase!r}: a phase name is letters, digits and _ (e.g. venous)")
    if data_kind not in DATA_KINDS:
        raise InputError(f"--data-kind {data_kind!r} is not one of {', '.join(DATA_KINDS)}")
    model = read_model_folder(folder)
    check_channels(model)
    available = model.available_folds(checkpoint)
    chosen = [str(f) for f in folds] if folds else available
    if not chosen:
        raise InputError(f"nnU-Net model folder {model.path} has no fold_*/{checkpoint}; train a fold "
                         "first or choose the file with --checkpoint")
    missing = [f for f in chosen if f not in available]
    if missing:
        raise InputError(f"nnU-Net model folder {model.path} has no {checkpoint} for fold(s) "
                         f"{missing}; it has folds {available or 'none'}")
    checkpoints = {fold: read_nnunet_checkpoint(model.checkpoint_path(fold, checkpoint))
                   for fold in chosen}
    axes = {tuple(_mirror_axes(c)) for c in checkpoints.values()}
    if len(axes) != 1:
        raise InputError(f"the chosen folds of {model.path} were trained with different mirroring "
                         f"axes {sorted(axes)}; import them separately")
    labels = model_labels(model)
    roles = infer_label_map(labels, label_map, model.path / "dataset.json")
    config = model_config(model, phase, roles, list(axes.pop()), name)
    members = []
    for fold, content in checkpoints.items():
        net = MAMLNet(config)
        try:
            load_nnunet_weights(net, phase, content["network_weights"])
        except ModelError as error:
            raise InputError(f"fold {fold} of {model.path}: {error}") from error
        members.append(net.eval())
    network = members[0] if len(members) == 1 else FoldEnsemble(members)
    metadata = provenance(model, chosen, checkpoint, roles, data_kind, phase,
                          {c.get("trainer_name") for c in checkpoints.values()} - {None})
    return save_checkpoint(out, network, config, metadata)


def _nnunet_version() -> str:
    from importlib import metadata

    try:
        return f"{metadata.version('nnunetv2')} (installed when imported; the folder records none)"
    except metadata.PackageNotFoundError:
        return "unknown (the folder records none; nnunetv2 was not installed when imported)"


def provenance(model: NNUNetFolder, folds: Sequence[str], checkpoint: str, roles: Mapping[str, int],
               data_kind: str, phase: str, trainer_names: set) -> dict[str, Any]:
    files = ["plans.json", "dataset.json", *(f"fold_{f}/{checkpoint}" for f in folds)]
    if (model.path / "dataset_fingerprint.json").is_file():
        files.insert(2, "dataset_fingerprint.json")
    return {
        "source": "nnU-Net v2 model folder (maml import-nnunet)",
        "source_folder": str(model.path.resolve()),
        "imported_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nnunet_version": _nnunet_version(),
        "nnunet_dataset": model.dataset_name,
        "nnunet_plans": model.plans_name,
        "nnunet_trainer": ", ".join(sorted(trainer_names)) or model.trainer,
        "nnunet_configuration": model.configuration_name,
        "nnunet_folds": list(folds),
        "nnunet_checkpoint": checkpoint,
        "nnunet_labels": model_labels(model),
        "label_map": dict(roles),
        "phase": phase,
        "source_sha256": {name: file_sha256(model.path / name) for name in files},
        "data_kind": data_kind,
    }


# --------------------------------------------------------------------------------------------------
# Warm starts
# --------------------------------------------------------------------------------------------------


def backbone_source(source: str | Path, phase: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The configuration and one backbone's weights (key -> tensor, PlainConvUNet names) of a
    one-phase MAML checkpoint (e.g. imported), the same-named phase of a MAML model of several
    phases (a new model starting from an earlier one's backbones, its MA module fresh), or an
    nnU-Net model folder, for ``maml train --init-from``.
    Of several folds, the first one's backbone is taken (averaging the weights of separately trained
    networks would give a network that none of them is)."""
    path = Path(source)
    if path.is_dir():
        model = read_model_folder(path)
        check_channels(model)
        folds = model.available_folds("checkpoint_final.pth")
        if not folds:
            raise InputError(f"nnU-Net model folder {path} has no fold_*/checkpoint_final.pth")
        content = read_nnunet_checkpoint(model.checkpoint_path(folds[0], "checkpoint_final.pth"))
        labels = model_labels(model)
        roles = infer_label_map(labels, None, path / "dataset.json")
        config = model_config(model, phase, roles, _mirror_axes(content))
        net = MAMLNet(config)
        load_nnunet_weights(net, phase, content["network_weights"])
        return config, net.backbones[phase].state_dict()
    from .model import load_model

    loaded = load_model(path)
    network = loaded.network.members[0] if isinstance(loaded.network, FoldEnsemble) else loaded.network
    if phase in network.phases:  # a MAML model of several phases: that phase's own backbone
        return loaded.config, network.backbones[phase].state_dict()
    if len(network.phases) != 1:
        raise InputError(f"--init-from {phase}={path}: the model has phases {network.phases}, not "
                         f"{phase!r}; give a model of that phase or of one phase")
    return loaded.config, network.backbones[network.phases[0]].state_dict()


def parse_init_sources(items: Sequence[str] | None) -> dict[str, str]:
    """``["arterial=a.pt", "venous=v.pt"]`` -> {phase: path}; each path a one-phase MAML checkpoint
    (e.g. from ``maml import-nnunet``) or an nnU-Net v2 model folder."""
    sources = {}
    for item in items or []:
        phase, _, path = item.partition("=")
        if not phase or not path:
            raise InputError(f"--init-from entry {item!r}: write PHASE=PATH (e.g. venous=venous.pt "
                             "or venous=RESULTS/Dataset003_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres)")
        if phase in sources:
            raise InputError(f"--init-from names phase {phase!r} twice")
        if not Path(path).exists():
            raise InputError(f"--init-from {phase}={path}: no such file or folder")
        sources[phase] = path
    return sources


def config_from_init(sources: Mapping[str, str]) -> ModelConfig:
    """A training configuration whose backbones fit the first source: its network, spacing, patch
    size and intensity statistics; MAML's own inference settings. Phases, labels and normalisation
    are adapted to the data set by training."""
    phase, source = next(iter(sources.items()))
    config, _ = backbone_source(source, phase)
    config.name = f"maml-from-{config.name}"
    config.inference = InferenceConfig()
    return config


def initialise_backbones(net: MAMLNet, sources: Mapping[str, str]) -> None:
    """Loads each named phase's backbone from its source; the MA module and fused head keep their
    fresh initialisation. The segmentation heads are loaded when the classes agree in number."""
    for phase, source in sources.items():
        if phase not in net.phases:
            raise InputError(f"--init-from {phase}=...: the data set's phases are {net.phases}")
        config, state = backbone_source(source, phase)
        try:
            load_nnunet_weights(net, phase, state, load_heads=config.num_classes == net.num_classes)
        except ModelError as error:
            raise InputError(f"--init-from {phase}={source}: {error}; train with --config init to "
                             "take the network, spacing and patch size from it") from error
