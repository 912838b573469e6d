"""`sparsetrain train` (under construction by its owner)."""

HELP = "train (not yet implemented)"


def add_arguments(parser):
    pass


def main(args):
    raise SystemExit("sparsetrain train: not implemented yet")
