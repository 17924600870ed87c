"""Training MAML on an nnU-Net v2 raw data set: one process, or many under ``torchrun``.

What a run writes to OUT (rank 0 only):

- ``preprocessed/``: the cache of resampled, normalised cases (:mod:`maml.data`), reused on resume.
- ``checkpoint_latest.pt`` / ``checkpoint_best.pt``: models in the maml checkpoint format
  (:func:`maml.model.save_checkpoint`), loadable by ``maml info`` and inference. "best" is the
  epoch with the highest validation mean foreground Dice of the fused head.
- ``training_state.pt``: everything needed to continue exactly (weights, optimiser, AMP scaler, RNG
  state, epoch, best score, options, case split); tensors and plain data only (``weights_only``
  loading). Written last at the end of every epoch, so a killed run loses at most one epoch.
- ``log.jsonl`` / ``log.csv`` (one row per epoch: losses, validation Dice and ASSD per head and
  label, learning rate, seconds), ``training_curves.png``, ``validation_latest.json`` and
  ``validation_best.json`` (per case, per head: the fused head and each phase's own head, i.e. the
  paper's Tables 1 and 2 from one run).

Determinism: the network is initialised from the seed; patch ``i`` of epoch ``e`` on rank ``r`` is a
pure function of (seed, e, r, i) (:class:`maml.data.PatchDataset`), modality dropout of (seed, e,
iteration); the learning rate is a function of the epoch. So ``--resume`` replays the remaining
epochs exactly as an uninterrupted run would (on the same hardware and thread count).

Distributed: under ``torchrun`` (WORLD_SIZE > 1) the process group starts from ``env://`` (nccl on
CUDA, gloo on the CPU), the model is wrapped in DistributedDataParallel, each rank draws its own
patches, preprocessing is shared out by case, and rank 0 validates and writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from . import __version__
from .config import ModelConfig
from .data import (CaseData, PatchDataset, PreprocessedCache, build_augmentation,
                   config_for_dataset, dataset_intensity_properties, item_seed, read_dataset,
                   split_cases)
from .errors import InputError, MAMLError
from .fingerprint import dataset_data_kind
from .evaluation import evaluate_arrays
from .io import atomic_path, write_text_atomic
from .losses import MutualLearningLoss
from .model import save_checkpoint
from .network import MAMLNet, WindowOutput, window_output

STATE_FORMAT = "maml-training-state"
STATE_VERSION = 1
STATE_FILE = "training_state.pt"

OPTIMIZERS = ("adam", "sgd")
AUGMENTATIONS = ("default", "light", "none")

# Options a user may change when resuming; everything else is taken from the saved state.
RESUMABLE_OVERRIDES = ("epochs", "device", "num_workers", "val_every", "amp", "threads")


@dataclass
class TrainingOptions:
    """How to train (the model itself is described by :class:`maml.config.ModelConfig`)."""

    epochs: int = 600
    iterations_per_epoch: int = 250
    batch_size: int = 2
    optimizer: str = "adam"  # "adam" (paper) or "sgd" (published code / nnU-Net)
    learning_rate: float | None = None  # default: 3e-4 (adam), 1e-2 (sgd)
    weight_decay: float = 3e-5
    momentum: float = 0.99  # sgd: Nesterov momentum
    poly_exponent: float = 0.9
    grad_clip: float = 12.0
    loss_variant: str = "paper"  # "paper" (lambda 0.5) or "code" (MutualLearningLoss.published_code)
    lambda_intra: float | None = None
    modality_dropout: float = 0.0  # probability that an iteration trains one random phase alone
    oversample_foreground: float = 1 / 3
    augmentation: str = "default"
    fold: str = "0"  # "0".."4" or "all"
    n_folds: int = 5
    val_cases: int | None = None
    val_every: int = 1
    val_overlap: float = 0.5
    val_batch_size: int = 2
    seed: int = 12345
    device: str = "auto"
    amp: bool = True  # only where CUDA is used
    channels_last: bool = True  # only where CUDA is used
    num_workers: int = 0
    threads: int | None = None
    register: str | None = None
    normalization: str | None = None
    data_kind: str | None = None  # "synthetic" | "clinical"; default: the data set's dataset.json

    def lr(self) -> float:
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return 3e-4 if self.optimizer == "adam" else 1e-2

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.augmentation not in AUGMENTATIONS:
            raise InputError(f"augmentation {self.augmentation!r} is not one of {AUGMENTATIONS}")
        if self.loss_variant not in ("paper", "code"):
            raise InputError(f"loss variant {self.loss_variant!r} is not 'paper' or 'code'")
        for name in ("epochs", "iterations_per_epoch", "batch_size", "val_every"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name.replace('_', ' ')} must be at least 1")
        if not 0.0 <= self.modality_dropout <= 1.0:
            raise InputError("modality dropout must be a probability in [0, 1]")
        if not 0.0 <= self.oversample_foreground <= 1.0:
            raise InputError("foreground oversampling must be a fraction in [0, 1]")

    @classmethod
    def from_dict(cls, data: dict) -> "TrainingOptions":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# Per preset: the paper trains 600 epochs with Adam 3e-4; the published code is nnU-Net's
# 1000 x 250 iterations with SGD; the demo fits about an hour on two CPU cores.
PRESET_OPTIONS: dict[str, dict[str, Any]] = {
    "paper": {"epochs": 600, "iterations_per_epoch": 250, "batch_size": 2},
    "code": {"epochs": 1000, "iterations_per_epoch": 250, "batch_size": 2, "optimizer": "sgd",
             "loss_variant": "code"},
    "demo": {"epochs": 120, "iterations_per_epoch": 25, "batch_size": 2, "learning_rate": 1e-3,
             "oversample_foreground": 0.5, "val_every": 6, "val_overlap": 0.25, "threads": 1,
             "num_workers": 1},
}


def default_options(preset: str | None, **overrides) -> TrainingOptions:
    values = dict(PRESET_OPTIONS.get(preset or "", {}))
    values.update({k: v for k, v in overrides.items() if v is not None})
    options = TrainingOptions.from_dict(values)
    options.validate()
    return options


def poly_lr(initial: float, epoch: int, total: int, exponent: float = 0.9) -> float:
    """nnU-Net's PolyLRScheduler: initial * (1 - epoch / total) ** exponent."""
    return initial * (1.0 - min(epoch, total) / total) ** exponent


