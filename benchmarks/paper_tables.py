#!/usr/bin/env python
"""The MAML paper's Tables 1 and 2 on phantoms: MAML and its ablations against nnU-Net v2 itself.

    python benchmarks/paper_tables.py --setup        # nnunetv2 beside the installed torch (once)
    python benchmarks/paper_tables.py --quick        # every arm end to end on a small budget
    python benchmarks/paper_tables.py                # the full table (hours on 2 CPU cores)
    python benchmarks/paper_tables.py --work W       # ... keeping its models and logs in W
    python benchmarks/paper_tables.py --work W --resume   # after a stop: finished arms are kept

One phantom split: training cases from seeds ``--train-seed`` .., test cases from seeds
``--test-seed`` .. (used for nothing else: no arm validates, tunes or picks a checkpoint on them).
The arterial phase is put on the venous grid with the phantom's true transform once, and every arm
sees those same voxels, so registration is not part of the comparison. Every arm trains with the
same budget: epochs x iterations per epoch x batch size, patch size, spacing, per-phase U-Net
topology, nnU-Net's sampling and augmentation (batchgeneratorsv2 in both), SGD with nnU-Net's
learning rate, momentum, weight decay and polynomial schedule; fold "all" and the final checkpoint.

Arms (Table 1: both phases; Table 2: one phase):
- nnunet_both / nnunet_arterial / nnunet_venous: nnU-Net v2 itself (its planner, preprocessing,
  trainer and predictor; ``nnunet_budget_driver.py``) with both phases as channels, or one phase.
- ms_ensemble: ``maml train --joint-weight 0 --lambda-intra 1``: per-phase U-Nets trained
  independently, scored with ``maml evaluate --heads ensemble`` (mean of their probabilities).
- ms_ma: ``maml train --lambda-intra 0``: the MA fusion trained with the joint loss only.
- maml: ``maml train`` (the paper's loss, lambda 0.5); its fused head for Table 1 and its own
  per-phase heads for Table 2.
OctopusNet (per-phase encoders, one shared decoder) is not run: the engine has no such network.

Per arm: tumor Dice (mean +- sd over test cases), tumor ASSD in voxels and mm, liver Dice, lesion
sensitivity and false positives per case (``maml evaluate``'s definitions), training time; per-case
paired Wilcoxon signed-rank tests (scipy) of MAML against nnU-Net. Arms run side by side
(``--jobs``), one torch thread each. The results JSON (``benchmarks/results/``) holds the exact
commands, seeds, package versions and times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "MAMLSegmentation"
DRIVER = Path(__file__).with_name("nnunet_budget_driver.py")
RESULTS = Path(__file__).with_name("results")
sys.path.insert(0, str(ENGINE))
NNUNET_PIN = "nnunetv2==2.8.1"
PHASES = ("arterial", "venous")
LABELS = {"background": 0, "liver": 1, "tumor": 2}
PACKAGES = ("torch", "nnunetv2", "dynamic-network-architectures", "batchgeneratorsv2", "monai",
            "numpy", "scipy", "SimpleITK", "itk-elastix")
DATASET_IDS = {"nnunet_both": 951, "nnunet_arterial": 952, "nnunet_venous": 953}
TRAINER, PLANS = "nnUNetTrainerBudget", "nnUNetBudgetPlans"

# The paper's tumor Dice (%), Tables 1 and 2.
PAPER = {
    "table1": {"nnU-Net": 78.76, "OctopusNet": 78.89, "MS+Ensemble": 78.96, "MS+MA": 80.98,
               "MAML": 81.25},
    "table2": {"arterial": {"nnU-Net": 71.21, "MAML": 79.55},
               "venous": {"nnU-Net": 75.10, "MAML": 79.81}},
}


@dataclass
class Budget:
    """What every arm shares. Per-axis values are (z, y, x)."""

    size: str  # phantom size (maml.phantom.SIZES)
    train_cases: int
    test_cases: int
    epochs: int
    iterations_per_epoch: int
    batch_size: int
    patch_size: list[int]
    spacing: list[float]
    base_features: int
    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    max_features: int = 320
    learning_rate: float = 1e-2  # nnU-Net's SGD: momentum 0.99 (Nesterov), weight decay 3e-5, poly 0.9
    train_seed: int = 1000
    test_seed: int = 5000
    seed: int = 12345  # training seed of the MAML arms (and torch's in nnU-Net's process)

    @property
    def features_per_stage(self) -> list[int]:
        return [min(self.base_features * 2**s, self.max_features) for s in range(len(self.strides))]

    def iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch


DEMO_TOPOLOGY = {"base_features": 8, "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                 "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]}
BUDGETS = {
    # the full table: about 3 hours on 2 CPU cores, two arms at a time
    "full": Budget("demo", 24, 16, 40, 25, 2, [32, 64, 64], [3.0, 2.5, 2.5], **DEMO_TOPOLOGY),
    # every arm end to end: a coarser grid, a smaller patch, 120 iterations (12 min on 2 quiet cores)
    "quick": Budget("demo", 4, 4, 10, 12, 2, [24, 48, 48], [4.0, 3.5, 3.5], **DEMO_TOPOLOGY),
    # the harness's own test: minutes, figures meaningless
    "tiny": Budget("tiny", 2, 2, 1, 2, 2, [16, 32, 32], [5.0, 4.2, 4.2], base_features=4,
                   kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
                   strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]]),
}


@dataclass
class Arm:
    name: str
    kind: str  # "nnunet" or "maml"
    phases: tuple[str, ...]
    heads: tuple[str, ...]  # what is scored: nnU-Net's "prediction", or maml evaluate's heads
    train_flags: tuple[str, ...] = ()
    commands: list[list[str]] = field(default_factory=list)
    train_seconds: float | None = None
    evaluate_seconds: float | None = None
    revision: dict | None = None  # the code it ran (for an arm kept by --resume, an earlier one)
    # an arm stopped in training: seconds of the epochs its checkpoint keeps (--resume goes on)
    trained_seconds_before: float | None = None


ARMS = {
    "nnunet_both": Arm("nnunet_both", "nnunet", PHASES, ("prediction",)),
    "nnunet_arterial": Arm("nnunet_arterial", "nnunet", ("arterial",), ("prediction",)),
    "nnunet_venous": Arm("nnunet_venous", "nnunet", ("venous",), ("prediction",)),
    "ms_ensemble": Arm("ms_ensemble", "maml", PHASES, ("ensemble",),
                       ("--joint-weight", "0", "--lambda-intra", "1")),
    "ms_ma": Arm("ms_ma", "maml", PHASES, ("fused",), ("--lambda-intra", "0")),
    "maml": Arm("maml", "maml", PHASES, ("fused", "arterial", "venous")),
}
# (table, row, arm, head)
ROWS = [
    ("table1", "nnU-Net", "nnunet_both", "prediction"),
    ("table1", "MS+Ensemble", "ms_ensemble", "ensemble"),
    ("table1", "MS+MA", "ms_ma", "fused"),
    ("table1", "MAML", "maml", "fused"),
    ("table2_arterial", "nnU-Net", "nnunet_arterial", "prediction"),
    ("table2_arterial", "MAML", "maml", "arterial"),
    ("table2_venous", "nnU-Net", "nnunet_venous", "prediction"),
    ("table2_venous", "MAML", "maml", "venous"),
]
# Paired comparisons of MAML with nnU-Net: (name, MAML's (arm, head), nnU-Net's (arm, head))
COMPARISONS = [
    ("table1: MAML vs nnU-Net (both phases)", ("maml", "fused"), ("nnunet_both", "prediction")),
    ("table2: MAML arterial head vs nnU-Net arterial", ("maml", "arterial"), ("nnunet_arterial", "prediction")),
    ("table2: MAML venous head vs nnU-Net venous", ("maml", "venous"), ("nnunet_venous", "prediction")),
    ("table1: MAML vs MS+MA", ("maml", "fused"), ("ms_ma", "fused")),
    ("table1: MS+MA vs MS+Ensemble", ("ms_ma", "fused"), ("ms_ensemble", "ensemble")),
]


class HarnessError(RuntimeError):
    """A step of the benchmark failed; the message names it and its log."""


# Records of finished steps in the working folder: what ``--resume`` keeps.
DATA_RECORD, PREPARE_RECORD, ARM_RECORD = "data.json", "nnunet_prepare.json", "arm.json"
MAML_STATE = "training_state.pt"  # what ``maml train --resume`` continues from


# --------------------------------------------------------------------------------------------------
# Setup, environment, subprocesses
# --------------------------------------------------------------------------------------------------


def setup() -> None:
    """nnunetv2 beside the torch already installed (a constraints file holds torch); the torchvision
    and timm it pulls do not work with the CPU torch and nnU-Net's training does not need them."""
    import torch

    try:
        if version("nnunetv2") == NNUNET_PIN.split("==")[1]:
            subprocess.run([sys.executable, "-c", "import nnunetv2, batchgeneratorsv2"], check=True,
                           capture_output=True)
            print(f"{NNUNET_PIN} already installed beside torch {torch.__version__}")
            return
    except (PackageNotFoundError, subprocess.CalledProcessError):
        pass
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write(f"torch=={torch.__version__}\n")
    pip = [sys.executable, "-m", "pip"]
    try:
        subprocess.run([*pip, "install", "-q", "-c", constraints.name, NNUNET_PIN], check=True)
        subprocess.run([*pip, "uninstall", "-q", "-y", "torchvision", "timm"], check=True)
    finally:
        os.unlink(constraints.name)
    subprocess.run([sys.executable, "-c", "import nnunetv2, batchgeneratorsv2"], check=True)
    print(f"{NNUNET_PIN} installed beside torch {torch.__version__}")


