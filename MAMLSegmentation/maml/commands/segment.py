"""maml segment: register the phases, run MAML, write labels, attention maps, statistics, overview."""

HELP = ("segment liver and liver tumors from arterial/venous CT phases (any phase may be missing); "
        "research use only, not for clinical use")


def phase_argument(text: str) -> tuple[str, str]:
    import argparse

    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (e.g. venous=venous.nii.gz), got {text!r}")
    return name.strip(), path


def add_backend_option(parser) -> None:
    from ..config import BACKENDS

    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="what runs the network: auto (default: torch on a GPU, OpenVINO on the "
                             "CPU when installed, else torch), torch, or openvino (CPU; about twice "
                             "as fast; installed by the [cpu-fast] extra)")


def add_overlap_option(parser) -> None:
    parser.add_argument("--overlap", type=overlap_argument, metavar="FRACTION",
                        help="how far sliding windows overlap, a fraction of a patch (default: the "
                             "model's own, see maml info; smaller is faster: 0.25 needs about half "
                             "the windows of 0.5)")


def overlap_argument(text: str) -> float:
    import argparse

    from ..config import check_overlap

    try:
        return check_overlap(float(text), "value", argparse.ArgumentTypeError)
    except ValueError:
        raise argparse.ArgumentTypeError(f"value {text!r} is not a number (0.5: half a patch)")


def add_run_options(parser) -> None:
    """Options shared by segment and segment-batch."""
    from ..config import DEFAULT_REGISTRATION, DEFAULT_REGISTRATION_ENGINE, REGISTRATION_ENGINES, REGISTRATION_PRESETS

    parser.add_argument("--model", help="checkpoint file (default: the bundled demo model)")
    parser.add_argument("--register", default=DEFAULT_REGISTRATION, choices=REGISTRATION_PRESETS,
                        help="how to align the phases onto the reference phase (default: deformable)")
    parser.add_argument("--registration-engine", default=DEFAULT_REGISTRATION_ENGINE, choices=REGISTRATION_ENGINES,
                        help="what registers the phases: SimpleITK (default) or itk-elastix (the same "
                             "stages; its first use in a process loads for 8-23 s)")
    parser.add_argument("--reference", help="phase whose geometry the results take (default: venous)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add_backend_option(parser)
    parser.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (8x slower)")
    add_overlap_option(parser)
    parser.add_argument("--allow-poor-registration", action="store_true",
                        help="segment even when the phases stay dissimilar after registration")
    parser.add_argument("--no-postprocessing", action="store_true",
                        help="keep the raw labels (skip the model's post-processing, e.g. its "
                             "minimum tumor size)")
    parser.add_argument("--accept-out-of-distribution", action="store_true",
                        help="write results even when the image lies outside the model's training "
                             "data (the check then warns instead of refusing with exit code 3)")
    parser.add_argument("--no-overview", action="store_true", help="skip overview.png")
    parser.add_argument("--dicom-seg", action="store_true",
                        help="also write segmentation.dcm, a DICOM Segmentation referencing the "
                             "reference phase's DICOM series (that phase must be a DICOM folder)")
    parser.add_argument("--json-progress", action="store_true",
                        help="print progress as JSON lines on stdout (for other programs)")


def configure(parser) -> None:
    parser.add_argument("--phase", action="append", type=phase_argument, default=[], metavar="NAME=PATH",
                        help="a phase image: NIfTI, NRRD or MHA file, or a DICOM series folder; repeat per phase")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dicom-source", metavar="FOLDER",
                        help="with --dicom-seg: the DICOM series folder the reference phase's file "
                             "was exported from (same geometry)")
    add_run_options(parser)


def options_from(args):
    from ..pipeline import SegmentOptions

    return SegmentOptions(registration=args.register, registration_engine=args.registration_engine,
                          reference=args.reference, device=args.device,
                          backend=args.backend, tta=args.tta, overlap=args.overlap,
                          allow_poor_registration=args.allow_poor_registration,
                          postprocess=not args.no_postprocessing,
                          accept_out_of_distribution=args.accept_out_of_distribution,
                          dicom_seg=args.dicom_seg, dicom_source=getattr(args, "dicom_source", None))


def summary_lines(stats: dict) -> list[str]:
    lines = []
    domain = stats.get("domain_check") or {}
    if domain.get("status") not in (None, "ok"):
        lines.append(f"WARNING: {domain.get('sentence', '')}")
    lines.append(f"tumors found: {stats.get('tumor_count', 0)}")
    for tumor in stats.get("tumors", [])[:5]:
        uncertainty = (f", uncertainty {tumor['mean_uncertainty']:.2f}"
                       if tumor.get("mean_uncertainty") is not None else "")
        lines.append(f"  tumor {tumor['id']}: {tumor['volume_ml']:.1f} mL, "
                     f"largest diameter {tumor['diameter_mm']:.1f} mm{uncertainty}")
    if stats.get("liver_volume_ml") is not None:
        lines.append(f"liver volume: {stats['liver_volume_ml']:.0f} mL")
    if stats.get("tumor_burden") is not None:
        lines.append(f"tumor burden: {100 * stats['tumor_burden']:.2f} %")
    for phase, quality in stats.get("registration", {}).get("phases", {}).items():
        if quality.get("warning"):
            lines.append(f"registration warning ({phase}): {quality['warning']}")
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in stats.get("timings", {}).items())
    lines.append(f"time: {timings}")
    return lines


def run(args) -> int:
    from ..errors import InputError
    from ..pipeline import segment, write_result
    from ..runcontrol import ProgressPrinter, reported_run

    printer = ProgressPrinter(args.json_progress, "segment")
    with reported_run(printer):
        names = [name for name, _ in args.phase]
        if not names:
            raise InputError("no phases given: use --phase arterial=PATH --phase venous=PATH")
        if len(set(names)) != len(names):
            raise InputError(f"a phase is given twice: {names}")
        if args.dicom_source and not args.dicom_seg:
            raise InputError("--dicom-source is only used with --dicom-seg")
        paths = dict(args.phase)
        if len(set(paths.values())) != len(paths):
            raise InputError(f"the same file is given for several phases: {paths}")
        result = segment(paths, args.model, options_from(args), progress=printer)
        write_result(result, args.out, overview=not args.no_overview, progress=printer)
        printer.finish({"step": "done", "fraction": 1.0, "message": f"results in {args.out}",
                        "out": str(args.out), "tumor_count": result.stats.get("tumor_count")})
    if not args.json_progress:
        print("\n".join(summary_lines(result.stats)))
        print(f"results in {args.out} (overview: {args.out}/overview.png)")
    return 0