# --------------------------------------------------------------------------------------------------
# Distributed setup
# --------------------------------------------------------------------------------------------------


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.initialised_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def setup_distributed(device: torch.device) -> Distributed:
    """Joins the process group when started by torchrun (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    here = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(hours=3))
        here = True
    return Distributed(rank, world, local_rank, here)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


class AllHeads(nn.Module):
    """Adapter for :func:`maml.inference.sliding_window_predict`: one pass gives the fused head's and
    every phase head's probabilities, stacked on the class axis (fused first, then phases in order),
    so a validation costs one forward pass per window instead of one per head."""

    def __init__(self, net: MAMLNet):
        super().__init__()
        self.net = net
        self.phases = list(net.phases)
        self.heads = ["fused", *self.phases]
        self.num_classes = net.num_classes * len(self.heads)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, phases: Sequence[str] | None = None) -> WindowOutput:
        out = self.net(x)
        window = window_output(out)
        probabilities = [window.probabilities]
        probabilities += [torch.softmax(out.phase_logits[p][0].float(), 1) for p in self.phases]
        return window._replace(probabilities=torch.cat(probabilities, 1))


def validate(net: MAMLNet, cases: Sequence[CaseData], config: ModelConfig, device: torch.device,
             overlap: float = 0.5, batch_size: int = 2, progress: bool = False) -> dict[str, Any]:
    """Full-volume sliding-window inference of each case; metrics in the original label geometry.

    Returns {"cases": {case: {head: {label: metrics}}}, "summary": {head: {label: {metric: mean}}},
    "mean_foreground_dice": {head: float}} with heads "fused" and each phase name.
    """
    import SimpleITK as sitk

    from .inference import SlidingWindowOptions, sliding_window_predict
    from .preprocessing import Geometry, resample_probabilities_to_reference

    adapter = AllHeads(net)
    k = config.num_classes
    labels = {label.name: label.value for label in config.labels if label.value != 0}
    options = SlidingWindowOptions(patch_size=config.patch_size, overlap=overlap,
                                   batch_size=batch_size, device=str(device))
    was_training = net.training
    net.eval()
    results: dict[str, dict] = {}
    iterator = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc="validate", unit="case", leave=False)
    try:
        for case in iterator:
            probs = sliding_window_predict(adapter, np.array(case.data), config.phases,
                                           options).probabilities
            model_geometry = Geometry.from_dict(case.meta["model_geometry"])
            label_geometry = Geometry.from_dict(case.meta["label_geometry"])
            gt = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label_file)))
            results[case.case_id] = {}
            for h, head in enumerate(adapter.heads):
                head_probs = resample_probabilities_to_reference(probs[h * k:(h + 1) * k],
                                                                 model_geometry, label_geometry)
                pred = np.argmax(head_probs, axis=0).astype(np.uint8)
                results[case.case_id][head] = evaluate_arrays(pred, gt, labels,
                                                              label_geometry.spacing_zyx)
    finally:
        net.train(was_training)
    summary: dict[str, dict] = {}
    mean_dice = {}
    for head in adapter.heads:
        summary[head] = {}
        for label in labels:
            summary[head][label] = {}
            for metric in ("dice", "assd_mm", "assd_voxels", "hd95_mm"):
                values = np.array([results[c][head][label][metric] for c in results], dtype=float)
                finite = values[~np.isnan(values)]
                summary[head][label][metric] = float(finite.mean()) if finite.size else math.nan
                summary[head][label][metric + "_std"] = float(finite.std()) if finite.size else math.nan
        mean_dice[head] = float(np.mean([summary[head][l]["dice"] for l in labels]))
    return {"cases": results, "summary": summary, "mean_foreground_dice": mean_dice}


# --------------------------------------------------------------------------------------------------
# Logs and curves
# --------------------------------------------------------------------------------------------------


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_logs(out_dir: Path, rows: list[dict]) -> None:
    """log.jsonl and log.csv from all rows (rewritten atomically: a resume drops replayed epochs)."""
    import csv
    import io

    write_text_atomic(out_dir / "log.jsonl",
                      "".join(json.dumps({k: _finite(v) for k, v in r.items()}) + "\n" for r in rows))
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_text_atomic(out_dir / "log.csv", stream.getvalue())


def read_log(out_dir: Path) -> list[dict]:
    path = out_dir / "log.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line of a killed run
    return rows


def plot_curves(out_dir: Path, rows: list[dict], phases: Sequence[str], labels: Sequence[str]) -> Path:
    """training_curves.png: losses, validation Dice per head and label, learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = out_dir / "training_curves.png"
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for key, style in [("train_loss", "-"), ("train_joint", "--")] + [
            (f"train_intra_{p}", ":") for p in phases]:
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax.plot(epochs, [np.nan if v is None else v for v in values], style,
                    label=key.replace("train_", ""))
    ax.set_title("training loss (Dice + CE)")
    ax.set_xlabel("epoch")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    heads = ["fused", *phases]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for h, head in enumerate(heads):
        for l, label in enumerate(labels):
            key = f"val_dice_{head}_{label}"
            points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), styles[h % 4], color=colours[l % len(colours)], marker=".",
                        label=f"{head} {label}")
    ax.set_title("validation Dice (fused and per-phase heads)")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    ax = axes[2]
    ax.plot(epochs, [r.get("lr") for r in rows])
    ax.set_title("learning rate")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_path(path) as temporary:
            fig.savefig(temporary, dpi=90, format="png")
    finally:
        plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# State files