def package_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> dict:
    def git(*args):
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else None

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def child_env(extra: dict | None = None) -> dict:
    """One thread per process; the engine of this checkout first on the path."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join(
                    [str(ENGINE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])})
    env.update(extra or {})
    return env


def nnunet_env(work: Path, augmentation_processes: int = 0) -> dict:
    """nnU-Net's folders under ``work``; augmentation in the training process itself (0) except for
    the planner, which sets torch's thread count from that number."""
    return child_env({"nnUNet_raw": str(work / "nnunet" / "raw"),
                      "nnUNet_preprocessed": str(work / "nnunet" / "preprocessed"),
                      "nnUNet_results": str(work / "nnunet" / "results"),
                      "nnUNet_n_proc_DA": str(augmentation_processes), "nnUNet_def_n_proc": "1",
                      "nnUNet_compile": "false"})


def run_logged(command: list[str], log: Path, env: dict, what: str) -> float:
    """Runs a command with its output in ``log``; returns its wall time; fails naming the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "a", encoding="utf-8") as stream:
        stream.write("$ " + shlex.join(command) + "\n")
        stream.flush()
        result = subprocess.run(command, env=env, stdout=stream, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise HarnessError(f"{what} failed (exit {result.returncode}); log {log}:\n{tail}")
    return seconds


def maml_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "maml.cli", *args]


# --------------------------------------------------------------------------------------------------
# Data: phantoms, the aligned split, nnU-Net's raw data sets
# --------------------------------------------------------------------------------------------------


def write_phantoms(out: Path, n_cases: int, seed: int, size: str) -> Path:
    """The only place that calls the phantom generator."""
    from maml.synthetic import write_dataset

    return write_dataset(out, n_cases, seed, size=size, contact_sheet=False, progress=False)


def write_aligned(phantoms: Path, out: Path) -> list[str]:
    """The phantom data set with the arterial phase resampled onto the venous (label) grid through
    the phantom's true transform: what every arm trains on or is tested on."""
    import SimpleITK as sitk

    from maml.config import demo_config
    from maml.training.dataset import config_for_dataset, load_case_images, read_dataset

    dataset = read_dataset(phantoms)
    config = config_for_dataset(demo_config(), dataset)
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    for case in dataset.cases:
        images, label = load_case_images(dataset, config, case, "transforms")
        for channel, phase in enumerate(PHASES):
            sitk.WriteImage(images[phase], str(out / "imagesTr" / f"{case}_{channel:04d}.nii.gz"), True)
        sitk.WriteImage(label, str(out / "labelsTr" / f"{case}.nii.gz"), True)
    description = json.loads((phantoms / "dataset.json").read_text())
    description["description"] += " Arterial phase resampled onto the venous grid (true transform)."
    (out / "dataset.json").write_text(json.dumps(description, indent=2))
    return list(dataset.cases)


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy(source, target)


