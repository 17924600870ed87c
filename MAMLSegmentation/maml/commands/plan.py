"""``maml plan``: fingerprint a raw data set and plan a configuration with nnU-Net v2's rules."""

from __future__ import annotations

import argparse

HELP = ("fingerprint an nnU-Net v2 raw data set and plan spacing, patch, network and batch size with "
        "nnU-Net v2's rules for a GPU memory budget or the CPU (writes a plans file for maml train "
        "--config)")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="nnU-Net v2 raw data set folder (dataset.json, "
                        "imagesTr, labelsTr); channel names are the phase names")
    parser.add_argument("--out", required=True, help="plans file to write (JSON), e.g. plans.json")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--gpu-memory", type=float, metavar="GB",
                        help="GPU memory to plan for (nnU-Net's 8 GB reference fits a 10 GB card); "
                             "default: 0.8 x the visible CUDA device's memory, else 8")
    budget.add_argument("--cpu", action="store_true",
                        help="plan for training on the CPU: 16 base features (not 32) and a patch of "
                             "at most 2^18 voxels over all phases (32 x 64 x 64 for two), batch 2")
    parser.add_argument("--register", metavar="PRESET",
                        help="register phases that are not on the label map's grid before measuring "
                             "their intensities (as maml train --register: a maml.registration "
                             "preset or 'transforms'); without it such phases keep no intensity "
                             "statistics (the plan itself needs only the label grid)")
    parser.add_argument("--normalization", choices=("ct_dataset", "ct", "mr", "none"),
                        help="normalisation of every phase in the planned configuration; default: "
                             "from the channel names (CT phases: ct_dataset)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..io import write_json
    from ..training.planning import cpu_budget, describe, gpu_budget, plan_dataset

    budget = cpu_budget() if args.cpu else gpu_budget(args.gpu_memory)
    out = Path(args.out)
    if out.is_dir():
        from ..errors import InputError

        raise InputError(f"--out {out} is a folder; give the plans file to write, e.g. {out / 'plans.json'}")
    plans = plan_dataset(args.dataset, budget, register=args.register,
                         normalization=args.normalization, progress=progress_bar(args.quiet))
    write_json(plans, out)
    print(describe(plans))
    print(f"plans written to {out}; train with: maml train --dataset {args.dataset} --config {out} --out RUN")
    return 0


def progress_bar(quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    bar = None

    def progress(case: str, done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="fingerprint", unit="case")
        bar.n = done
        bar.set_postfix_str(case)
        bar.refresh()
        if done == total:
            bar.close()

    return progress
