"""Subcommands of the ``sparsetrain`` CLI."""
