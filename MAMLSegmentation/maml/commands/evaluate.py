"""maml evaluate: Dice, ASSD and HD95 of predicted label maps against the ground truth."""

HELP = "score predicted label maps against ground truth (Dice, ASSD in mm and voxels, HD95)"


def configure(parser):
    parser.add_argument("--pred", required=True, help="folder of predicted label maps")
    parser.add_argument("--gt", required=True, help="folder of ground-truth label maps (matched by file name)")
    parser.add_argument("--out", help="result file: writes OUT.json and OUT.csv (per case and label, "
                        "then mean and std)")
    parser.add_argument("--labels", nargs="+", metavar="[NAME=]VALUE",
                        help="labels to score (default: dataset.json beside the ground truth, else "
                             "every non-zero value)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..evaluation import evaluate_folders, write_results

    result = evaluate_folders(args.pred, args.gt, args.labels, progress=not args.no_progress)
    print(result.table())
    if args.out:
        json_path, csv_path = write_results(result, args.out)
        print(f"wrote {json_path} and {csv_path}")
    return 0