def write_nnunet_raw(aligned: Path, raw_root: Path, arm: Arm, cases: list[str]) -> Path:
    """One nnU-Net raw data set: the arm's phases as channels (named CT: nnU-Net's CT normalisation)."""
    name = f"Dataset{DATASET_IDS[arm.name]:03d}_MAMLTables_{arm.name.split('_', 1)[1]}"
    raw = raw_root / name
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for case in cases:
        for channel, phase in enumerate(arm.phases):
            _link(aligned / "imagesTr" / f"{case}_{PHASES.index(phase):04d}.nii.gz",
                  raw / "imagesTr" / f"{case}_{channel:04d}.nii.gz")
        _link(aligned / "labelsTr" / f"{case}.nii.gz", raw / "labelsTr" / f"{case}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): "CT" for i in range(len(arm.phases))},
        "labels": LABELS, "numTraining": len(cases), "file_ending": ".nii.gz",
        "name": f"MAML paper tables, {'+'.join(arm.phases)}",
    }, indent=2))
    return raw


def nnunet_test_inputs(aligned_test: Path, out: Path, arm: Arm, cases: list[str]) -> Path:
    out.mkdir(parents=True)
    for case in cases:
        for channel, phase in enumerate(arm.phases):
            _link(aligned_test / "imagesTr" / f"{case}_{PHASES.index(phase):04d}.nii.gz",
                  out / f"{case}_{channel:04d}.nii.gz")
    return out


def maml_config(budget: Budget):
    """The MAML arms' model: the budget's spacing, patch and per-phase U-Net (nnU-Net's plans)."""
    from maml.config import LIVER_LABELS, ModelConfig, NetworkConfig

    return ModelConfig(
        name="maml-paper-tables", phases=list(PHASES), labels=list(LIVER_LABELS),
        spacing=list(budget.spacing), patch_size=list(budget.patch_size),
        normalization={p: "ct_dataset" for p in PHASES},
        network=NetworkConfig(base_features=budget.base_features, max_features=budget.max_features,
                              kernel_sizes=budget.kernel_sizes, strides=budget.strides))


# --------------------------------------------------------------------------------------------------
# Arms
# --------------------------------------------------------------------------------------------------


