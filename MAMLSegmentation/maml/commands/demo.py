"""maml demo: segment the bundled sample case and compare with its ground truth."""

HELP = "segment the bundled two-phase phantom case with the bundled demo model and score it"


def configure(parser) -> None:
    from ..config import DEFAULT_REGISTRATION, REGISTRATION_PRESETS

    parser.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    parser.add_argument("--model", help="checkpoint file (default: the bundled demo model)")
    parser.add_argument("--register", default=DEFAULT_REGISTRATION, choices=REGISTRATION_PRESETS)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def sample_files() -> dict:
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "Resources" / "SampleData"
    return {"arterial": folder / "phantom_arterial.nrrd", "venous": folder / "phantom_venous.nrrd",
            "truth": folder / "phantom_truth.nrrd"}


def run(args) -> int:
    import SimpleITK as sitk

    from ..errors import InputError
    from ..evaluation import evaluate_images
    from ..io import read_image
    from ..pipeline import SegmentOptions, segment, write_result
    from ..runcontrol import ProgressPrinter, reported_run
    from .segment import summary_lines

    files = sample_files()
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise InputError(f"the bundled sample case is missing: {', '.join(missing)}")
    printer = ProgressPrinter(False, "demo")
    with reported_run(printer):
        result = segment({"arterial": files["arterial"], "venous": files["venous"]}, args.model,
                         SegmentOptions(registration=args.register, device=args.device), progress=printer)
        truth = sitk.Cast(read_image(files["truth"], "ground truth"), sitk.sitkUInt8)
        names = {name: value for value, name in result.label_names.items() if value}
        scores = evaluate_images(result.labels, truth, names, "sample")
        result.stats["dice_against_truth"] = {name: round(m["dice"], 4) for name, m in scores.items()}
        write_result(result, args.out, progress=printer)
        printer.close()
    print(f"sample case: synthetic two-phase phantom ({files['venous'].parent})")
    print(f"model: {result.stats['model']['name']} ({result.stats['model']['path']})")
    print("\n".join(summary_lines(result.stats)))
    dice = ", ".join(f"{name} {value:.3f}" for name, value in result.stats["dice_against_truth"].items())
    print(f"Dice against the ground truth: {dice}")
    print(f"outputs: {args.out}/ (segmentation.nii.gz, attention_*.nii.gz, stats.json)")
    print(f"overview picture: {args.out}/overview.png")
    return 0
