"""nnU-Net v2's own training and prediction for the tiny test model, run in a subprocess whose
environment names nnU-Net's folders (``nnunet_tiny.py`` starts it).

    python nnunet_tiny_driver.py train DATASET_ID PLANS FOLD
    python nnunet_tiny_driver.py predict MODEL_FOLDER INPUT_FOLDER OUTPUT_FOLDER FOLD [FOLD ...]

Training: nnU-Net's ``get_trainer_from_args`` and ``run_training`` (what ``nnUNetv2_train`` runs,
without its final validation export). Prediction: ``nnUNetPredictor`` with the settings of
``nnUNetv2_predict`` (step size 0.5, Gaussian, mirroring, ``--save_probabilities``).

One thing differs from the command-line tools: nnU-Net finds a trainer class by name by importing
every trainer module it ships, among them Primus, which needs timm, which needs a torchvision built
for this CPU torch that the package index does not have. The lookup is therefore pointed at the
trainer class below; the class itself, the network it builds and all of training and prediction
are nnU-Net's.
"""

import sys

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerTiny(nnUNetTrainer):
    """A few dozen iterations: enough for a model with a visible liver, minutes on one core."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 6
        self.num_iterations_per_epoch = 40
        self.num_val_iterations_per_epoch = 2


def _find_trainer(name: str):
    if name != nnUNetTrainerTiny.__name__:
        raise RuntimeError(f"this driver knows only {nnUNetTrainerTiny.__name__}, not {name}")
    return nnUNetTrainerTiny


def train(dataset_id: str, plans: str, fold: str) -> None:
    import nnunetv2.run.run_training as run_training

    run_training.recursive_find_trainer_class_by_name = _find_trainer
    trainer = run_training.get_trainer_from_args(dataset_id, "3d_fullres", int(fold),
                                                 nnUNetTrainerTiny.__name__, plans,
                                                 device=torch.device("cpu"))
    trainer.run_training()


def predict(model_folder: str, source: str, target: str, folds: list[str]) -> None:
    import nnunetv2.inference.predict_from_raw_data as predict_module

    predict_module.recursive_find_trainer_class_by_name = _find_trainer
    predictor = predict_module.nnUNetPredictor(
        tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
        perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
        allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, [int(f) for f in folds],
                                                   "checkpoint_final.pth")
    predictor.predict_from_files_sequential(source, target, save_probabilities=True, overwrite=True)


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "train":
        train(*arguments)
    elif command == "predict":
        predict(arguments[0], arguments[1], arguments[2], arguments[3:])
    else:
        raise SystemExit(f"unknown command {command!r}")