def nnunet_prepare(work: Path, budget_file: Path, arms: list[Arm]) -> float:
    command = [sys.executable, str(DRIVER), "prepare", str(budget_file),
               *[str(DATASET_IDS[a.name]) for a in arms]]
    for arm in arms:
        arm.commands.append(command)
    record = read_record(work / PREPARE_RECORD)
    if record is not None:
        return record["seconds"]
    shutil.rmtree(work / "nnunet" / "preprocessed", ignore_errors=True)  # an interrupted one
    seconds = run_logged(command, work / "logs" / "nnunet_prepare.log", nnunet_env(work, 1),
                         "nnU-Net planning and preprocessing")
    write_record(work / PREPARE_RECORD, {"seconds": seconds})
    return seconds


def read_record(path: Path) -> dict | None:
    """A finished step's record, or None when the step has not finished (or never ran)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_record(path: Path, record: dict) -> None:
    from maml.io import write_json

    write_json(record, path)  # atomic: a record is whole or absent


def finished_arm(arm: Arm, work: Path) -> bool:
    """True when a previous run finished ``arm`` (its record and evaluation are there): its commands
    and times are taken from the record. Otherwise what an interrupted run left of it is removed."""
    record = read_record(work / arm.name / ARM_RECORD)
    if record is not None and (work / arm.name / "eval.json").is_file():
        arm.commands[:] = record["commands"]
        arm.train_seconds, arm.evaluate_seconds = record["train_seconds"], record["evaluate_seconds"]
        arm.revision = record.get("revision")
        arm.trained_seconds_before = record.get("trained_seconds_before_resume")
        return True
    if arm.kind == "maml" and (work / arm.name / "model" / MAML_STATE).is_file():
        # maml train --resume replays the rest exactly: keep the model folder, drop the rest
        for path in (work / arm.name).iterdir():
            if path.name != "model":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        arm.trained_seconds_before = epoch_seconds(work / arm.name / "model")
        return False
    shutil.rmtree(work / arm.name, ignore_errors=True)
    if arm.kind == "nnunet":
        for folder in (work / "nnunet" / "results").glob(f"Dataset{DATASET_IDS[arm.name]:03d}_*"):
            model = nnunet_model(folder) / "fold_all"
            if (model / "checkpoint_latest.pth").is_file() or (model / "checkpoint_final.pth").is_file():
                arm.trained_seconds_before = nnunet_epoch_seconds(model)  # nnU-Net continues it
            else:
                shutil.rmtree(folder, ignore_errors=True)
    return False


def nnunet_model(results_dataset: Path) -> Path:
    """nnU-Net's model folder for the budget's trainer and plans in a data set's results folder."""
    return results_dataset / f"{TRAINER}__{PLANS}__3d_fullres"


def nnunet_epoch_seconds(model: Path) -> float:
    """Seconds of the epochs nnU-Net logged before it was stopped (its training_log files); epochs
    after the last checkpoint are counted although they will run again."""
    seconds = 0.0
    for log in model.glob("training_log_*.txt"):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if "Epoch time:" in line:
                seconds += float(line.split("Epoch time:")[1].split()[0])
    return seconds


def epoch_seconds(model: Path) -> float:
    """Training seconds of the epochs a stopped ``maml train`` run logged (its checkpoint's)."""
    log = model / "log.jsonl"
    if not log.is_file():
        return 0.0
    rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    return float(sum(row.get("train_seconds") or 0.0 for row in rows))


def record_arm(arm: Arm, work: Path) -> None:
    arm.revision = git_revision()
    record = {"commands": arm.commands, "train_seconds": arm.train_seconds,
              "evaluate_seconds": arm.evaluate_seconds, "revision": arm.revision}
    if arm.trained_seconds_before is not None:
        record["trained_seconds_before_resume"] = arm.trained_seconds_before
    write_record(work / arm.name / ARM_RECORD, record)


def run_nnunet_arm(arm: Arm, work: Path, budget_file: Path, test_cases: list[str]) -> None:
    env = nnunet_env(work)
    log = work / "logs" / f"{arm.name}.log"
    dataset_id = str(DATASET_IDS[arm.name])
    train = [sys.executable, str(DRIVER), "train", str(budget_file), dataset_id,
             *(["continue"] if arm.trained_seconds_before is not None else [])]
    arm.commands.append(train)
    arm.train_seconds = (run_logged(train, log, env, f"arm {arm.name}: nnU-Net training")
                         + (arm.trained_seconds_before or 0.0))
    raw_name = next((work / "nnunet" / "raw").glob(f"Dataset{dataset_id}_*")).name
    model = nnunet_model(work / "nnunet" / "results" / raw_name)
    inputs = nnunet_test_inputs(work / "test", work / arm.name / "input", arm, test_cases)
    prediction = work / arm.name / "prediction"
    prediction.mkdir()
    predict = [sys.executable, str(DRIVER), "predict", str(model), str(inputs), str(prediction)]
    evaluate = maml_command("evaluate", "--pred", str(prediction), "--gt",
                            str(work / "test" / "labelsTr"), "--out", str(work / arm.name / "eval"),
                            "--no-progress")
    arm.commands += [predict, evaluate]
    arm.evaluate_seconds = (run_logged(predict, log, env, f"arm {arm.name}: nnU-Net prediction")
                            + run_logged(evaluate, log, env, f"arm {arm.name}: evaluation"))
    record_arm(arm, work)


