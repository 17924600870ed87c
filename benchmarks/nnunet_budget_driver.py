"""nnU-Net v2 itself, held to the shared budget of ``paper_tables.py``: planning, training and
prediction, each run in its own process whose environment names nnU-Net's three folders.

    python nnunet_budget_driver.py prepare BUDGET_JSON DATASET_ID [DATASET_ID ...]
    python nnunet_budget_driver.py train BUDGET_JSON DATASET_ID [continue]
    python nnunet_budget_driver.py predict MODEL_FOLDER INPUT_FOLDER OUTPUT_FOLDER

prepare: nnU-Net's fingerprint and its default experiment planner, then a second plans file
(``nnUNetBudgetPlans``) in which patch size, spacing, batch size and the U-Net's topology are those
of the budget (what the MAML arms use), then nnU-Net's preprocessing for those plans.
train: fold "all" with :class:`nnUNetTrainerBudget` (nnU-Net's trainer with the budget's epochs and
iterations per epoch), what ``nnUNetv2_train DATASET_ID 3d_fullres all -p nnUNetBudgetPlans -tr
nnUNetTrainerBudget`` runs, without its final validation export; ``continue`` goes on from the
latest checkpoint (``nnUNetv2_train ... --c``), which the budget trainer writes every 5 epochs.
predict: ``nnUNetPredictor`` with step size 0.5 and Gaussian weighting as ``nnUNetv2_predict``, but
without test-time mirroring, as the MAML arms are evaluated.

One thing differs from nnU-Net's command-line tools: nnU-Net finds a trainer class by name by
importing every trainer module it ships, among them Primus, which needs timm and a torchvision that
the CPU torch lacks; the lookup is pointed at the trainer class below. Network, loss, sampling,
augmentation, optimiser and schedule are nnU-Net's own.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

PLANS = "nnUNetBudgetPlans"
CONFIGURATION = "3d_fullres"


class nnUNetTrainerBudget(nnUNetTrainer):
    """nnU-Net's trainer with the shared iteration budget (set by ``train`` before it is built)."""

    EPOCHS = 1000
    ITERATIONS_PER_EPOCH = 250
    VAL_ITERATIONS_PER_EPOCH = 1  # fold "all" validates on training cases: only a progress signal
    SAVE_EVERY = 5  # epochs between checkpoint_latest.pth (nnU-Net: 50, more than a CPU budget has)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.EPOCHS
        self.num_iterations_per_epoch = self.ITERATIONS_PER_EPOCH
        self.num_val_iterations_per_epoch = self.VAL_ITERATIONS_PER_EPOCH
        self.save_every = self.SAVE_EVERY


def _find_trainer(name: str):
    if name != nnUNetTrainerBudget.__name__:
        raise RuntimeError(f"this driver knows only {nnUNetTrainerBudget.__name__}, not {name}")
    return nnUNetTrainerBudget


def budget_plans(plans: dict, budget: dict) -> dict:
    """nnU-Net's own plans with the budget's patch, spacing, batch size and topology."""
    plans = json.loads(json.dumps(plans))
    plans["plans_name"] = PLANS
    config = plans["configurations"][CONFIGURATION]
    n_stages = len(budget["strides"])
    config.update({"data_identifier": f"{PLANS}_{CONFIGURATION}", "patch_size": budget["patch_size"],
                   "spacing": budget["spacing"], "batch_size": budget["batch_size"]})
    config["architecture"]["arch_kwargs"].update({
        "n_stages": n_stages, "features_per_stage": budget["features_per_stage"],
        "kernel_sizes": budget["kernel_sizes"], "strides": budget["strides"],
        "n_conv_per_stage": [2] * n_stages, "n_conv_per_stage_decoder": [2] * (n_stages - 1),
    })
    plans["configurations"] = {CONFIGURATION: config}
    return plans


def prepare(budget_file: str, *dataset_ids: str) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints,
                                                                      plan_experiments, preprocess)
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    budget = json.loads(Path(budget_file).read_text())
    ids = [int(i) for i in dataset_ids]
    started = time.perf_counter()
    # the data sets are written by paper_tables.py from one aligned split: no integrity check
    extract_fingerprints(ids, num_processes=1, check_dataset_integrity=False, verbose=False,
                         show_progress_bar=False)
    print(f"fingerprints: {time.perf_counter() - started:.1f} s", flush=True)
    plan_experiments(ids)
    for dataset_id in ids:
        folder = Path(nnUNet_preprocessed) / convert_id_to_dataset_name(dataset_id)
        plans = json.loads((folder / "nnUNetPlans.json").read_text())
        (folder / f"{PLANS}.json").write_text(json.dumps(budget_plans(plans, budget), indent=2))
    print(f"plans: {time.perf_counter() - started:.1f} s", flush=True)
    preprocess(ids, PLANS, [CONFIGURATION], [1], verbose=False, show_progress_bar=False)
    print(f"preprocessing: {time.perf_counter() - started:.1f} s", flush=True)


def train(budget_file: str, dataset_id: str, resume: str = "") -> None:
    import nnunetv2.run.run_training as run_training

    if resume not in ("", "continue"):
        raise SystemExit(f"train: the optional last argument is 'continue', not {resume!r}")

    budget = json.loads(Path(budget_file).read_text())
    torch.set_num_threads(1)
    torch.manual_seed(int(budget["seed"]))
    nnUNetTrainerBudget.EPOCHS = int(budget["epochs"])
    nnUNetTrainerBudget.ITERATIONS_PER_EPOCH = int(budget["iterations_per_epoch"])
    run_training.recursive_find_trainer_class_by_name = _find_trainer
    trainer = run_training.get_trainer_from_args(dataset_id, CONFIGURATION, "all",
                                                 nnUNetTrainerBudget.__name__, PLANS,
                                                 device=torch.device("cpu"))
    run_training.maybe_load_checkpoint(trainer, continue_training=resume == "continue",
                                       validation_only=False)
    trainer.run_training()


def predict(model_folder: str, source: str, target: str) -> None:
    import nnunetv2.inference.predict_from_raw_data as predict_module

    torch.set_num_threads(1)
    predict_module.recursive_find_trainer_class_by_name = _find_trainer
    predictor = predict_module.nnUNetPredictor(
        tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
        perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
        allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, ["all"], "checkpoint_final.pth")
    predictor.predict_from_files_sequential(source, target, save_probabilities=False, overwrite=True)


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    commands = {"prepare": prepare, "train": train, "predict": predict}
    if command not in commands:
        raise SystemExit(f"unknown command {command!r}: one of {', '.join(commands)}")
    commands[command](*arguments)
