"""Training MAML on an nnU-Net v2 raw data set: one process, or many under ``torchrun``.

What a run writes to OUT (rank 0 only):

- ``preprocessed/``: the cache of resampled, normalised cases (:mod:`maml.training.dataset`), reused on resume.
- ``checkpoint_latest.pt`` (every epoch), ``checkpoint_final.pt`` (the finished run, what nnU-Net
  ships and validates) and ``checkpoint_best.pt`` (the epoch with the highest moving average of the
  fused head's pseudo-Dice on fixed validation patches, nnU-Net's rule): models in the maml
  checkpoint format (:func:`maml.model.save_checkpoint`), loadable by ``maml info`` and inference.
  None of them is chosen on the cases a report is made on: report on a test set (``maml evaluate``).
- ``training_state.pt``: everything needed to continue exactly (weights, optimiser, AMP scaler, RNG
  state, epoch, best score, options, case split); tensors and plain data only (``weights_only``
  loading). Written last at the end of every epoch, so a killed run loses at most one epoch.
- ``log.jsonl`` / ``log.csv`` (one row per epoch: losses, pseudo-Dice per head and label and its
  moving average, full-volume Dice and ASSD when validated, learning rate, seconds),
  ``training_curves.png``, ``validation_final.json`` (full volumes of the validation cases with
  the final checkpoint, per case and head: the fused head and each phase's own head, i.e. the
  paper's Tables 1 and 2 from one run) and ``validation_latest.json`` when ``--val-every N`` asks
  for full volumes during training.

Determinism: the network is initialised from the seed; patch ``i`` of epoch ``e`` on rank ``r`` is a
pure function of (seed, e, r, i) (:class:`maml.training.loading.PatchDataset`), modality dropout of (seed, e,
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
from .distributed import Distributed, setup_distributed
from .logs import plot_curves, read_log, write_logs
from .options import RESUMABLE_OVERRIDES, TrainingOptions, poly_lr
from .state import (STATE_FILE, STATE_FORMAT, STATE_VERSION, json_ready, numpy_rng_state,
                    set_numpy_rng_state, load_state, save_state)
from .validation import (exponential_moving_average, pseudo_dice, validate,
                         validation_patches)


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


def _flatten_pseudo_dice(dice: dict, ema: float | None) -> dict:
    row = {f"val_pseudo_dice_{head}_{label}": value
           for head, values in dice.items() for label, value in values.items() if label != "mean"}
    row.update({f"val_pseudo_dice_{head}": values["mean"] for head, values in dice.items()})
    row["val_pseudo_dice_ema_fused"] = ema
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
    the data set (:func:`maml.training.dataset.config_for_dataset`). ``overrides``: names of options
    the user set explicitly; on resume only those in ``RESUMABLE_OVERRIDES`` replace the saved ones.
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
    try:
        trainer = Trainer(dataset_dir, out_dir, config, options, state, dist, device,
                          show=progress and dist.is_main, callback=callback, command=command)
        trainer.setup_data()
        trainer.setup_network(init_from)
        return trainer.run(stop_after_epochs)
    finally:
        dist.close()


class Trainer:
    """One training run, in the steps nnUNetTrainer has: data, network and optimiser, the loader,
    one iteration, one epoch, the per-epoch validation, checkpoints and logs, the end of the run."""

    def __init__(self, dataset_dir, out_dir: Path, config: ModelConfig, options: TrainingOptions,
                 state: dict | None, dist: Distributed, device: torch.device, show: bool = True,
                 callback: Callable[[dict], None] | None = None, command: str | None = None):
        self.dataset_dir, self.out_dir = dataset_dir, out_dir
        self.config, self.options, self.state = config, options, state
        self.dist, self.device, self.show = dist, device, show
        self.callback, self.command = callback, command
        self.rows: list[dict] = []
        self.start_epoch = 0
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.pseudo_dice_ema: float | None = None

    # ---- data ------------------------------------------------------------------------------

    def setup_data(self) -> None:
        """The data set, its split, intensity statistics and the preprocessed cache."""
        dataset = read_dataset(self.dataset_dir)
        config, options, dist = self.config, self.options, self.dist
        if self.state is None:
            config = config_for_dataset(config, dataset, options.normalization)
        elif len(dataset.channel_names) != len(config.phases):
            raise InputError(f"data set {dataset.root} has {len(dataset.channel_names)} channels; the "
                             f"run being resumed trains phases {config.phases}")
        train_ids, val_ids = split_cases(dataset.cases, options.fold, options.n_folds,
                                         options.val_cases)
        if self.state is not None and (self.state["train_cases"] != train_ids
                                       or self.state["val_cases"] != val_ids):
            raise InputError(f"the cases of {dataset.root} differ from those of the run being resumed")
        if config.missing_intensity_properties():
            # Every rank computes the same statistics (deterministic sampling), no broadcast needed.
            config.intensity_properties.update(dataset_intensity_properties(
                dataset, config, train_ids, options.register, progress=self.show))
            config.validate()
        if dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        cache = PreprocessedCache(self.out_dir / "preprocessed", config, dataset, options.register)
        if dist.is_main:
            cache.prepare_folder()
        dist.barrier()
        cache.build(train_ids + val_ids, progress=self.show, rank=dist.rank, world_size=dist.world_size)
        dist.barrier()
        self.dataset, self.config = dataset, config
        self.train_ids, self.val_ids = train_ids, val_ids
        self.train_cases = [cache.load(c) for c in train_ids]
        self.val_cases = [cache.load(c) for c in val_ids] if dist.is_main else []
        self.labels = {l.name: l.value for l in config.labels if l.value != 0}
        self.heads = ["fused", *config.phases]
        self.val_patches = validation_patches(self.val_cases, config.patch_size, options.val_patches,
                                              options.seed, options.batch_size)

    # ---- network, optimiser, loss ----------------------------------------------------------

    def setup_network(self, init_from: Mapping[str, str] | None = None) -> None:
        config, options, device = self.config, self.options, self.device
        torch.manual_seed(options.seed)
        net = MAMLNet(config)
        if self.state is None and init_from:
            from ..nnunet_import import initialise_backbones

            initialise_backbones(net, init_from)  # the MA module and fused head start fresh
        use_cuda = device.type == "cuda"
        self.amp = bool(options.amp and use_cuda)
        self.memory_format = torch.channels_last_3d if (use_cuda and options.channels_last) else None
        net.to(device)
        if self.memory_format is not None:
            net.to(memory_format=self.memory_format)
        if options.optimizer == "adam":
            optimizer = torch.optim.Adam(net.parameters(), lr=options.lr(),
                                         weight_decay=options.weight_decay)
        else:
            optimizer = torch.optim.SGD(net.parameters(), lr=options.lr(), momentum=options.momentum,
                                        nesterov=True, weight_decay=options.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        loss_fn = (MutualLearningLoss.published_code() if options.loss_variant == "code"
                   else MutualLearningLoss(lambda_intra=options.lambda_intra,
                                           deep_supervision=config.network.deep_supervision))
        if options.loss_variant == "code" and options.lambda_intra is not None:
            loss_fn.lambda_intra = float(options.lambda_intra)
        if options.joint_weight is not None:
            loss_fn.fixed_joint_weight = float(options.joint_weight)
        self.net, self.optimizer = net, optimizer
        if self.state is not None:
            self._restore(self.state)
        model: nn.Module = TrainStep(net, loss_fn)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # Unused parameters exist by design: the lowest deep-supervision head has weight 0 and a
            # modality-dropout iteration skips the fusion and the other phases.
            model = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None,
                                            find_unused_parameters=True)
        self.model = model

    def _restore(self, state: dict) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        set_numpy_rng_state(state["rng"]["numpy"])
        self.start_epoch = int(state["epoch"])
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        self.pseudo_dice_ema = state.get("pseudo_dice_ema")
        self.rows = [r for r in read_log(self.out_dir) if r.get("epoch", 0) <= self.start_epoch]

    # ---- loading ---------------------------------------------------------------------------

    def build_loader(self):
        options = self.options
        self.patches = PatchDataset(
            self.train_cases, self.config.patch_size, options.iterations_per_epoch * options.batch_size,
            seed=options.seed, rank=self.dist.rank, oversample_foreground=options.oversample_foreground,
            augmentation=build_augmentation(options.augmentation, self.config.patch_size),
            batch_size=options.batch_size)
        return torch.utils.data.DataLoader(
            self.patches, batch_size=options.batch_size, shuffle=False, num_workers=options.num_workers,
            drop_last=True, pin_memory=self.device.type == "cuda")
        # Not persistent: a worker keeps the copy of the patch data set it was started with, so a
        # persistent one would never see set_epoch and would replay the first epoch's patches.

    # ---- one iteration, one epoch ----------------------------------------------------------

    def train_step(self, image: torch.Tensor, target: torch.Tensor, epoch: int, iteration: int):
        """One optimiser step; returns the loss breakdown."""
        options, config = self.options, self.config
        image = image.to(self.device, non_blocking=True)
        target = target.to(self.device, non_blocking=True)
        phases = None
        if options.modality_dropout > 0 and len(config.phases) > 1:
            rng = np.random.default_rng(item_seed(options.seed, epoch, 7, iteration))
            if rng.random() < options.modality_dropout:
                keep = int(rng.integers(len(config.phases)))
                phases = [config.phases[keep]]
                image = image[:, keep:keep + 1]
        if self.memory_format is not None:
            image = image.contiguous(memory_format=self.memory_format)
        self.optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()
        with autocast:
            _, breakdown = self.model(image, target, phases=phases)
        if not torch.isfinite(breakdown.total):
            raise MAMLError(f"training diverged: loss {float(breakdown.total)} at epoch "
                            f"{epoch + 1}, iteration {iteration + 1}; lower --lr")
        self.scaler.scale(breakdown.total).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), options.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return breakdown

    def train_epoch(self, loader, epoch: int) -> dict:
        """Trains one epoch; returns its log row (losses, learning rate, speed)."""
        options, config = self.options, self.config
        lr = poly_lr(options.lr(), epoch, options.epochs, options.poly_exponent)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.patches.set_epoch(epoch)
        torch.manual_seed(item_seed(options.seed, epoch, self.dist.rank, 1))
        self.model.train()
        sums = {"total": 0.0, "joint": 0.0, **{p: 0.0 for p in config.phases}}
        counts = {key: 0 for key in sums}
        started = time.perf_counter()
        iterator = loader
        if self.show:
            from tqdm import tqdm

            iterator = tqdm(loader, desc=f"epoch {epoch + 1}/{options.epochs}", unit="it",
                            leave=False, dynamic_ncols=True)
        for iteration, (image, target) in enumerate(iterator):
            breakdown = self.train_step(image, target, epoch, iteration)
            total = float(breakdown.total.detach())
            sums["total"] += total
            counts["total"] += 1
            if breakdown.joint is not None:
                sums["joint"] += breakdown.joint
                counts["joint"] += 1
            for phase, value in breakdown.intra.items():
                sums[phase] += value
                counts[phase] += 1
            if self.show:
                iterator.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}")
            if self.callback is not None:
                self.callback({"epoch": epoch, "iteration": iteration, "loss": total})
        seconds = time.perf_counter() - started
        means = torch.tensor([sums[k] / counts[k] if counts[k] else math.nan for k in sums],
                             dtype=torch.float64)
        if self.dist.enabled:
            torch.distributed.all_reduce(means)
            means /= self.dist.world_size
        means = dict(zip(sums, means.tolist()))
        self.speed = options.iterations_per_epoch / seconds
        return {"epoch": epoch + 1, "lr": lr, "train_loss": means["total"],
                "train_joint": means["joint"],
                **{f"train_intra_{p}": means[p] for p in config.phases},
                "train_seconds": round(seconds, 2), "iterations_per_second": round(self.speed, 4)}

    # ---- validation ------------------------------------------------------------------------

    def validate_patches(self, row: dict) -> bool:
        """The pseudo-Dice of every head on the fixed validation patches; True when the moving
        average of the fused head's is the best so far (checkpoint_best)."""
        if not self.val_patches:
            return not self.val_ids  # no validation (fold "all"): the latest is the best
        dice = pseudo_dice(self.net, self.val_patches, self.labels, self.device,
                           self.options.val_batch_size)
        self.pseudo_dice_ema = exponential_moving_average(self.pseudo_dice_ema, dice["fused"]["mean"])
        row.update(_flatten_pseudo_dice(dice, self.pseudo_dice_ema))
        if self.best_metric is None or self.pseudo_dice_ema > self.best_metric:
            self.best_metric = self.pseudo_dice_ema
            return True
        return False

    def validate_volumes(self, row: dict) -> dict:
        """Full-volume sliding-window validation of every head (slow: every N epochs, and at the end)."""
        started = time.perf_counter()
        validation = validate(self.net, self.val_cases, self.config, self.device,
                              self.options.val_overlap, self.options.val_batch_size, progress=self.show)
        row.update(_flatten_validation(validation, self.heads, list(self.labels)))
        row["val_seconds"] = round(time.perf_counter() - started, 2)
        return validation

    # ---- checkpoints and logs --------------------------------------------------------------

    def metadata(self, epoch: int, validation: dict | None) -> dict:
        options, dist = self.options, self.dist
        metadata = {
            "trained_epochs": epoch, "planned_epochs": options.epochs,
            "iterations_per_epoch": options.iterations_per_epoch,
            "batch_size": options.batch_size, "world_size": dist.world_size,
            "optimizer": options.optimizer, "learning_rate": options.lr(),
            "loss": options.loss_variant, "modality_dropout": options.modality_dropout,
            "augmentation": options.augmentation, "seed": options.seed,
            "dataset": self.dataset.name, "train_cases": len(self.train_ids),
            "validation_cases": len(self.val_ids), "validation_case_ids": list(self.val_ids),
            "fold": options.fold,
            "data_kind": options.data_kind or dataset_data_kind(self.dataset.root),
            "best_epoch": self.best_epoch,
            "validation_pseudo_dice_ema_fused": self.best_metric,
            "maml_version": __version__,
            "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if self.command:
            metadata["command"] = self.command
        if validation is not None:
            metadata["validation_dice"] = {
                head: {label: round(validation["summary"][head][label]["dice"], 4)
                       for label in self.labels} for head in self.heads}
        return metadata

    def save(self, epoch: int, row: dict, validation: dict | None, improved: bool) -> None:
        """Checkpoints, then the resumable state (last: a kill loses at most this epoch), logs."""
        out = self.out_dir
        metadata = self.metadata(epoch, validation)
        if improved:
            save_checkpoint(out / "checkpoint_best.pt", self.net, self.config,
                            dict(metadata, epoch=epoch))
        save_checkpoint(out / "checkpoint_latest.pt", self.net, self.config, dict(metadata, epoch=epoch))
        if validation is not None:
            write_text_atomic(out / "validation_latest.json",
                              json.dumps(json_ready(dict(validation, epoch=epoch)), indent=1))
        save_state(out / STATE_FILE, {
            "format": STATE_FORMAT, "version": STATE_VERSION, "epoch": epoch,
            "config": self.config.to_dict(), "options": asdict(self.options),
            "model": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": numpy_rng_state()},
            "best_metric": self.best_metric, "best_epoch": self.best_epoch,
            "pseudo_dice_ema": self.pseudo_dice_ema,
            "train_cases": self.train_ids, "val_cases": self.val_ids,
            "world_size": self.dist.world_size,
        })
        write_logs(out, self.rows)
        plot_curves(out, self.rows, self.config.phases, list(self.labels))

    def report(self, row: dict, validation: dict | None) -> None:
        summary = (f"epoch {row['epoch']}/{self.options.epochs}: loss {row['train_loss']:.4f}, "
                   f"{row['iterations_per_second']:.2f} it/s, {row['train_seconds']:.0f} s")
        if "val_pseudo_dice_fused" in row:
            dice = ", ".join(f"{h} {row[f'val_pseudo_dice_{h}']:.3f}" for h in self.heads)
            summary += f"; pseudo-Dice {dice} (fused average {row['val_pseudo_dice_ema_fused']:.3f})"
        if validation is not None:
            dice = ", ".join(f"{h} {validation['mean_foreground_dice'][h]:.3f}" for h in self.heads)
            summary += f"; full-volume Dice {dice}"
        print(summary, file=sys.stderr, flush=True)

    # ---- the run ---------------------------------------------------------------------------

    def run(self, stop_after_epochs: int | None = None) -> TrainResult:
        options, dist = self.options, self.dist
        loader = self.build_loader()
        last_epoch = options.epochs if stop_after_epochs is None else min(
            options.epochs, self.start_epoch + stop_after_epochs)
        self.speed = None
        if dist.is_main and self.start_epoch:
            print(f"resuming after epoch {self.start_epoch} of {options.epochs}", file=sys.stderr)
        for epoch in range(self.start_epoch, last_epoch):
            row = self.train_epoch(loader, epoch)
            validation = None
            improved = False
            if dist.is_main:
                improved = self.validate_patches(row)
                if improved:
                    self.best_epoch = epoch + 1
                full = options.val_every and (epoch + 1) % options.val_every == 0
                if self.val_cases and full and epoch + 1 < options.epochs:
                    validation = self.validate_volumes(row)
                self.rows.append(row)
                self.save(epoch + 1, row, validation, improved)
                self.report(row, validation)
            dist.barrier()
        if last_epoch == options.epochs:
            self.finish()
        return TrainResult(self.out_dir, self.net, self.config, last_epoch, self.best_metric,
                           self.best_epoch, self.rows, self.speed)

    def finish(self) -> None:
        """checkpoint_final, its full-volume validation, and the training fingerprint."""
        if self.dist.is_main:
            row = self.rows[-1] if self.rows else {}
            validation = self.validate_volumes(row) if self.val_cases else None
            metadata = self.metadata(self.options.epochs, validation)
            save_checkpoint(self.out_dir / "checkpoint_final.pt", self.net, self.config,
                            dict(metadata, epoch=self.options.epochs))
            if validation is not None:
                write_text_atomic(self.out_dir / "validation_final.json",
                                  json.dumps(json_ready(dict(validation, epoch=self.options.epochs)),
                                             indent=1))
                if self.show:
                    self.report(row, validation)
            write_logs(self.out_dir, self.rows)
            plot_curves(self.out_dir, self.rows, self.config.phases, list(self.labels))
            add_fingerprint(self.out_dir, self.dataset.root, self.train_ids, self.val_ids,
                            self.options, self.device, self.show)
        self.dist.barrier()


CHECKPOINTS = ("checkpoint_final.pt", "checkpoint_best.pt", "checkpoint_latest.pt")


def add_fingerprint(out_dir: Path, dataset_root: Path, train_ids: Sequence[str],
                    val_ids: Sequence[str], options: TrainingOptions, device, show: bool) -> None:
    """The finished run's checkpoints get the training fingerprint of the final one (maml.domain):
    feature statistics from the training cases, distance limits from the validation cases."""
    from ..model import load_model
    from .fingerprint import compute_fingerprint

    final = load_model(out_dir / "checkpoint_final.pt", device)
    if show:
        print("training fingerprint (out-of-distribution check) ...", file=sys.stderr, flush=True)
    fingerprint = compute_fingerprint(final, dataset_root, train_ids, val_ids, options.register,
                                      data_kind=options.data_kind, device=str(device))
    for name in CHECKPOINTS:
        if not (out_dir / name).is_file():
            continue
        model = final if name == "checkpoint_final.pt" else load_model(out_dir / name, device)
        save_checkpoint(out_dir / name, model.network, model.config,
                        dict(model.metadata, fingerprint=fingerprint))