def run_maml_arm(arm: Arm, work: Path, budget: Budget, config_file: Path) -> None:
    env = child_env()
    log = work / "logs" / f"{arm.name}.log"
    out = work / arm.name / "model"
    train = maml_command(
        "train", "--dataset", str(work / "train"), "--out", str(out), "--config", str(config_file),
        "--fold", "all", "--epochs", str(budget.epochs), "--iterations", str(budget.iterations_per_epoch),
        "--batch-size", str(budget.batch_size), "--optimizer", "sgd", "--lr", str(budget.learning_rate),
        "--augmentation", "default", "--seed", str(budget.seed), "--device", "cpu", "--threads", "1",
        "--workers", "0", "--no-progress", *arm.train_flags,
        *(["--resume"] if arm.trained_seconds_before is not None else []))
    evaluate = maml_command(
        "evaluate", "--model", str(out / "checkpoint_final.pt"), "--dataset", str(work / "test"),
        "--register", "none", "--heads", *arm.heads, "--device", "cpu", "--backend", "torch",
        "--out", str(work / arm.name / "eval"), "--no-progress")
    arm.commands += [train, evaluate]
    # a resumed arm's training time: this run's plus the epochs it kept (their logged seconds)
    arm.train_seconds = (run_logged(train, log, env, f"arm {arm.name}: maml train")
                         + (arm.trained_seconds_before or 0.0))
    arm.evaluate_seconds = run_logged(evaluate, log, env, f"arm {arm.name}: maml evaluate")
    record_arm(arm, work)


def run_tasks(tasks: dict, jobs: int) -> None:
    """``tasks``: name -> (names it waits for, callable), started in order as slots free up."""
    done: set[str] = set()
    pending = dict(tasks)
    running = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for name in [n for n, (deps, _) in pending.items() if set(deps) <= done]:
                if len(running) >= jobs:
                    break
                running[pool.submit(pending.pop(name)[1])] = name
            if not running:
                raise HarnessError(f"tasks {sorted(pending)} wait for tasks that never ran")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                future.result()  # a failed arm stops the benchmark: its figures would be missing
                done.add(name)
                print(f"[{time.strftime('%H:%M:%S')}] {name} done", flush=True)


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def head_results(work: Path, arm: Arm) -> dict[str, dict]:
    """head -> maml evaluate's result (summary, lesion summary, per-case rows)."""
    data = json.loads((work / arm.name / "eval.json").read_text())
    return data["heads"] if "heads" in data else {"prediction": data}


def row_figures(result: dict) -> dict:
    summary, lesions = result["summary"], result.get("lesion_summary") or {}
    tumor_cases = {r["case"]: r["dice"] for r in result["cases"] if r["label"] == "tumor"}
    return {
        "tumor_dice_mean": summary["tumor"]["dice"]["mean"], "tumor_dice_sd": summary["tumor"]["dice"]["std"],
        "tumor_assd_voxels_mean": summary["tumor"]["assd_voxels"]["mean"],
        "tumor_assd_voxels_sd": summary["tumor"]["assd_voxels"]["std"],
        "tumor_assd_mm_mean": summary["tumor"]["assd_mm"]["mean"],
        "tumor_assd_mm_sd": summary["tumor"]["assd_mm"]["std"],
        "tumor_assd_undefined_cases": summary["tumor"]["assd_mm"]["n_undefined"],
        "liver_dice_mean": summary["liver"]["dice"]["mean"], "liver_dice_sd": summary["liver"]["dice"]["std"],
        "lesion_sensitivity": lesions.get("lesion_sensitivity"),
        "false_positives_per_case": lesions.get("false_positives_per_case"),
        "reference_lesions": lesions.get("reference_lesions"),
        "tumor_dice_per_case": tumor_cases,
    }


def wilcoxon(a: dict[str, float], b: dict[str, float]) -> dict:
    """Paired two-sided Wilcoxon signed-rank test of per-case tumor Dice (scipy's exact test for
    small samples)."""
    import numpy as np
    from scipy.stats import wilcoxon as scipy_wilcoxon

    cases = sorted(set(a) & set(b))
    x, y = np.array([a[c] for c in cases]), np.array([b[c] for c in cases])
    out = {"cases": len(cases), "mean_difference": float(np.mean(x - y)) if cases else None,
           "median_difference": float(np.median(x - y)) if cases else None,
           "statistic": None, "p": None}
    if not cases or np.allclose(x, y):
        out["note"] = "no case differs: the test is undefined"
        return out
    result = scipy_wilcoxon(x, y)
    out.update(statistic=float(result.statistic), p=float(result.pvalue))
    if len(cases) < 6:
        out["note"] = f"{len(cases)} cases: the smallest p a two-sided test can give is {2 / 2**len(cases):.3g}"
    return out


