"""`sparsetrain measure` (under construction by its owner)."""

HELP = "measure (not yet implemented)"


def add_arguments(parser):
    pass


def main(args):
    raise SystemExit("sparsetrain measure: not implemented yet")
