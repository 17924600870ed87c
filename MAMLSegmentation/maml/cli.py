"""The ``maml`` command line: one subcommand per module under ``maml.commands``.

Command modules import only the standard library at top level, so ``maml --version`` and argument
errors stay fast; each imports torch and friends inside its ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import CancelledError, MAMLError, OutOfDistributionError

# Subcommand name -> module under maml.commands with configure(parser) and run(args) -> int.
COMMANDS = {
    "info": "info",
    "phantom": "phantom",
    "prepare": "prepare",
    "plan": "plan",
    "train": "train",
    "import-nnunet": "import_nnunet",
    "evaluate": "evaluate",
    "register": "register",
    "segment": "segment",
    "segment-batch": "segment_batch",
    "fingerprint": "fingerprint",
    "tune-postprocessing": "tune_postprocessing",
    "demo": "demo",
    "models": "models",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maml",
        description="MAML multi-phase liver tumor segmentation (research use, not for clinical use).",
    )
    parser.add_argument("--version", action="version", version=f"maml {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"maml.commands.{module_name}")
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except CancelledError as error:
        print(f"maml {args.command}: cancelled: {error}", file=sys.stderr)
        return 130
    except OutOfDistributionError as error:
        print(f"maml {args.command}: refused: {error}", file=sys.stderr)
        return OutOfDistributionError.exit_code
    except MAMLError as error:
        print(f"maml {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"maml {args.command}: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