def goals(rows: dict) -> dict:
    """The issue's goal: the paper's ordering, with the margin (tumor Dice, fraction) of each."""
    def dice(table, row):
        return rows[table][row]["tumor_dice_mean"]

    checks = [
        ("MAML >= MS+MA", dice("table1", "MAML"), dice("table1", "MS+MA")),
        ("MS+MA >= MS+Ensemble", dice("table1", "MS+MA"), dice("table1", "MS+Ensemble")),
        ("MAML >= nnU-Net (both phases)", dice("table1", "MAML"), dice("table1", "nnU-Net")),
        ("MAML arterial head >= nnU-Net arterial", dice("table2_arterial", "MAML"),
         dice("table2_arterial", "nnU-Net")),
        ("MAML venous head >= nnU-Net venous", dice("table2_venous", "MAML"),
         dice("table2_venous", "nnU-Net")),
    ]
    # "tied": equal figures (e.g. both 0 after too short a training) show no ordering at all
    return {name: {"holds": a >= b, "tied": a == b, "margin": a - b} for name, a, b in checks}


def format_tables(rows: dict, comparisons: dict) -> str:
    def pct(v):
        return "  n/a" if v is None else f"{100 * v:5.2f}"

    lines = []
    titles = {"table1": "Table 1 (both phases)", "table2_arterial": "Table 2, arterial phase only",
              "table2_venous": "Table 2, venous phase only"}
    for table, title in titles.items():
        lines.append(title)
        lines.append(f"  {'method':<13}{'tumor Dice %':>17}{'ASSD vox':>10}{'ASSD mm':>9}"
                     f"{'liver %':>9}{'sens.':>7}{'FP/case':>8}{'train s':>9}")
        for name, r in rows[table].items():
            sens = "  n/a" if r["lesion_sensitivity"] is None else f"{r['lesion_sensitivity']:5.2f}"
            lines.append(f"  {name:<13}{pct(r['tumor_dice_mean']):>10} ± {pct(r['tumor_dice_sd']):<5}"
                         f"{_num(r['tumor_assd_voxels_mean']):>10}{_num(r['tumor_assd_mm_mean']):>9}"
                         f"{pct(r['liver_dice_mean']):>9}{sens:>7}"
                         f"{_num(r['false_positives_per_case']):>8}{r['train_seconds']:>9.0f}")
    lines.append("Paired Wilcoxon signed-rank, per-case tumor Dice")
    for name, c in comparisons.items():
        p = "n/a" if c["p"] is None else f"{c['p']:.3g}"
        lines.append(f"  {name}: mean difference {_num(c['mean_difference'], 4)}, p {p} ({c['cases']} cases)")
    return "\n".join(lines)


def markdown_tables(rows: dict, comparisons: dict) -> str:
    """Both tables beside the paper's tumor Dice, as the README shows them."""
    def cell(r, key, scale=1.0, digits=2):
        value = r[key]
        return "n/a" if value is None else f"{scale * value:.{digits}f}"

    header = ("| {first} | paper: tumor Dice % | here: tumor Dice % (mean ± sd) | tumor ASSD (voxels / mm) | "
              "liver Dice % | lesion sensitivity | false positives per case | training (s) |\n"
              "|---|---|---|---|---|---|---|---|")
    lines = [header.format(first="Table 1: method (both phases)")]

    def line(label, paper, r):
        return (f"| {label} | {paper} | {cell(r, 'tumor_dice_mean', 100)} ± {cell(r, 'tumor_dice_sd', 100)} | "
                f"{cell(r, 'tumor_assd_voxels_mean')} / {cell(r, 'tumor_assd_mm_mean')} | "
                f"{cell(r, 'liver_dice_mean', 100)} | {cell(r, 'lesion_sensitivity')} | "
                f"{cell(r, 'false_positives_per_case')} | {r['train_seconds']:.0f} |")

    names = {"nnU-Net": "nnU-Net v2, both phases as channels", "MS+Ensemble": "MS+Ensemble",
             "MS+MA": "MS+MA", "MAML": "MAML (fused head)"}
    for row, r in rows["table1"].items():
        lines.append(line(names[row], f"{PAPER['table1'][row]:.2f}", r))
    lines.append(f"| OctopusNet | {PAPER['table1']['OctopusNet']:.2f} | not run | | | | | |")
    lines += ["", header.format(first="Table 2: phase, method")]
    for phase in ("arterial", "venous"):
        for row, r in rows[f"table2_{phase}"].items():
            label = f"{phase}: " + ("nnU-Net v2 on this phase alone" if row == "nnU-Net" else "MAML's own head")
            lines.append(line(label, f"{PAPER['table2'][phase][row]:.2f}", r))
    lines += ["", "| paired Wilcoxon signed-rank, per-case tumor Dice | cases | mean difference | p |",
              "|---|---|---|---|"]
    for name, c in comparisons.items():
        p = "n/a" if c["p"] is None else f"{c['p']:.3g}"
        lines.append(f"| {name} | {c['cases']} | {_num(c['mean_difference'], 4)} | {p} |")
    return "\n".join(lines)


def _repo_relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


