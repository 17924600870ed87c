"""benchmarks/paper_tables.py end to end on its tiny budget (2 training and 2 test phantoms, 2
iterations per arm), so the harness cannot rot: nnU-Net v2's own planning, training and prediction,
the MAML arms through ``maml train`` / ``maml evaluate``, the tables, the paired tests and the JSON.
The figures of so short a training mean nothing; what is checked is that every arm ran on the same
split and budget and that every figure the README's tables need is there and consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_tables.py"


@pytest.fixture(scope="module")
def tables():
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_test_phantoms_never_share_a_seed_with_training(tables):
    args = tables.parse_args(["--quick", "--train-seed", "10", "--train-cases", "5", "--test-seed", "14"])
    with pytest.raises(SystemExit, match="overlap"):
        tables.make_budget(args)
    budget = tables.make_budget(tables.parse_args(["--quick", "--epochs", "3"]))
    assert budget.epochs == 3 and budget.patch_size == tables.BUDGETS["quick"].patch_size
    assert tables.parse_args([]).budget == "full"
    # the MAML arms' model has the budget's grid, patch and nnU-Net's per-stage widths
    config = tables.maml_config(budget)
    assert config.patch_size == budget.patch_size and config.spacing == budget.spacing
    assert config.network.features_per_stage == budget.features_per_stage


def test_paired_wilcoxon_of_per_case_dice(tables):
    from scipy.stats import wilcoxon

    a = {"c1": 0.8, "c2": 0.6, "c3": 0.7, "c4": 0.9, "c5": 0.5, "c6": 0.75, "extra": 1.0}
    b = {"c1": 0.7, "c2": 0.65, "c3": 0.5, "c4": 0.6, "c5": 0.45, "c6": 0.7}
    result = tables.wilcoxon(a, b)  # paired on the cases both have
    cases = sorted(b)
    assert result["cases"] == 6 and "note" not in result
    assert result["p"] == pytest.approx(wilcoxon([a[c] for c in cases], [b[c] for c in cases]).pvalue)
    assert result["mean_difference"] == pytest.approx(sum(a[c] - b[c] for c in cases) / 6)
    same = tables.wilcoxon({"c1": 0.5, "c2": 0.4}, {"c1": 0.5, "c2": 0.4})
    assert same["p"] is None and "undefined" in same["note"]
    small = tables.wilcoxon({"c1": 0.5, "c2": 0.4}, {"c1": 0.3, "c2": 0.2})
    assert small["p"] == pytest.approx(0.5) and "smallest p" in small["note"]


BENCHMARKS_ONLY = pytest.mark.skipif(
    os.environ.get("MAML_TEST_BENCHMARKS") != "1",
    reason="6 minutes of CPU: `make test-benchmarks` runs it (make test must stay under 15 minutes "
           "on 2 cores)")
TINY = ["--budget", "tiny", "--test-seed", "7000"]


def run_tables(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny budget run once: (working folder, results file, the finished process)."""
    pytest.importorskip("nnunetv2")
    folder = tmp_path_factory.mktemp("tables")
    work, results = folder / "work", folder / "tables.json"
    run = run_tables(*TINY, "--work", str(work), "--results", str(results))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return work, results, run