# --------------------------------------------------------------------------------------------------


def save_state(path: Path, payload: dict) -> None:
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)


def load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise MAMLError(f"training state {path} cannot be read: {error}") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise MAMLError(f"{path} is not a maml training state")
    if state.get("version", 0) > STATE_VERSION:
        raise MAMLError(f"training state {path} is from a newer maml; update it to resume")
    return state


def _numpy_rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_rng_state(state: dict) -> None:
    np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached"]))


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


class TrainStep(nn.Module):
    """Network + loss as one module, so DistributedDataParallel sees the loss as the output: its
    unused-parameter search then starts from what is actually trained (the lowest deep-supervision
    head has weight 0; a modality-dropout iteration skips the fusion and the other phases)."""

    def __init__(self, net: MAMLNet, loss_fn: MutualLearningLoss):
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn

    def forward(self, image: torch.Tensor, target: torch.Tensor, phases: Sequence[str] | None = None):
        breakdown = self.loss_fn(self.net(image, phases=phases), target)
        return breakdown.total, breakdown


@dataclass
class TrainResult:
    out_dir: Path
    network: MAMLNet
    config: ModelConfig
    epochs_done: int
    best_metric: float | None
    best_epoch: int | None
    log: list[dict] = field(default_factory=list)
    iterations_per_second: float | None = None