def _num(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true",
                        help="install nnunetv2 beside the installed torch and exit")
    parser.add_argument("--quick", action="store_const", const="quick", dest="budget",
                        help="every arm end to end on the quick budget (12 minutes measured on 2 quiet cores)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full",
                        help="full (default), quick, or tiny (the harness's own test)")
    parser.add_argument("--train-cases", type=int, help="training phantoms (overrides the budget's)")
    parser.add_argument("--test-cases", type=int, help="test phantoms (overrides the budget's)")
    parser.add_argument("--epochs", type=int, help="epochs (overrides the budget's)")
    parser.add_argument("--iterations", type=int, help="iterations per epoch (overrides the budget's)")
    parser.add_argument("--train-seed", type=int, help="seed of the first training phantom")
    parser.add_argument("--test-seed", type=int, help="seed of the first test phantom")
    parser.add_argument("--jobs", type=int, default=2, help="arms trained side by side (default 2)")
    parser.add_argument("--work", help="working folder (phantoms, models, logs); default: a "
                        "temporary folder, removed at the end")
    parser.add_argument("--resume", action="store_true",
                        help="continue a stopped run in --work with the same budget: its phantoms, "
                        "nnU-Net's preprocessing and every finished arm are kept, unfinished arms "
                        "start again")
    parser.add_argument("--results", help="results JSON (default benchmarks/results/"
                        "paper_tables_BUDGET.json)")
    parser.set_defaults(budget="full")
    return parser.parse_args(argv)


def make_budget(args) -> Budget:
    budget = BUDGETS[args.budget]
    overrides = {"train_cases": args.train_cases, "test_cases": args.test_cases, "epochs": args.epochs,
                 "iterations_per_epoch": args.iterations, "train_seed": args.train_seed,
                 "test_seed": args.test_seed}
    budget = replace(budget, **{k: v for k, v in overrides.items() if v is not None})
    train = range(budget.train_seed, budget.train_seed + budget.train_cases)
    test = range(budget.test_seed, budget.test_seed + budget.test_cases)
    if set(train) & set(test):
        raise SystemExit(f"training seeds {train.start}..{train.stop - 1} and test seeds "
                         f"{test.start}..{test.stop - 1} overlap: the test phantoms must be unseen")
    if min(budget.train_cases, budget.test_cases, budget.epochs, budget.iterations_per_epoch) < 1:
        raise SystemExit("cases, epochs and iterations must be at least 1")
    return budget


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.setup:
        setup()
        return 0
    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        raise SystemExit("nnunetv2 is not installed: run benchmarks/paper_tables.py --setup "
                         "(or make bench-tables)") from None
    budget = make_budget(args)
    results_path = Path(args.results) if args.results else RESULTS / f"paper_tables_{args.budget}.json"
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    started = time.perf_counter()
    if args.resume and not args.work:
        raise SystemExit("--resume needs --work: the folder of the run to continue")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="paper_tables_"))
    if args.resume:
        check_resumable(work, budget)
    elif args.work and work.exists() and any(work.iterdir()):
        raise SystemExit(f"--work {work} is not empty: give a new or empty folder, or add --resume "
                         "to continue the run in it")
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = run_benchmark(budget, work, args.jobs)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    results.update({
        "command": shlex.join(["python", _repo_relative(sys.argv[0]), *sys.argv[1:]]) if argv is None
        else shlex.join(["python", "benchmarks/paper_tables.py", *argv]),
        "started_utc": started_at, "wall_seconds": round(time.perf_counter() - started, 1),
        "budget_name": args.budget, "jobs": args.jobs, "threads_per_arm": 1,
        "machine": {"cpus": os.cpu_count(), "load_average_1min_at_end": os.getloadavg()[0],
                    "platform": platform.platform()},
        "packages": package_versions(), "revision": git_revision(),
    })
    from maml.io import write_json

    results_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(results, results_path)
    print(results["tables_text"])
    print(f"wrote {results_path}")
    return 0


def budget_record(budget: Budget) -> dict:
    return {**asdict(budget), "features_per_stage": budget.features_per_stage}


def check_resumable(work: Path, budget: Budget) -> None:
    """``--resume`` continues only a run of this very budget: arms trained on another would mix."""
    previous = read_record(work / "budget.json")
    if previous is None:
        raise SystemExit(f"--resume: {work} holds no run of this benchmark (no budget.json); "
                         "leave out --resume to start one there")
    changed = sorted(k for k, v in budget_record(budget).items() if previous.get(k) != v)
    if changed:
        raise SystemExit(f"--resume: the run in {work} has another budget ({', '.join(changed)} "
                         "differ); give the same options as that run, or a new --work folder")


