"""maml info MODEL: print a checkpoint's configuration."""

HELP = "print a model checkpoint's phases, labels, configuration and training metadata"


def configure(parser):
    parser.add_argument("model", help="checkpoint file (.pt)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args) -> int:
    import json

    from ..model import load_model

    description = load_model(args.model).describe()
    if args.json:
        print(json.dumps(description, indent=2))
        return 0
    print(f"model:        {description['name']}")
    print(f"file:         {description['path']}")
    print(f"sha256:       {description['sha256']}")
    print(f"phases:       {', '.join(description['phases'])}")
    labels = ", ".join(f"{l['value']}={l['name']}" for l in description["labels"])
    print(f"labels:       {labels}")
    config = description["config"]
    print(f"spacing:      {config['spacing']} mm (z, y, x)")
    print(f"patch size:   {config['patch_size']} (z, y, x)")
    print(f"network:      base {config['network']['base_features']} features, "
          f"{len(config['network']['strides'])} stages, MA variant {config['network']['ma_variant']}, "
          f"{description['parameters']:,} parameters")
    print(f"intended use: {description['intended_use']}")
    for key, value in description["metadata"].items():
        print(f"{key + ':':<14}{value}")
    return 0
