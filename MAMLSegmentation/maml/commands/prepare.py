"""maml prepare: a hospital's folders (a CSV of files, or DICOM studies) to the raw data set
that maml train reads."""

HELP = ("turn a CSV of cases or DICOM study folders into the nnU-Net v2 raw data set maml train "
        "reads (arterial, venous, label; labels checked)")


def configure(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", metavar="CASES_CSV",
                        help="CSV with columns case,arterial,venous,label: NIfTI, NRRD or MHA files or "
                             "DICOM series folders (DIR::SERIESUID picks one series); labels as image "
                             "files or DICOM SEG files; relative paths start at the CSV's folder")
    source.add_argument("--dicom", metavar="STUDIES_DIR",
                        help="one folder per case (a study or a patient); the arterial and venous "
                             "series are picked by SeriesDescription and acquisition time; when in "
                             "doubt you are asked (on a terminal) or the case is skipped")
    parser.add_argument("--out", required=True, help="the data set folder to write (must not exist or "
                        "be empty, unless --force)")
    parser.add_argument("--labels", metavar="LABELS_DIR",
                        help="with --dicom: label of case CASE as LABELS_DIR/CASE.nii.gz (.nrrd, .mha), "
                             "CASE.dcm (DICOM SEG) or a folder CASE/ holding a DICOM SEG; default: the "
                             "DICOM SEG inside the case's folder")
    parser.add_argument("--phase-map", metavar="CSV",
                        help="with --dicom: CSV case,arterial,venous naming each phase's series (its "
                             "SeriesInstanceUID, series number or exact description) for cases whose "
                             "phases are not clear")
    parser.add_argument("--label-map", nargs="+", metavar="SOURCE=TARGET",
                        help="label values or DICOM SEG segment names to background, liver or tumor, "
                             "e.g. 1=liver 2=tumor 3=tumor 'Mass=tumor' 'Portal vein=background'; "
                             "default: values 0, 1, 2 as they are and segments named liver or "
                             "tumor/lesion/mass/neoplasm")
    parser.add_argument("--no-input", action="store_true",
                        help="never ask, even on a terminal: skip cases whose phases are in doubt")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--name", help="the data set's name in dataset.json (default: --out's folder name)")


def run(args) -> int:
    import sys
    from pathlib import Path

    from ..errors import InputError
    from ..training import prepare as prep

    def report(line: str) -> None:
        print(line, flush=True)

    if args.csv and (args.labels or args.phase_map):
        raise InputError("--labels and --phase-map go with --dicom; with --csv each row names its label")
    label_map = prep.LabelMap.parse(args.label_map)
    out = Path(args.out)
    prep.check_out_folder(out, args.force)  # before any work
    if args.csv:
        sources, skipped = prep.read_cases_csv(args.csv)
        for item in skipped:
            report(f"case {item.case}: skipped: {item.reason}")
        inputs = {"csv": str(Path(args.csv).resolve())}
    else:
        phase_map = prep.read_phase_map(args.phase_map) if args.phase_map else None
        interactive = not args.no_input and sys.stdin.isatty()

        def choose(case, phase, series, candidates):
            return prep.ask_series(case, phase, series, candidates)

        sources, skipped = prep.dicom_cases(args.dicom, args.labels, phase_map,
                                            choose if interactive else None, report)
        inputs = {"dicom": str(Path(args.dicom).resolve()),
                  "labels": str(Path(args.labels).resolve()) if args.labels else None}
    if args.label_map:
        inputs["label_map"] = list(args.label_map)
    if not sources:
        raise InputError(f"no case to prepare ({len(skipped)} skipped, see the lines above); nothing "
                         f"was written to {out}")
    result = prep.prepare(sources, out, label_map, skipped, force=args.force, name=args.name,
                          report=report, inputs=inputs)
    for line in prep.summary(result):
        report(line)
    return 0