def write_data(work: Path, budget: Budget, arms: dict[str, Arm]) -> dict:
    """The phantoms, the aligned split and nnU-Net's raw data sets, once per working folder."""
    record = read_record(work / DATA_RECORD)
    if record is not None:
        return record
    for folder in ("phantoms_train", "phantoms_test", "train", "test", "nnunet"):
        shutil.rmtree(work / folder, ignore_errors=True)  # what an interrupted run left
    t0 = time.perf_counter()
    train_cases = write_aligned(write_phantoms(work / "phantoms_train", budget.train_cases,
                                               budget.train_seed, budget.size), work / "train")
    test_cases = write_aligned(write_phantoms(work / "phantoms_test", budget.test_cases,
                                              budget.test_seed, budget.size), work / "test")
    for arm in arms.values():
        if arm.kind == "nnunet":
            write_nnunet_raw(work / "train", work / "nnunet" / "raw", arm, train_cases)
    record = {"train": train_cases, "test": test_cases, "seconds": time.perf_counter() - t0}
    write_record(work / DATA_RECORD, record)
    return record


def run_benchmark(budget: Budget, work: Path, jobs: int) -> dict:
    budget_file = work / "budget.json"
    write_record(budget_file, budget_record(budget))
    arms = {name: replace(arm, commands=[]) for name, arm in ARMS.items()}
    data = write_data(work, budget, arms)
    train_cases, test_cases, data_seconds = data["train"], data["test"], data["seconds"]
    config_file = work / "maml_config.json"
    config_file.write_text(maml_config(budget).to_json())
    resumed = [name for name, arm in arms.items() if finished_arm(arm, work)]
    for name in resumed:
        print(f"arm {name}: finished in an earlier run, kept", flush=True)
    nnunet_arms = [a for a in arms.values() if a.kind == "nnunet" and a.name not in resumed]
    tasks = {}
    if nnunet_arms:  # the arms that wait for it
        tasks["nnunet_prepare"] = ((), lambda: nnunet_prepare(work, budget_file, nnunet_arms))
    # MAML's arms train two networks per iteration: the longest first, beside nnU-Net's preparation
    for arm in sorted(arms.values(), key=lambda a: a.kind != "maml"):
        if arm.name in resumed:
            continue
        if arm.kind == "maml":
            tasks[arm.name] = ((), lambda arm=arm: run_maml_arm(arm, work, budget, config_file))
        else:
            tasks[arm.name] = (("nnunet_prepare",),
                               lambda arm=arm: run_nnunet_arm(arm, work, budget_file, test_cases))
    run_tasks(tasks, jobs)

    per_head = {name: head_results(work, arm) for name, arm in arms.items()}
    rows: dict[str, dict] = {}
    for table, row, arm_name, head in ROWS:
        figures = row_figures(per_head[arm_name][head])
        figures.update(arm=arm_name, head=head, train_seconds=round(arms[arm_name].train_seconds, 1))
        rows.setdefault(table, {})[row] = figures
    comparisons = {}
    for name, (arm_a, head_a), (arm_b, head_b) in COMPARISONS:
        a = row_figures(per_head[arm_a][head_a])["tumor_dice_per_case"]
        b = row_figures(per_head[arm_b][head_b])["tumor_dice_per_case"]
        comparisons[name] = wilcoxon(a, b)
    return {
        "benchmark": "MAML paper Tables 1 and 2 on phantoms, against nnU-Net v2 itself",
        "budget": {**asdict(budget), "features_per_stage": budget.features_per_stage,
                   "iterations_total": budget.iterations(), "optimizer": "sgd (nesterov, momentum "
                   "0.99, weight decay 3e-5, poly 0.9), nnU-Net's", "fold": "all (final checkpoint)",
                   "augmentation": "nnU-Net v2's (batchgeneratorsv2) in every arm",
                   "inference": "sliding window, overlap 0.5, Gaussian, no mirroring"},
        "seeds": {"train_phantoms": list(range(budget.train_seed, budget.train_seed + budget.train_cases)),
                  "test_phantoms": list(range(budget.test_seed, budget.test_seed + budget.test_cases)),
                  "training": budget.seed},
        "cases": {"train": train_cases, "test": test_cases},
        "arms_from_earlier_runs": resumed,
        "alignment": "arterial resampled onto the venous grid with the phantom's true transform, "
                     "for every arm",
        "octopusnet": "not run: the engine has no per-phase-encoder, shared-decoder network",
        "paper_tumor_dice_percent": PAPER,
        "tables": rows,
        "wilcoxon_tumor_dice": comparisons,
        "goals": goals(rows),
        "arms": {name: {"kind": arm.kind, "phases": list(arm.phases), "heads": list(arm.heads),
                        "train_seconds": round(arm.train_seconds, 1),
                        "evaluate_seconds": round(arm.evaluate_seconds, 1),
                        "revision": arm.revision,
                        "training_resumed": arm.trained_seconds_before is not None,
                        "commands": [shlex.join(c) for c in arm.commands]}
                 for name, arm in arms.items()},
        "times_seconds": {"phantoms_and_alignment": round(data_seconds, 1),
                          "nnunet_prepare": round((read_record(work / PREPARE_RECORD) or {}).get(
                              "seconds", 0.0), 1)},
        "tables_text": format_tables(rows, comparisons),
        "tables_markdown": markdown_tables(rows, comparisons),
    }


if __name__ == "__main__":
    sys.exit(main())
