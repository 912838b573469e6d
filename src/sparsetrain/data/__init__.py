"""Datasets and loaders: registry, on-disk readers, in-memory batch loader with tensor augmentation.

Example:
    >>> from sparsetrain.data import list_datasets, make_loaders
    >>> "fashion_mnist_small" in list_datasets()
    True
    >>> train, test, info = make_loaders("fashion_mnist_small", batch_size=128)
    >>> info.num_classes, len(train.x), len(test.x)
    (10, 10000, 2000)
"""

from sparsetrain.data.datasets import (
    BUILTIN_DATA_DIR,
    DATA_ENV_VAR,
    DatasetInfo,
    candidate_dirs,
    dataset_info,
    list_datasets,
    load_arrays,
    read_cifar_pickle,
    read_idx,
)
from sparsetrain.data.factory import make_loader, make_loaders, make_test_loader
from sparsetrain.data.loader import (
    BatchLoader,
    crop_flip,
    epoch_seed,
    normalize_to_float,
    random_crop_flip,
    subset_indices,
)

DEFAULT_DATASET = "fashion_mnist_small"

__all__ = [
    "BUILTIN_DATA_DIR",
    "DATA_ENV_VAR",
    "DEFAULT_DATASET",
    "BatchLoader",
    "DatasetInfo",
    "candidate_dirs",
    "crop_flip",
    "dataset_info",
    "epoch_seed",
    "list_datasets",
    "load_arrays",
    "make_loader",
    "make_loaders",
    "make_test_loader",
    "normalize_to_float",
    "random_crop_flip",
    "read_cifar_pickle",
    "read_idx",
    "subset_indices",
]
