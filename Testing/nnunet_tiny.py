"""A tiny nnU-Net v2 model trained with the real ``nnunetv2`` package on venous-phase phantoms.

Used by the import tests (session fixture) and runnable alone: ``python Testing/nnunet_tiny.py DIR``.
nnU-Net fingerprints, plans and preprocesses the dataset with its command-line tools; the plans are
shrunk into "nnUNetTinyPlans" (3 stages, 4..16 features, a 16 x 32 x 32 patch, a fixed spacing);
two folds are trained with a trainer subclass of a few dozen iterations and predicted with nnU-Net's
predictor (``nnunet_tiny_driver.py``). The environment points nnU-Net's three folders into ``root``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DATASET_ID = 917
DATASET_NAME = f"Dataset{DATASET_ID:03d}_MAMLTinyVenous"
PLANS = "nnUNetTinyPlans"
TRAINER = "nnUNetTrainerTiny"
CONFIGURATION = "3d_fullres"
FOLDS = (0, 1)
N_CASES = 4
SEED = 744
# (z, y, x) mm: the phantoms' slice spacing and a round in-plane spacing inside their range.
SPACING = [5.0, 4.2, 4.2]
DRIVER = Path(__file__).with_name("nnunet_tiny_driver.py")


@dataclass
class TinyNNUNet:
    root: Path
    env: dict
    raw: Path
    model_folder: Path
    cases: list[str]  # case ids of the training set

    def image(self, case_id: str) -> Path:
        return self.raw / "imagesTr" / f"{case_id}_0000.nii.gz"


def nnunet_env(root: Path) -> dict:
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_n_proc_DA": "1",
        "nnUNet_def_n_proc": "1",
        "nnUNet_compile": "false",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    })
    return env


def _tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _run(args: list[str], env: dict) -> None:
    # nnU-Net's progress bars are UTF-8 whatever the locale of the test run.
    result = subprocess.run(args, env=env, capture_output=True, encoding="utf-8", errors="replace")
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed ({result.returncode}):\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def write_raw_dataset(root: Path) -> tuple[Path, list[str]]:
    """Venous-phase phantoms as a one-channel nnU-Net raw dataset (channel 0 = venous CT)."""
    from maml.synthetic import write_dataset

    phantoms = root / "phantoms"
    write_dataset(phantoms, N_CASES, SEED, size="tiny", contact_sheet=False, progress=False)
    raw = root / "raw" / DATASET_NAME
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(exist_ok=True)
    cases = sorted(p.name[:-len(".nii.gz")] for p in (phantoms / "labelsTr").glob("*.nii.gz"))
    for case in cases:
        shutil.copy(phantoms / "imagesTr" / f"{case}_0001.nii.gz", raw / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copy(phantoms / "labelsTr" / f"{case}.nii.gz", raw / "labelsTr" / f"{case}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1, "tumor": 2},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "name": "MAML tiny venous phantoms",
    }, indent=2))
    return raw, cases


def write_tiny_plans(preprocessed: Path) -> None:
    """nnU-Net's own plans, shrunk to a CPU budget, saved as a second plans file."""
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["plans_name"] = PLANS
    config = plans["configurations"][CONFIGURATION]
    config.update({"data_identifier": f"{PLANS}_{CONFIGURATION}", "patch_size": [16, 32, 32],
                   "spacing": SPACING, "batch_size": 2})
    config["architecture"]["arch_kwargs"].update({
        "n_stages": 3, "features_per_stage": [4, 8, 16],
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2],
    })
    plans["configurations"] = {CONFIGURATION: config}
    (preprocessed / f"{PLANS}.json").write_text(json.dumps(plans, indent=2))


def write_splits(preprocessed: Path, cases: list[str]) -> None:
    """Two folds, each validating on half the cases (nnU-Net's default five need five cases)."""
    half = len(cases) // 2
    splits = [{"train": cases[half:], "val": cases[:half]}, {"train": cases[:half], "val": cases[half:]}]
    (preprocessed / "splits_final.json").write_text(json.dumps(splits, indent=2))


def build(root: str | Path) -> TinyNNUNet:
    """Writes the dataset, plans, preprocesses and trains both folds under ``root``."""
    root = Path(root)
    env = nnunet_env(root)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    raw, cases = write_raw_dataset(root)
    did = str(DATASET_ID)
    _run([_tool("nnUNetv2_extract_fingerprint"), "-d", did, "-np", "1"], env)
    _run([_tool("nnUNetv2_plan_experiment"), "-d", did], env)
    preprocessed = root / "preprocessed" / DATASET_NAME
    write_tiny_plans(preprocessed)
    write_splits(preprocessed, cases)
    _run([_tool("nnUNetv2_preprocess"), "-d", did, "-plans_name", PLANS, "-c", CONFIGURATION,
          "-np", "1"], env)
    for fold in FOLDS:
        # Augmentation inside the training process: no worker processes on a 2-core machine.
        _run([sys.executable, str(DRIVER), "train", did, PLANS, str(fold)],
             {**env, "nnUNet_n_proc_DA": "0"})
    model_folder = root / "results" / DATASET_NAME / f"{TRAINER}__{PLANS}__{CONFIGURATION}"
    return TinyNNUNet(root, env, raw, model_folder, cases)


def nnunet_predict(tiny: TinyNNUNet, images: list[Path], out: Path, folds=FOLDS) -> Path:
    """nnU-Net's predictor on the given one-channel images, probabilities saved (``CASE.npz``)."""
    source = out / "input"
    source.mkdir(parents=True, exist_ok=True)
    for image in images:
        case = image.name.split(".")[0]
        case = case[:-5] if case.endswith("_0000") else case
        shutil.copy(image, source / f"{case}_0000.nii.gz")
    prediction = out / "prediction"
    prediction.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, str(DRIVER), "predict", str(tiny.model_folder), str(source), str(prediction),
          *map(str, folds)], tiny.env)
    return prediction


if __name__ == "__main__":
    import time

    start = time.time()
    tiny = build(sys.argv[1])
    print(f"trained {tiny.model_folder} in {time.time() - start:.0f} s")
