"""`sparsetrain report` (under construction by its owner)."""

HELP = "report (not yet implemented)"


def add_arguments(parser):
    pass


def main(args):
    raise SystemExit("sparsetrain report: not implemented yet")
