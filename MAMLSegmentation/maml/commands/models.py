"""maml models list|install|remove: the bundled model and the user models folder ($MAML_MODELS)."""

HELP = "list, install or remove models (the bundled one and those in the user models folder)"


def configure(parser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="installed models and catalog models that can be installed; "
                                              "writes the missing model card of a checkpoint copied in by hand")
    listing.add_argument("--json", action="store_true", help="print machine-readable JSON")
    listing.add_argument("--json-progress", action="store_true",
                         help="print progress as JSON lines on stdout (for other programs)")
    install = actions.add_parser("install", help="install a checkpoint from a file, an https address or "
                                                 "a catalog entry's name, after checking it")
    install.add_argument("source", metavar="FILE|URL|NAME")
    install.add_argument("--sha256", help="the file's SHA-256 checksum (required for an https address)")
    install.add_argument("--name", help="name to install it under (default: the file name without .pt)")
    install.add_argument("--phases", help="comma-separated phases the model must segment, e.g. arterial,venous")
    install.add_argument("--ca-bundle", metavar="FILE",
                         help="certificate authorities to trust for the download (e.g. a hospital proxy's)")
    install.add_argument("--json-progress", action="store_true",
                         help="print progress as JSON lines on stdout (for other programs)")
    remove = actions.add_parser("remove", help="remove a model from the user models folder")
    remove.add_argument("name")


def run(args) -> int:
    return {"list": _list, "install": _install, "remove": _remove}[args.action](args)


def _list(args) -> int:
    import json

    from .. import models
    from ..runcontrol import ProgressPrinter, reported_run

    printer = ProgressPrinter(args.json_progress, "models")
    with reported_run(printer):
        user_dir = models.user_models_dir()
        installed = models.update_cards(models.installed_models(user_dir), printer)
        names = {model.name for model in installed}
        available = [entry for entry in models.catalog_entries(user_dir) if entry.name not in names]
        listing = {"user_folder": str(user_dir), "models": [m.to_dict() for m in installed],
                   "available": [entry.to_dict() for entry in available]}
        printer.finish({"step": "done", "fraction": 1.0, "message": f"{len(installed)} model(s) installed",
                        "models": len(installed)})
    if args.json_progress:
        return 0
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    print(f"user models folder: {user_dir}")
    for model in installed:
        card = model.card or {}
        phases = ", ".join(card.get("phases", [])) or "?"
        status = f"  [{model.card_problem}]" if model.card_problem else ""
        print(f"{model.name:<28} {model.source:<8} phases {phases:<18} {model.path}{status}")
    for entry in available:
        print(f"{entry.name:<28} {'catalog':<8} phases {', '.join(entry.phases):<18} "
              f"install with: maml models install {entry.name}")
    return 0


def _install(args) -> int:
    from .. import models
    from ..runcontrol import ProgressPrinter, reported_run

    printer = ProgressPrinter(args.json_progress, "install")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()] if args.phases else None
    with reported_run(printer):
        model = models.install_model(args.source, args.sha256, args.name, phases,
                                     ca_bundle=args.ca_bundle, progress=printer)
        printer.finish({"step": "done", "fraction": 1.0, "message": f"installed {model.name}",
                        "name": model.name, "path": str(model.path)})
    if not args.json_progress:
        print(f"installed {model.name}: {model.path}")
    return 0


def _remove(args) -> int:
    from .. import models

    path = models.remove_model(args.name)
    print(f"removed {args.name} ({path})")
    return 0
