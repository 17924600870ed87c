"""maml import-nnunet: a trained nnU-Net v2 model folder -> a one-phase MAML checkpoint."""

HELP = ("import a trained nnU-Net v2 model folder (TRAINER__PLANS__3d_fullres) as a one-phase MAML "
        "model; its folds are averaged at inference as nnU-Net does")


def configure(parser):
    parser.add_argument("--model-folder", required=True,
                        help="the folder nnU-Net wrote for one configuration: "
                             "RESULTS/DatasetXXX_Name/TRAINER__PLANS__3d_fullres")
    parser.add_argument("--phase", required=True,
                        help="the contrast phase the model segments (e.g. venous for a "
                             "portal-venous liver model such as LiTS or MSD Task03)")
    parser.add_argument("--folds", nargs="+", metavar="FOLD",
                        help="folds to keep, e.g. 0 1 2 3 4 or all (default: every fold_* with the "
                             "checkpoint)")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth",
                        help="checkpoint file in each fold folder (default checkpoint_final.pth)")
    parser.add_argument("--label-map", nargs="+", metavar="NAME=VALUE",
                        help="which of the model's label values are liver and tumor, e.g. liver=1 "
                             "tumor=2 (default: from the label names in dataset.json)")
    parser.add_argument("--data-kind", default="unknown",
                        choices=["clinical", "research", "synthetic", "unknown"],
                        help="what the model was trained on, as you know it (recorded in the "
                             "checkpoint; default unknown)")
    parser.add_argument("--name", help="model name (default DATASET-CONFIGURATION-PHASE)")
    parser.add_argument("--out", required=True, help="MAML checkpoint to write (.pt)")


def run(args) -> int:
    from ..model import load_model
    from ..nnunet_import import import_nnunet, parse_label_map

    path = import_nnunet(args.model_folder, args.phase, args.out, folds=args.folds,
                         checkpoint=args.checkpoint, label_map=parse_label_map(args.label_map),
                         data_kind=args.data_kind, name=args.name)
    model = load_model(path)
    meta = model.metadata
    labels = ", ".join(f"{l.value}={l.name}" for l in model.config.labels)
    print(f"imported {meta['nnunet_dataset']} {meta['nnunet_configuration']} "
          f"(folds {', '.join(meta['nnunet_folds'])}) as phase {args.phase!r}: {path}")
    print(f"labels {labels}; spacing {model.config.spacing} mm; patch {model.config.patch_size}")
    return 0
