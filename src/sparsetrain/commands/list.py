"""`sparsetrain list` (under construction by its owner)."""

HELP = "list (not yet implemented)"


def add_arguments(parser):
    pass


def main(args):
    raise SystemExit("sparsetrain list: not implemented yet")
