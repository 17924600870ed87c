"""maml info MODEL: print a checkpoint's configuration."""

HELP = "print a model checkpoint's phases, labels, configuration and training metadata"


def configure(parser):
    parser.add_argument("model", help="checkpoint file (.pt) or an installed model's name (maml models list)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args) -> int:
    import json

    from ..model import load_model
    from ..models import resolve_model

    description = load_model(resolve_model(args.model)).describe()
    if args.json:
        print(json.dumps(description, indent=2))
        return 0
    config = description["config"]
    network = config["network"]
    rows = [
        ("model", description["name"]),
        ("file", description["path"]),
        ("sha256", description["sha256"]),
        ("phases", ", ".join(description["phases"])),
        ("labels", ", ".join(f"{l['value']}={l['name']}" for l in description["labels"])),
        ("spacing", f"{config['spacing']} mm (z, y, x)"),
        ("patch size", f"{config['patch_size']} (z, y, x)"),
        ("network", f"base {network['base_features']} features, {len(network['strides'])} stages, "
                    f"MA variant {network['ma_variant']}, {description['parameters']:,} parameters"),
        ("normalisation", ", ".join(f"{phase} {scheme}" for phase, scheme in
                                    config["normalization"].items())),
        ("post-processing", _describe_postprocessing(config.get("postprocessing") or {})),
        ("inference", _describe_inference(config.get("inference") or {},
                                          description.get("ensemble_size", 1))),
        ("intended use", description["intended_use"]),
        ("data kind", description["data_kind"]),
        ("fingerprint", _describe_fingerprint(description["fingerprint"])),
    ]
    width = max(len(key) for key, _ in rows) + 2  # long metadata keys just get one space
    for key, value in [*rows, *description["metadata"].items()]:
        print(f"{str(key) + ':':<{width}}{value}" if len(str(key)) + 1 < width
              else f"{key}: {value}")
    return 0


def _describe_inference(settings: dict, ensemble_size: int) -> str:
    from ..config import DEFAULT_OVERLAP

    blend = settings.get("blend", "probabilities")
    axes = settings.get("mirror_axes", [0, 1, 2])
    parts = [f"windows overlap by {settings.get('overlap', DEFAULT_OVERLAP):g} of a patch", f"blends {blend}",
             "mirroring (with --tta) flips axes " + (", ".join("zyx"[a] for a in axes) or "none")]
    if ensemble_size > 1:
        parts.append(f"ensemble of {ensemble_size} networks (e.g. folds), averaged")
    return "; ".join(parts)


def _describe_postprocessing(settings: dict) -> str:
    parts = []
    if settings.get("largest_component"):
        parts.append("largest foreground component")
    parts += [f"{name} >= {volume:g} ml" for name, volume in settings.get("min_volume_ml", {}).items()
              if volume > 0]
    return ", ".join(parts) or "none"


def _describe_fingerprint(summary: dict | None) -> str:
    if not summary:
        return "none: the out-of-distribution check cannot run (add one with maml fingerprint)"
    limits = ", ".join(f"{phase} {limit['mean_refused_above']:.1f}" for phase, limit in
                       summary["feature_distance_limits"].items())
    counts = summary.get("tumor_count_limits")
    count = f" or more than {counts['refused_above']} tumors" if counts else ""
    return (f"{summary['training_cases']} training cases of {summary['dataset']}, "
            f"{summary['calibration_cases']} held-out cases; refused above a mean feature "
            f"distance of {limits}{count}")