@pytest.mark.slow
@BENCHMARKS_ONLY
def test_tiny_budget_runs_every_arm_end_to_end(tiny_run):
    work, results, run = tiny_run
    data = json.loads(results.read_text())
    assert "--budget tiny" in data["command"]
    # disjoint seeds; the test phantoms were used for nothing but scoring
    assert data["seeds"]["train_phantoms"] == [1000, 1001] and data["seeds"]["test_phantoms"] == [7000, 7001]
    assert data["cases"]["test"] and not set(data["cases"]["train"]) & set(data["cases"]["test"])
    assert data["packages"]["nnunetv2"] and data["packages"]["torch"]
    arms = data["arms"]
    assert set(arms) == {"nnunet_both", "nnunet_arterial", "nnunet_venous", "ms_ensemble", "ms_ma", "maml"}
    for name, arm in arms.items():
        assert arm["train_seconds"] > 0 and arm["commands"], name
    # one budget for every arm: the same epochs and iterations in nnU-Net's trainer and maml train
    budget = data["budget"]
    assert budget["epochs"] == 1 and budget["iterations_per_epoch"] == 2
    maml_train = next(c for c in arms["maml"]["commands"] if " train " in c)
    assert "--epochs 1 --iterations 2 --batch-size 2 --optimizer sgd" in maml_train
    assert "--joint-weight 0 --lambda-intra 1" in next(c for c in arms["ms_ensemble"]["commands"] if " train " in c)
    assert "--lambda-intra 0" in next(c for c in arms["ms_ma"]["commands"] if " train " in c)
    assert "--heads ensemble" in arms["ms_ensemble"]["commands"][-1]
    assert any("nnunet_budget_driver.py train" in c for c in arms["nnunet_both"]["commands"])
    plans = json.loads(next((work / "nnunet" / "preprocessed").glob("Dataset951_*/nnUNetBudgetPlans.json"))
                       .read_text())["configurations"]["3d_fullres"]
    config = json.loads((work / "maml_config.json").read_text())
    assert plans["patch_size"] == config["patch_size"] == budget["patch_size"]
    assert plans["spacing"] == config["spacing"] == budget["spacing"]
    assert plans["architecture"]["arch_kwargs"]["features_per_stage"] == budget["features_per_stage"]
    assert plans["architecture"]["arch_kwargs"]["strides"] == config["network"]["strides"]
    checkpoint = work / "nnunet" / "results" / "Dataset952_MAMLTables_arterial" / \
        "nnUNetTrainerBudget__nnUNetBudgetPlans__3d_fullres" / "fold_all" / "checkpoint_final.pth"
    assert checkpoint.is_file()
    # every row of both tables, with per-case Dice for the paired tests
    tables = data["tables"]
    assert list(tables["table1"]) == ["nnU-Net", "MS+Ensemble", "MS+MA", "MAML"]
    for table in ("table2_arterial", "table2_venous"):
        assert list(tables[table]) == ["nnU-Net", "MAML"]
    for rows in tables.values():
        for name, row in rows.items():
            per_case = row["tumor_dice_per_case"]
            assert sorted(per_case) == sorted(data["cases"]["test"]), name
            assert 0 <= row["tumor_dice_mean"] <= 1 and 0 <= row["liver_dice_mean"] <= 1
            assert row["tumor_dice_mean"] == pytest.approx(sum(per_case.values()) / len(per_case))
            assert row["false_positives_per_case"] is not None
    wilcoxon = data["wilcoxon_tumor_dice"]["table1: MAML vs nnU-Net (both phases)"]
    assert wilcoxon["cases"] == 2
    assert wilcoxon["p"] is None or 0 < wilcoxon["p"] <= 1
    assert set(data["goals"]) >= {"MAML >= MS+MA", "MAML >= nnU-Net (both phases)"}
    assert all({"holds", "tied", "margin"} <= set(g) for g in data["goals"].values())
    assert "Table 1" in run.stdout and "Wilcoxon" in run.stdout
    assert "| MAML (fused head) | 81.25 |" in data["tables_markdown"]


@pytest.mark.slow
@BENCHMARKS_ONLY
def test_resume_keeps_finished_arms_and_continues_unfinished_ones(tiny_run, tmp_path):
    work, results, _ = tiny_run
    first = json.loads(results.read_text())
    # a folder with a run in it is refused without --resume, and --resume with another budget
    refused = run_tables(*TINY, "--work", str(work), "--results", str(tmp_path / "no.json"))
    assert refused.returncode != 0 and "--resume" in refused.stderr and "Traceback" not in refused.stderr
    other = run_tables(*TINY, "--epochs", "2", "--work", str(work), "--resume",
                       "--results", str(tmp_path / "no.json"))
    assert other.returncode != 0 and "epochs" in other.stderr and "Traceback" not in other.stderr
    assert not (tmp_path / "no.json").exists()
    # ms_ma and nnunet_venous stopped before their evaluation: only they run again, their training
    # continued from the checkpoint each kept (here with no epoch left), scoring the same weights
    (work / "ms_ma" / "arm.json").unlink()
    (work / "nnunet_venous" / "arm.json").unlink()
    resumed = tmp_path / "resumed.json"
    run = run_tables(*TINY, "--work", str(work), "--resume", "--results", str(resumed))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(resumed.read_text())
    assert sorted(data["arms_from_earlier_runs"]) == sorted(set(first["arms"]) - {"ms_ma", "nnunet_venous"})
    assert "ms_ma done" in run.stdout and "nnunet_venous done" in run.stdout
    assert "maml done" not in run.stdout and "nnunet_both done" not in run.stdout
    assert data["arms"]["maml"] == first["arms"]["maml"]  # its commands and times, as recorded
    assert data["cases"] == first["cases"]
    # scored from the kept evaluations
    assert data["tables"]["table2_arterial"] == first["tables"]["table2_arterial"]
    assert data["tables"]["table2_venous"]["MAML"] == first["tables"]["table2_venous"]["MAML"]
    assert data["arms"]["ms_ma"]["training_resumed"] and not data["arms"]["maml"]["training_resumed"]
    assert "--resume" in data["arms"]["ms_ma"]["commands"][0]
    nnunet_training = [c for c in data["arms"]["nnunet_venous"]["commands"] if " train " in c]
    assert len(nnunet_training) == 1 and nnunet_training[0].endswith(" continue")
    assert data["tables"]["table2_venous"]["nnU-Net"] | {"train_seconds": 0} == \
        first["tables"]["table2_venous"]["nnU-Net"] | {"train_seconds": 0}
    assert data["tables"]["table1"]["MS+MA"] | {"train_seconds": 0} == \
        first["tables"]["table1"]["MS+MA"] | {"train_seconds": 0}
