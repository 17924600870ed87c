"""Subcommands of the ``maml`` command line (see ``maml.cli.COMMANDS``)."""
