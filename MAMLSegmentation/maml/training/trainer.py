"""Training MAML on an nnU-Net v2 raw data set: one process, or many under ``torchrun``.

What a run writes to OUT (rank 0 only):

- ``preprocessed/``: the cache of resampled, normalised cases (:mod:`maml.training.dataset`), reused on resume.
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
pure function of (seed, e, r, i) (:class:`maml.training.dataset.PatchDataset`), modality dropout of (seed, e,
iteration); the learning rate is a function of the epoch. So ``--resume`` replays the remaining
epochs exactly as an uninterrupted run would (on the same hardware and thread count).

Distributed: under ``torchrun`` (WORLD_SIZE > 1) the process group starts from ``env://`` (nccl on
CUDA, gloo on the CPU), the model is wrapped in DistributedDataParallel, each rank draws its own
patches, preprocessing is shared out by case, and rank 0 validates and writes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..config import ModelConfig
from ..errors import InputError, MAMLError
from ..io import write_text_atomic
from ..model import save_checkpoint
from ..network import MAMLNet
from .dataset import (PreprocessedCache, config_for_dataset, dataset_intensity_properties, read_dataset, split_cases)
from .loading import PatchDataset, build_augmentation, item_seed
from .fingerprint import dataset_data_kind
from .losses import MutualLearningLoss
from .distributed import setup_distributed
from .logs import plot_curves, read_log, write_logs
from .options import RESUMABLE_OVERRIDES, TrainingOptions, poly_lr
from .state import (STATE_FILE, STATE_FORMAT, STATE_VERSION, json_ready, numpy_rng_state,
                    set_numpy_rng_state, load_state, save_state)
from .validation import validate

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
    the data set (:func:`maml.training.dataset.config_for_dataset`). ``overrides``: names of options the user set
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

    from ..inference import resolve_device

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
        from ..nnunet_import import initialise_backbones

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
        set_numpy_rng_state(state["rng"]["numpy"])
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
                                      json.dumps(json_ready(dict(validation, epoch=epoch + 1)), indent=1))
            save_checkpoint(out_dir / "checkpoint_latest.pt", net, config, dict(metadata, epoch=epoch + 1))
            if validation is not None:
                write_text_atomic(out_dir / "validation_latest.json",
                                  json.dumps(json_ready(dict(validation, epoch=epoch + 1)), indent=1))
            save_state(out_dir / STATE_FILE, {
                "format": STATE_FORMAT, "version": STATE_VERSION, "epoch": epoch + 1,
                "config": config.to_dict(), "options": asdict(options),
                "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": numpy_rng_state()},
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
    from ..model import load_model

    best = load_model(out_dir / "checkpoint_best.pt", device)
    if show:
        print("training fingerprint (out-of-distribution check) ...", file=sys.stderr, flush=True)
    fingerprint = compute_fingerprint(best, dataset_root, train_ids, val_ids, options.register,
                                      data_kind=options.data_kind, device=str(device))
    for name in ("checkpoint_best.pt", "checkpoint_latest.pt"):
        model = best if name == "checkpoint_best.pt" else load_model(out_dir / name, device)
        save_checkpoint(out_dir / name, model.network, model.config,
                        dict(model.metadata, fingerprint=fingerprint))
