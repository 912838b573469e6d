#!/usr/bin/env python
"""Rebuild the built-in Fashion-MNIST subset ``src/sparsetrain/_data/fashion_mnist_small.npz``.

Takes the first 1000 training and the first 200 test images of every class, in official file order, from a full
Fashion-MNIST copy, writes them with fixed zip metadata (same bytes on every run) and prints the sha256 and the
per-class counts.

Sources tried, in order, unless ``--source`` is given:
  * ``$SPARSETRAIN_DATA``/fashion_mnist (train.npz/test.npz or IDX files),
  * ``../shared/data/fashion_mnist`` next to the repository (npz with keys x, y),
  * ``/usr/share/datasets/fashion-mnist`` (Debian package dataset-fashion-mnist: ``*-idx?-ubyte.gz``).

Usage:
    python scripts/make_fmnist_subset.py [--source DIR] [--out PATH] [--check]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from sparsetrain.data.datasets import candidate_dirs
from sparsetrain.data.subset import (
    BUILTIN_SUBSET_PATH,
    TEST_PER_CLASS,
    TRAIN_PER_CLASS,
    build_fashion_mnist_small,
    sha256_file,
    write_npz_deterministic,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCES = [REPO.parent / "shared" / "data", Path("/usr/share/datasets/fashion-mnist")]


def find_source() -> Path:
    roots = ([Path(os.environ["SPARSETRAIN_DATA"])] if os.environ.get("SPARSETRAIN_DATA") else []) + DEFAULT_SOURCES
    for root in roots:
        for d in candidate_dirs("fashion_mnist", root):
            names = {p.name for p in d.iterdir()} if d.is_dir() else set()
            if "train.npz" in names or "train-images-idx3-ubyte.gz" in names or "train-images-idx3-ubyte" in names:
                return d
    sys.exit("no Fashion-MNIST source found in " + ", ".join(map(str, roots)) + "; pass --source DIR")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help="directory with Fashion-MNIST (npz or IDX[.gz] files)")
    parser.add_argument("--out", type=Path, default=BUILTIN_SUBSET_PATH, help="output npz (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="build into a temporary file and compare with --out instead of overwriting it")
    args = parser.parse_args(argv)

    source = args.source or find_source()
    print(f"source: {source}")
    arrays = build_fashion_mnist_small(source)
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        counts = np.bincount(arrays[f"y_{split}"], minlength=10)
        print(f"{split}: {len(arrays[f'y_{split}'])} images, per class {counts.tolist()}, "
              f"last source index {int(arrays[f'index_{split}'][-1])}")
        if not (counts == per_class).all():
            raise SystemExit(f"{split}: expected {per_class} images per class, got {counts.tolist()}")

    target = args.out.with_suffix(".check.npz") if args.check else args.out
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = write_npz_deterministic(target, arrays)
    print(f"wrote {target} ({target.stat().st_size} bytes)")
    print(f"sha256 {digest}")
    if args.check:
        reference = sha256_file(args.out)
        target.unlink()
        print(f"{'identical to' if reference == digest else 'DIFFERENT from'} {args.out} (sha256 {reference})")
        return 0 if reference == digest else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
