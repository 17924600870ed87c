"""maml segment-batch: `maml segment` over many cases, resumable, with a summary table."""

from .segment import add_run_options, options_from

HELP = ("segment every case of an nnU-Net-layout folder (imagesTs/CASE_0000.nii.gz, ...) or a CSV "
        "(case,arterial,venous[,label]); resumes past finished cases; shares cases across torchrun processes")


def configure(parser) -> None:
    parser.add_argument("--input", required=True, help="nnU-Net raw folder or a .csv case list")
    parser.add_argument("--out", required=True, help="output folder: one subfolder per case + summary.csv")
    parser.add_argument("--overwrite", action="store_true", help="redo cases that are already done")
    add_run_options(parser)


def run(args) -> int:
    from ..batch import run_batch
    from ..backends import resolve_engine
    from ..pipeline import resolve_model
    from ..runcontrol import ProgressPrinter, reported_run

    printer = ProgressPrinter(args.json_progress, "segment-batch")
    with reported_run(printer):
        device, backend = resolve_engine(args.device, args.backend)
        model = resolve_model(args.model, device, lazy=backend == "openvino")
        rows = run_batch(args.input, args.out, model, options_from(args), overwrite=args.overwrite,
                         overview=not args.no_overview, progress=printer)
        failed = [r for r in rows if r.get("status") != "ok"]
        printer.finish({"step": "done", "fraction": 1.0, "out": str(args.out),
                        "message": f"{len(rows) - len(failed)} cases segmented, {len(failed)} failed"})
    if not args.json_progress:
        print(f"{len(rows) - len(failed)} cases segmented, {len(failed)} failed; summary in {args.out}/summary.csv")
        for row in failed:
            print(f"  {row['case']}: {row.get('message')}")
    return 1 if failed else 0
