"""maml fingerprint: add the training fingerprint (for the out-of-distribution check) to a model."""

HELP = ("add a training fingerprint to a model from its training data, so that maml segment can tell "
        "when an image is unlike anything the model was trained on")


def configure(parser) -> None:
    from .segment import overlap_argument

    parser.add_argument("--model", required=True, help="checkpoint file")
    parser.add_argument("--dataset", required=True,
                        help="the model's training data (nnU-Net v2 raw data set)")
    parser.add_argument("--write", required=True, metavar="NEW_MODEL",
                        help="where to write the model with its fingerprint (may be --model itself)")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--val-cases", type=int,
                       help="the last N sorted cases were held out in training: they set the "
                            "distance thresholds (default: the split recorded in the model)")
    split.add_argument("--fold", help="the validation fold (0-4) used in training")
    parser.add_argument("--register", metavar="PRESET",
                        help="as for maml train: how phases off the label grid are aligned "
                             "(a registration preset or 'transforms')")
    parser.add_argument("--calibration-dataset", metavar="DATASET",
                        help="more held-out cases (never used in training) for the thresholds")
    parser.add_argument("--calibration-register", metavar="PRESET", default="deformable",
                        help="registration of the calibration cases (default: deformable, as "
                             "maml segment does)")
    parser.add_argument("--data-kind", choices=["synthetic", "clinical"],
                        help="what the model was trained on (default: the data set's dataset.json "
                             "says, else clinical)")
    parser.add_argument("--overlap", type=overlap_argument, metavar="FRACTION",
                        help="the written model's sliding-window overlap, a fraction of a patch "
                             "(default: the model's own; 0.25 segments in about half the time of "
                             "0.5); the fingerprint is measured with windows overlapping by at "
                             "least half a patch either way")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json-progress", action="store_true", help="progress as JSON lines on stdout")


def split_for(model, dataset, args) -> tuple[list[str], list[str]]:
    """The model's own training split: the case ids it recorded, else the options, else the number
    of validation cases it recorded (the last N sorted ids)."""
    from ..training.dataset import split_cases
    from ..errors import InputError

    recorded = model.metadata.get("validation_case_ids")
    if recorded is not None and args.val_cases is None and args.fold is None:
        unknown = sorted(set(recorded) - set(dataset.cases))
        if unknown:
            raise InputError(f"--dataset {dataset.root}: the model was validated on cases {unknown[:3]} "
                             "that this data set does not have; is it the model's training data?")
        return [c for c in dataset.cases if c not in recorded], list(recorded)
    if args.fold is not None:
        return split_cases(dataset.cases, args.fold)
    count = args.val_cases if args.val_cases is not None else model.metadata.get("validation_cases")
    return split_cases(dataset.cases, val_cases=int(count) if count is not None else None)


def run(args) -> int:
    from ..training.dataset import read_dataset
    from ..domain import fingerprint_summary
    from ..training.fingerprint import compute_fingerprint
    from ..inference import resolve_device
    from ..model import load_model, save_checkpoint
    from ..runcontrol import ProgressPrinter, reported_run

    printer = ProgressPrinter(args.json_progress, "fingerprint")
    with reported_run(printer):
        device = resolve_device(args.device)
        model = load_model(args.model, device)
        if args.overlap is not None:
            model.config.inference.overlap = args.overlap
        dataset = read_dataset(args.dataset)
        train_cases, val_cases = split_for(model, dataset, args)

        def progress(case: str, done: int, total: int) -> None:
            printer("fingerprint", done / max(total, 1), f"case {case}" if case else "done")

        fingerprint = compute_fingerprint(
            model, args.dataset, train_cases, val_cases, register=args.register,
            calibration_dataset_dir=args.calibration_dataset,
            calibration_register=args.calibration_register, data_kind=args.data_kind,
            device=str(device), progress=progress)
        metadata = dict(model.metadata, fingerprint=fingerprint, data_kind=fingerprint["data_kind"])
        save_checkpoint(args.write, model.network, model.config, metadata)
        printer.finish({"step": "done", "fraction": 1.0, "message": f"wrote {args.write}"})
    if not args.json_progress:
        import json

        print(json.dumps(fingerprint_summary(fingerprint), indent=1))
        print(f"wrote {args.write}")
    return 0