def _flatten_validation(validation: dict, heads: Sequence[str], labels: Sequence[str]) -> dict:
    row = {}
    for head in heads:
        row[f"val_mean_dice_{head}"] = validation["mean_foreground_dice"][head]
        for label in labels:
            s = validation["summary"][head][label]
            row[f"val_dice_{head}_{label}"] = s["dice"]
            row[f"val_assd_voxels_{head}_{label}"] = s["assd_voxels"]
            row[f"val_assd_mm_{head}_{label}"] = s["assd_mm"]
    return row


def train(
    dataset_dir: str | Path,
    out_dir: str | Path,
    config: ModelConfig,
    options: TrainingOptions,
    resume: bool = False,
    overrides: Sequence[str] = (),
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    stop_after_epochs: int | None = None,
    command: str | None = None,
    init_from: Mapping[str, str] | None = None,
) -> TrainResult:
    """Trains (or resumes) a model; see the module docstring for what is written.

    ``config``: a preset or file configuration; its phases, labels and normalisation are adapted to
    the data set (:func:`maml.data.config_for_dataset`). ``overrides``: names of options the user set
    explicitly; on resume only those in ``RESUMABLE_OVERRIDES`` replace the saved ones.
    ``callback`` is called after every iteration with a dict (epoch, iteration, loss); raising in it
    (e.g. KeyboardInterrupt) cancels. ``stop_after_epochs`` ends this call after that many epochs
    (the run can be resumed). ``init_from``: phase -> one-phase MAML checkpoint or nnU-Net model
    folder whose backbone starts that phase's (a new run only; see ``maml.nnunet_import``).
    """
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_FILE
    state = None
    if state_path.is_file():
        if not resume:
            raise InputError(f"{out_dir} already holds a training run ({STATE_FILE}); pass --resume "
                             "to continue it or choose another --out")
        state = load_state(state_path)
        saved = TrainingOptions.from_dict(state["options"])
        for name in RESUMABLE_OVERRIDES:
            if name in overrides:
                setattr(saved, name, getattr(options, name))
        options = saved
        config = ModelConfig.from_dict(state["config"])
    options.validate()
    if options.threads:
        torch.set_num_threads(int(options.threads))

    from .inference import resolve_device

    device = resolve_device(options.device)
    dist = setup_distributed(device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    show = progress and dist.is_main
    try:
        return _train(dataset_dir, out_dir, config, options, state, dist, device, show, callback,
                      stop_after_epochs, command, init_from)
    finally:
        dist.close()


def _train(dataset_dir, out_dir: Path, config: ModelConfig, options: TrainingOptions, state, dist,
           device, show, callback, stop_after_epochs, command, init_from=None) -> TrainResult:
    dataset = read_dataset(dataset_dir)
    if state is None:
        config = config_for_dataset(config, dataset, options.normalization)
    elif len(dataset.channel_names) != len(config.phases):
        raise InputError(f"data set {dataset.root} has {len(dataset.channel_names)} channels; the run "
                         f"being resumed trains phases {config.phases}")
    train_ids, val_ids = split_cases(dataset.cases, options.fold, options.n_folds, options.val_cases)
    if state is not None and (state["train_cases"] != train_ids or state["val_cases"] != val_ids):
        raise InputError(f"the cases of {dataset.root} differ from those of the run being resumed")
    if config.missing_intensity_properties():
        # Every rank computes the same statistics (deterministic sampling), no broadcast needed.
        config.intensity_properties.update(dataset_intensity_properties(
            dataset, config, train_ids, options.register, progress=show))
        config.validate()
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    cache = PreprocessedCache(out_dir / "preprocessed", config, dataset, options.register)
    if dist.is_main:
        cache.prepare_folder()
    dist.barrier()
    cache.build(train_ids + val_ids, progress=show, rank=dist.rank, world_size=dist.world_size)
    dist.barrier()
    train_cases = [cache.load(c) for c in train_ids]
    val_cases = [cache.load(c) for c in val_ids] if dist.is_main else []

    torch.manual_seed(options.seed)
    net = MAMLNet(config)
    if state is None and init_from:
        from .nnunet_import import initialise_backbones

        initialise_backbones(net, init_from)  # the MA module and fused head start fresh
    use_cuda = device.type == "cuda"
    amp = bool(options.amp and use_cuda)
    memory_format = torch.channels_last_3d if (use_cuda and options.channels_last) else None
    net.to(device)
    if memory_format is not None:
        net.to(memory_format=memory_format)
    if options.optimizer == "adam":
        optimizer = torch.optim.Adam(net.parameters(), lr=options.lr(), weight_decay=options.weight_decay)
    else:
        optimizer = torch.optim.SGD(net.parameters(), lr=options.lr(), momentum=options.momentum,
                                    nesterov=True, weight_decay=options.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    loss_fn = (MutualLearningLoss.published_code() if options.loss_variant == "code"
               else MutualLearningLoss(lambda_intra=options.lambda_intra,
                                       deep_supervision=config.network.deep_supervision))
    if options.loss_variant == "code" and options.lambda_intra is not None:
        loss_fn.lambda_intra = float(options.lambda_intra)

    start_epoch, best_metric, best_epoch = 0, None, None
    rows: list[dict] = []
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        _set_numpy_rng_state(state["rng"]["numpy"])
        start_epoch = int(state["epoch"])
        best_metric, best_epoch = state["best_metric"], state["best_epoch"]
        rows = [r for r in read_log(out_dir) if r.get("epoch", 0) <= start_epoch]

    model: nn.Module = TrainStep(net, loss_fn)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # Unused parameters exist by design: the lowest deep-supervision head has weight 0 and a
        # modality-dropout iteration skips the fusion and the other phases.
        model = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None,
                                        find_unused_parameters=True)

    patches = PatchDataset(train_cases, config.patch_size,
                           options.iterations_per_epoch * options.batch_size, seed=options.seed,
                           rank=dist.rank, oversample_foreground=options.oversample_foreground,
                           augmentation=build_augmentation(options.augmentation, config.spacing))
    loader = torch.utils.data.DataLoader(patches, batch_size=options.batch_size, shuffle=False,
                                         num_workers=options.num_workers, drop_last=True,
                                         pin_memory=use_cuda)
    labels = [l.name for l in config.labels if l.value != 0]
    heads = ["fused", *config.phases]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if amp else nullcontext
    last_epoch = options.epochs if stop_after_epochs is None else min(
        options.epochs, start_epoch + stop_after_epochs)
    speed = None
    if dist.is_main and start_epoch:
        print(f"resuming after epoch {start_epoch} of {options.epochs}", file=sys.stderr)

    for epoch in range(start_epoch, last_epoch):
        lr = poly_lr(options.lr(), epoch, options.epochs, options.poly_exponent)
        for group in optimizer.param_groups:
            group["lr"] = lr
        patches.set_epoch(epoch)
        torch.manual_seed(item_seed(options.seed, epoch, dist.rank, 1))
        model.train()
        sums = {"total": 0.0, "joint": 0.0, **{p: 0.0 for p in config.phases}}
        counts = {key: 0 for key in sums}
        started = time.perf_counter()
        iterator = loader
        if show:
            from tqdm import tqdm

            iterator = tqdm(loader, desc=f"epoch {epoch + 1}/{options.epochs}", unit="it",
                            leave=False, dynamic_ncols=True)
        for iteration, (image, target) in enumerate(iterator):
            image = image.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            phases = None
            if options.modality_dropout > 0 and len(config.phases) > 1:
                rng = np.random.default_rng(item_seed(options.seed, epoch, 7, iteration))
                if rng.random() < options.modality_dropout:
                    keep = int(rng.integers(len(config.phases)))
                    phases = [config.phases[keep]]
                    image = image[:, keep:keep + 1]
            if memory_format is not None:
                image = image.contiguous(memory_format=memory_format)
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                _, breakdown = model(image, target, phases=phases)
            if not torch.isfinite(breakdown.total):
                raise MAMLError(f"training diverged: loss {float(breakdown.total)} at epoch "
                                f"{epoch + 1}, iteration {iteration + 1}; lower --lr")
            scaler.scale(breakdown.total).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), options.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            total = float(breakdown.total.detach())
            sums["total"] += total
            counts["total"] += 1
            if breakdown.joint is not None:
                sums["joint"] += breakdown.joint
                counts["joint"] += 1
            for phase, value in breakdown.intra.items():
                sums[phase] += value
                counts[phase] += 1
            if show:
                iterator.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}")
            if callback is not None:
                callback({"epoch": epoch, "iteration": iteration, "loss": total})
        seconds = time.perf_counter() - started
        means = torch.tensor([sums[k] / counts[k] if counts[k] else math.nan for k in sums],
                             dtype=torch.float64)
        if dist.enabled:
            torch.distributed.all_reduce(means)
            means /= dist.world_size
        means = dict(zip(sums, means.tolist()))
        speed = options.iterations_per_epoch / seconds
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": means["total"],
               "train_joint": means["joint"],
               **{f"train_intra_{p}": means[p] for p in config.phases},
               "train_seconds": round(seconds, 2), "iterations_per_second": round(speed, 4)}

        is_last = epoch + 1 == options.epochs
        validation = None
        if dist.is_main and val_cases and ((epoch + 1) % options.val_every == 0 or is_last):
            started = time.perf_counter()
            validation = validate(net, val_cases, config, device, options.val_overlap,
                                  options.val_batch_size, progress=show)
            row.update(_flatten_validation(validation, heads, labels))
            row["val_seconds"] = round(time.perf_counter() - started, 2)
        improved = False
        if validation is not None:
            metric = validation["mean_foreground_dice"]["fused"]
            if best_metric is None or metric > best_metric:
                best_metric, best_epoch, improved = metric, epoch + 1, True
        elif not val_cases:  # no validation (fold "all"): the latest is the best
            best_epoch, improved = epoch + 1, True
        rows.append(row)

        if dist.is_main:
            metadata = {
                "trained_epochs": epoch + 1, "planned_epochs": options.epochs,
                "iterations_per_epoch": options.iterations_per_epoch,
                "batch_size": options.batch_size, "world_size": dist.world_size,
                "optimizer": options.optimizer, "learning_rate": options.lr(),
                "loss": options.loss_variant, "modality_dropout": options.modality_dropout,
                "augmentation": options.augmentation, "seed": options.seed,
                "dataset": dataset.name, "train_cases": len(train_ids),
                "validation_cases": len(val_ids), "validation_case_ids": list(val_ids),
                "fold": options.fold,
                "data_kind": options.data_kind or dataset_data_kind(dataset.root),
                "best_epoch": best_epoch,
                "validation_mean_foreground_dice_fused": best_metric,
                "maml_version": __version__,
                "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            if command:
                metadata["command"] = command
            if validation is not None:
                metadata["validation_dice"] = {
                    head: {label: round(validation["summary"][head][label]["dice"], 4)
                           for label in labels} for head in heads}
            if improved:
                best_meta = dict(metadata, epoch=epoch + 1)
                save_checkpoint(out_dir / "checkpoint_best.pt", net, config, best_meta)
                if validation is not None:
                    write_text_atomic(out_dir / "validation_best.json",
                                      json.dumps(_json_ready(dict(validation, epoch=epoch + 1)), indent=1))
            save_checkpoint(out_dir / "checkpoint_latest.pt", net, config, dict(metadata, epoch=epoch + 1))
            if validation is not None:
                write_text_atomic(out_dir / "validation_latest.json",
                                  json.dumps(_json_ready(dict(validation, epoch=epoch + 1)), indent=1))
            save_state(out_dir / STATE_FILE, {
                "format": STATE_FORMAT, "version": STATE_VERSION, "epoch": epoch + 1,
                "config": config.to_dict(), "options": asdict(options),
                "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state()},
                "best_metric": best_metric, "best_epoch": best_epoch,
                "train_cases": train_ids, "val_cases": val_ids, "world_size": dist.world_size,
            })
            write_logs(out_dir, rows)
            plot_curves(out_dir, rows, config.phases, labels)
            if dist.is_main:
                summary = f"epoch {epoch + 1}/{options.epochs}: loss {means['total']:.4f}, " \
                          f"{speed:.2f} it/s, {seconds:.0f} s"
                if validation is not None:
                    dice = ", ".join(f"{h} {validation['mean_foreground_dice'][h]:.3f}" for h in heads)
                    summary += f"; val mean Dice {dice}"
                print(summary, file=sys.stderr, flush=True)
        dist.barrier()

    if dist.is_main and last_epoch == options.epochs:
        add_fingerprint(out_dir, dataset.root, train_ids, val_ids, options, device, show)
    dist.barrier()
    return TrainResult(out_dir, net, config, last_epoch, best_metric, best_epoch, rows, speed)


def add_fingerprint(out_dir: Path, dataset_root: Path, train_ids: Sequence[str],
                    val_ids: Sequence[str], options: TrainingOptions, device, show: bool) -> None:
    """The finished run's checkpoints get the training fingerprint of the best one (maml.domain):
    feature statistics from the training cases, distance limits from the validation cases."""
    from .fingerprint import compute_fingerprint
    from .model import load_model

    best = load_model(out_dir / "checkpoint_best.pt", device)
    if show:
        print("training fingerprint (out-of-distribution check) ...", file=sys.stderr, flush=True)
    fingerprint = compute_fingerprint(best, dataset_root, train_ids, val_ids, options.register,
                                      data_kind=options.data_kind, device=str(device))
    for name in ("checkpoint_best.pt", "checkpoint_latest.pt"):
        model = best if name == "checkpoint_best.pt" else load_model(out_dir / name, device)
        save_checkpoint(out_dir / name, model.network, model.config,
                        dict(model.metadata, fingerprint=fingerprint))


def _json_ready(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value
