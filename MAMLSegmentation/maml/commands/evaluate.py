"""maml evaluate: Dice, ASSD and HD95 of predicted label maps against the ground truth, and lesion
detection of the tumor label, or the same for a model's heads on an nnU-Net raw data set."""

HELP = ("score predicted label maps against ground truth (Dice, ASSD in mm and voxels, HD95; tumor "
        "lesions found, missed and false, lesion-wise Dice, Dice per lesion size), or a model's fused "
        "and per-phase heads on a data set (--model, --dataset)")


def configure(parser):
    from .segment import add_backend_option, add_overlap_option

    parser.add_argument("--pred", help="folder of predicted label maps")
    parser.add_argument("--gt", help="folder of ground-truth label maps (matched by file name)")
    parser.add_argument("--model", help="instead of --pred/--gt: a checkpoint to run on --dataset")
    parser.add_argument("--dataset", help="nnU-Net v2 raw data set (with --model): every case is "
                        "segmented with the fused head and with each phase's own head")
    parser.add_argument("--register", default="deformable",
                        help="with --model: align phases that are not on the label grid: none, rigid, "
                             "affine, deformable (default; SimpleITK, as maml segment) or transforms "
                             "(the data set's transform files, e.g. a phantom's true motion)")
    parser.add_argument("--heads", nargs="+", help="with --model: heads to score: fused, a phase's "
                        "name (its own head), or ensemble (the mean of the phase heads' probabilities, "
                        "for a model trained with --joint-weight 0); default: fused and every phase")
    parser.add_argument("--save-predictions", metavar="DIR", help="with --model: write HEAD/CASE label maps")
    parser.add_argument("--device", default="auto", help="with --model: auto, cpu or cuda")
    add_backend_option(parser)
    add_overlap_option(parser)
    parser.add_argument("--no-postprocessing", action="store_true",
                        help="with --model: score the raw labels (skip the model's post-processing)")
    parser.add_argument("--out", help="result file: writes OUT.json and OUT.csv (per case and label, "
                        "then mean and std) and OUT_lesions.csv (one row per lesion)")
    parser.add_argument("--labels", nargs="+", metavar="[NAME=]VALUE",
                        help="labels to score (default: dataset.json beside the ground truth, else "
                             "every non-zero value)")
    parser.add_argument("--lesion-label", metavar="NAME",
                        help="label whose 26-connected components are scored as lesions (default: the "
                             "label named tumor; without such a label, no lesion figures)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..errors import InputError
    from ..evaluation import evaluate_folders, evaluate_model, write_model_results, write_results

    if args.model or args.dataset:
        if not (args.model and args.dataset) or args.pred or args.gt:
            raise InputError("give --model and --dataset together (or --pred and --gt)")
        register = None if args.register == "none" else args.register
        results = evaluate_model(args.model, args.dataset, register, args.heads, args.save_predictions,
                                 args.device, progress=not args.no_progress,
                                 postprocess=not args.no_postprocessing, backend=args.backend,
                                 lesion_label=args.lesion_label, overlap=args.overlap)
        for head, result in results.items():
            print(f"head: {head}")
            print(result.table())
        if args.out:
            info = {"model": str(args.model), "dataset": str(args.dataset), "register": args.register,
                    "postprocessing": not args.no_postprocessing}
            print("wrote " + ", ".join(map(str, write_model_results(results, args.out, info))))
        return 0
    if not (args.pred and args.gt):
        raise InputError("give --pred and --gt (or --model and --dataset)")
    result = evaluate_folders(args.pred, args.gt, args.labels, progress=not args.no_progress,
                              lesion_label=args.lesion_label)
    print(result.table())
    if args.out:
        print("wrote " + ", ".join(map(str, write_results(result, args.out))))
    return 0
