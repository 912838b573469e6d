"""Build the built-in ``fashion_mnist_small`` subset, byte-for-byte reproducibly.

The subset holds, for every class, the first 1000 training and the first 200 test images of Fashion-MNIST in the
official file order; the selected images keep that order (classes stay interleaved as in the original files).
``scripts/make_fmnist_subset.py`` is the command-line front end.

``np.savez_compressed`` stamps each member with the current time, so two builds differ in a few header bytes.
:func:`write_npz_deterministic` writes the same npz format (a zip of ``.npy`` members, deflate, zip64) with a fixed
timestamp and attributes, so rebuilding gives identical bytes (for a given zlib version).

Example:
    >>> arrays = build_fashion_mnist_small("/usr/share/datasets/fashion-mnist")  # doctest: +SKIP
    >>> write_npz_deterministic("fashion_mnist_small.npz", arrays)  # doctest: +SKIP
    '...sha256...'
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np

from sparsetrain.data.datasets import BUILTIN_DATA_DIR, load_arrays

__all__ = [
    "TRAIN_PER_CLASS",
    "TEST_PER_CLASS",
    "BUILTIN_SUBSET_PATH",
    "first_per_class",
    "build_fashion_mnist_small",
    "write_npz_deterministic",
    "sha256_file",
]

TRAIN_PER_CLASS = 1000
TEST_PER_CLASS = 200
BUILTIN_SUBSET_PATH = BUILTIN_DATA_DIR / "fashion_mnist_small.npz"

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # earliest zip timestamp; any fixed value would do


def first_per_class(y: np.ndarray, per_class: int, num_classes: int) -> np.ndarray:
    """Indices of the first ``per_class`` samples of every class, in file order (sorted).

    Raises:
        ValueError: A class has fewer than ``per_class`` samples.
    """
    y = np.asarray(y)
    picks = []
    for cls in range(num_classes):
        idx = np.flatnonzero(y == cls)[:per_class]
        if len(idx) < per_class:
            raise ValueError(f"class {cls} has only {len(idx)} samples, need {per_class}")
        picks.append(idx)
    return np.sort(np.concatenate(picks))


def build_fashion_mnist_small(source_dir: str | os.PathLike, train_per_class: int = TRAIN_PER_CLASS,
                              test_per_class: int = TEST_PER_CLASS) -> dict[str, np.ndarray]:
    """Select the balanced subset from a full Fashion-MNIST copy.

    Args:
        source_dir: Any directory :func:`~sparsetrain.data.load_arrays` accepts for ``fashion_mnist`` (npz files or
            the raw/gz IDX files, e.g. Debian's ``/usr/share/datasets/fashion-mnist``).
        train_per_class: Training images kept per class.
        test_per_class: Test images kept per class.

    Returns:
        Arrays ``x_train, y_train, x_test, y_test`` (uint8 N x 28 x 28 x 1, int64) and ``index_train, index_test``
        (int64 positions in the official files, for provenance).
    """
    out: dict[str, np.ndarray] = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        x, y = load_arrays("fashion_mnist", split, source_dir)
        x, y = x.numpy(), y.numpy()
        idx = first_per_class(y, per_class, 10)
        out[f"x_{split}"] = np.ascontiguousarray(x[idx])
        out[f"y_{split}"] = y[idx].astype(np.int64)
        out[f"index_{split}"] = idx.astype(np.int64)
    return out


def write_npz_deterministic(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> str:
    """Write ``arrays`` as a compressed npz readable by ``np.load`` with fixed zip metadata; return its sha256.

    Members are written in the order of ``arrays``.
    """
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # ZipInfo picks 0 on Windows, 3 elsewhere: pin it
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(value), allow_pickle=False)
    return sha256_file(path)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
