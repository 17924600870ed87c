"""maml train: train MAML on an nnU-Net v2 raw data set (single process or under torchrun)."""

from ..config import NORMALIZATION_SCHEMES

HELP = "train a MAML model on an nnU-Net v2 raw data set (resumable; torchrun for several GPUs)"

# Options whose argparse default is None: only values the user typed override the preset (and,
# on --resume, the saved run).
_OPTION_ARGS = {
    "epochs": "epochs", "iterations": "iterations_per_epoch", "batch_size": "batch_size",
    "optimizer": "optimizer", "lr": "learning_rate", "weight_decay": "weight_decay",
    "loss": "loss_variant", "lambda_intra": "lambda_intra", "joint_weight": "joint_weight",
    "modality_dropout": "modality_dropout",
    "oversample": "oversample_foreground", "augmentation": "augmentation", "fold": "fold",
    "val_cases": "val_cases", "val_every": "val_every", "val_patches": "val_patches", "seed": "seed", "device": "device",
    "workers": "num_workers", "threads": "threads", "register": "register",
    "normalization": "normalization", "grad_clip": "grad_clip", "data_kind": "data_kind",
}


def configure(parser):
    parser.add_argument("--dataset", required=True, help="nnU-Net v2 raw data set folder (dataset.json, "
                        "imagesTr, labelsTr); channel names are the phase names")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, logs, preprocessed cache)")
    parser.add_argument("--config", default=None,
                        help="model configuration: auto (the default: plan spacing, patch, network "
                             "and batch size from the data set as maml plan does, for the GPU's "
                             "memory or the CPU rule, and keep the plans in OUT/plans.json), a "
                             "preset (paper, code, demo), a plans file from maml plan, a "
                             "configuration JSON file, or init (network, spacing and patch size of "
                             "the first --init-from model; the default when --init-from is given)")
    parser.add_argument("--init-from", nargs="+", metavar="PHASE=PATH",
                        help="start these phases' backbones from trained one-phase models: MAML "
                             "checkpoints from maml import-nnunet or nnU-Net v2 model folders "
                             "(e.g. arterial=a.pt venous=v.pt; one model may serve both phases); "
                             "the MA module and fused head start fresh")
    parser.add_argument("--fold", help="validation fold 0-4 of the sorted case ids, or 'all' (no "
                        "validation); default 0")
    parser.add_argument("--val-cases", type=int, help="validate on the last N sorted cases instead of a fold")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    parser.add_argument("--epochs", type=int, help="number of epochs (preset: paper 600, demo 120)")
    parser.add_argument("--iterations", type=int, help="iterations per epoch (paper 250)")
    parser.add_argument("--batch-size", type=int, help="patches per iteration and process (default 2)")
    parser.add_argument("--optimizer", choices=["adam", "sgd"],
                        help="adam: the paper (lr 3e-4); sgd: the published code (lr 0.01, momentum "
                             "0.99, Nesterov); both with polynomial decay (exponent 0.9)")
    parser.add_argument("--lr", type=float, help="initial learning rate")
    parser.add_argument("--weight-decay", type=float, help="weight decay (default 3e-5)")
    parser.add_argument("--grad-clip", type=float, help="gradient norm clipping (default 12)")
    parser.add_argument("--loss", choices=["paper", "code"],
                        help="mutual-learning weighting: paper (lambda 0.5) or the published code's")
    parser.add_argument("--lambda-intra", type=float,
                        help="weight of the per-phase loss terms (paper 0.5); 0: the fusion learns "
                             "from the joint loss alone, no mutual learning (the paper's MS+MA)")
    parser.add_argument("--joint-weight", type=float,
                        help="weight of the fused head's loss term (paper 1); 0: the per-phase "
                             "U-Nets train independently (the paper's MS+Ensemble; evaluate it "
                             "with maml evaluate --heads ensemble)")
    parser.add_argument("--modality-dropout", type=float,
                        help="probability that an iteration trains one random phase alone (helps "
                             "the missing-phase heads); default 0")
    parser.add_argument("--oversample", type=float, help="fraction of foreground-centred patches (1/3)")
    parser.add_argument("--augmentation", choices=["default", "light", "none"],
                        help="default: nnU-Net v2's pipeline (rotation, scaling, noise, blur, brightness, "
                             "contrast, low resolution, gamma, mirroring); light: no rotation or "
                             "scaling; none")
    parser.add_argument("--val-every", type=int,
                        help="full-volume validation every N epochs (default 0: only at the end, "
                             "with the final checkpoint); every epoch validates on fixed patches")
    parser.add_argument("--val-patches", type=int,
                        help="fixed validation patches for the per-epoch pseudo-Dice (100)")
    parser.add_argument("--device", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--seed", type=int, help="random seed (default 12345)")
    parser.add_argument("--workers", type=int, help="data loader worker processes (default 0)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--register", metavar="PRESET",
                        help="register phases that are not on the label map's grid: a "
                             "maml.registration preset (e.g. deformable), or 'transforms' to apply "
                             "DATASET/transforms/CASE_<phase>_to_<reference phase>.tfm (written by "
                             "maml phantom); without it such cases are rejected")
    parser.add_argument("--normalization", choices=list(NORMALIZATION_SCHEMES),
                        help="normalisation of every phase: ct_dataset (nnU-Net: the training "
                             "set's foreground CT statistics), ct (each image's own percentiles), "
                             "mr (z-score of non-zero voxels), none; default: from the "
                             "configuration or the channel names")
    parser.add_argument("--data-kind", choices=["synthetic", "clinical"],
                        help="what the training images are (recorded in the model and shown to "
                             "users); default: the data set's dataset.json says, else clinical")
    parser.add_argument("--final-upsampling", choices=("transpose", "trilinear"),
                        help="the decoder's last up-sampling: transpose (nnU-Net's transposed "
                             "convolution, the presets' default) or trilinear (trilinear + a "
                             "convolution: attention maps without its period-2 pattern)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    import shlex
    import sys
    from pathlib import Path

    from ..config import PRESETS
    from ..errors import MAMLError
    from ..training.options import default_options
    from ..training.trainer import train

    from ..nnunet_import import config_from_init, parse_init_sources

    init_from = parse_init_sources(args.init_from)
    if args.config is None:
        args.config = "init" if init_from else "auto"
    planned: dict = {}  # training options a plan chose (the batch size)
    created = not Path(args.out).exists()
    if args.config == "auto":
        config, planned, preset = *_auto_config(args), None
    elif args.config == "init":
        if not init_from:
            from ..errors import InputError

            raise InputError("--config init takes the network from --init-from; give --init-from "
                             "PHASE=PATH or another --config")
        config, preset = config_from_init(init_from), None
    elif args.config in PRESETS:
        config, preset = PRESETS[args.config](), args.config
    elif Path(args.config).is_file():
        from ..training.planning import read_configuration_file

        (config, planned), preset = read_configuration_file(args.config), None
    else:
        from ..errors import InputError

        raise InputError(f"--config {args.config!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    if args.final_upsampling:
        config.network.final_upsampling = args.final_upsampling
    given = {field: getattr(args, arg) for arg, field in _OPTION_ARGS.items()
             if getattr(args, arg) is not None}
    if "fold" in given:
        given["fold"] = str(given["fold"])
    options = default_options(preset, **{**planned, **given})
    try:
        result = train(args.dataset, args.out, config, options, resume=args.resume,
                       overrides=list(given), progress=not args.no_progress,
                       command="maml train " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["train"] else []),
                       init_from=init_from)
    except MAMLError:
        if created:
            _remove_lone_plans(Path(args.out))
        raise
    if result.best_epoch is not None:
        best = "" if result.best_metric is None else f" (validation mean Dice {result.best_metric:.4f})"
        print(f"done: {result.epochs_done} epochs; best epoch {result.best_epoch}{best}; "
              f"{Path(args.out) / 'checkpoint_best.pt'}")
    return 0


def _auto_config(args):
    """--config auto: plans for the device training will use and keeps them in OUT/plans.json.

    Phases are not registered for planning: the plan needs the label grid only (their intensity
    statistics, which registration would complete, are for reading; training measures its own).
    """
    import os
    import sys
    from pathlib import Path

    from ..config import ModelConfig, paper_config
    from ..errors import InputError
    from ..inference import resolve_device
    from ..io import write_json
    from ..training.planning import (PLANS_FILE, cpu_budget, describe, gpu_budget, plan_dataset,
                                     read_configuration_file)
    from ..training.state import STATE_FILE

    out = Path(args.out)
    if (out / STATE_FILE).is_file():
        if not args.resume:
            raise InputError(f"{out} already holds a training run ({STATE_FILE}); pass --resume "
                             "to continue it or choose another --out")
        if (out / PLANS_FILE).is_file():
            return read_configuration_file(out / PLANS_FILE)
        return paper_config(), {}  # not used: a resumed run keeps its saved configuration
    device = resolve_device(args.device or "auto")
    budget = gpu_budget() if device.type == "cuda" else cpu_budget()
    from .plan import progress_bar

    plans = plan_dataset(args.dataset, budget, normalization=args.normalization,
                         progress=progress_bar(args.no_progress))
    if int(os.environ.get("RANK", "0")) == 0:
        print(describe(plans), file=sys.stderr)
        write_json(plans, out / PLANS_FILE)
    return ModelConfig.from_dict(plans["model_config"]), dict(plans["training_options"])


def _remove_lone_plans(out) -> None:
    """A refused run leaves nothing behind: the folder this command made for the plans alone."""
    from ..training.planning import PLANS_FILE

    if out.is_dir() and [p.name for p in out.iterdir()] == [PLANS_FILE]:
        (out / PLANS_FILE).unlink()
        out.rmdir()
