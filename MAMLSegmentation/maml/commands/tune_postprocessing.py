"""maml tune-postprocessing: choose a model's post-processing on validation predictions."""

HELP = ("choose a model's post-processing (largest component, minimum lesion volume) on raw "
        "validation predictions and write it into a copy of the model")


def configure(parser) -> None:
    parser.add_argument("--model", required=True, help="the checkpoint the predictions came from")
    parser.add_argument("--pred", required=True,
                        help="folder of raw predicted label maps of validation cases (maml evaluate "
                             "--no-postprocessing --save-predictions DIR writes DIR/fused)")
    parser.add_argument("--gt", required=True, help="folder of their ground-truth label maps")
    parser.add_argument("--write", metavar="MODEL_OUT",
                        help="write a copy of the model that carries the chosen post-processing")
    parser.add_argument("--report", metavar="FILE", help="every candidate tried, as JSON")


def run(args) -> int:
    import SimpleITK as sitk

    from ..errors import InputError
    from ..evaluation.folders import label_files, read_label_image
    from ..evaluation.tuning import ValidationCase, tune
    from ..io import write_json
    from ..model import load_model, save_checkpoint

    model = load_model(args.model)
    predictions, truths = label_files(args.pred), label_files(args.gt)
    missing = sorted(set(predictions) - set(truths))
    if missing:
        raise InputError(f"{args.gt} has no ground truth for prediction(s) {missing[:5]}")
    if not predictions:
        raise InputError(f"{args.pred} holds no label maps")
    cases = []
    for case, path in predictions.items():
        prediction = read_label_image(path, "prediction")
        truth = read_label_image(truths[case], "ground truth")
        if prediction.GetSize() != truth.GetSize():
            raise InputError(f"case {case!r}: prediction {path} and ground truth {truths[case]} "
                             "are on different grids")
        cases.append(ValidationCase(case, sitk.GetArrayFromImage(prediction),
                                    sitk.GetArrayFromImage(truth),
                                    tuple(reversed(prediction.GetSpacing()))))
    result = tune(cases, model.config)
    for step in result.steps:
        per_label = ", ".join(f"{name} {value:.4f}" for name, value in step["dice"].items())
        print(f"{step['step']:<28} mean Dice {step['mean_dice']:.4f} ({per_label})")
    chosen = result.settings
    print(f"chosen on {len(cases)} cases: largest component {'on' if chosen.largest_component else 'off'}, "
          f"minimum volumes {chosen.min_volume_ml or 'none'}; mean Dice {result.baseline_dice:.4f} -> "
          f"{result.mean_dice:.4f}")
    if args.report:
        payload = {"model": str(args.model), "predictions": str(args.pred), "cases": len(cases),
                   "chosen": {"largest_component": chosen.largest_component,
                              "min_volume_ml": chosen.min_volume_ml},
                   "baseline_mean_dice": result.baseline_dice, "mean_dice": result.mean_dice,
                   "steps": result.steps}
        write_json(payload, args.report)
    if args.write:
        config = model.config
        config.postprocessing = chosen
        config.validate()
        metadata = dict(model.metadata)
        metadata["postprocessing_chosen_on"] = {"predictions": str(args.pred), "cases": len(cases),
                                                "mean_dice_before": result.baseline_dice,
                                                "mean_dice_after": result.mean_dice}
        save_checkpoint(args.write, model.network, config, metadata)
        print(f"wrote {args.write}")
    return 0
