"""`sparsetrain flops` (under construction by its owner)."""

HELP = "flops (not yet implemented)"


def add_arguments(parser):
    pass


def main(args):
    raise SystemExit("sparsetrain flops: not implemented yet")
