"""The loader factories: the training and test loaders of a registered dataset, in memory or read from image folders
(:mod:`sparsetrain.data.folder`), and the test split alone for evaluation."""

from __future__ import annotations

import os

import torch

from sparsetrain.data.datasets import DatasetInfo, dataset_info, load_arrays, normalize_split
from sparsetrain.data.folder import make_folder_loaders
from sparsetrain.data.loader import BatchLoader, subset_indices

__all__ = ["make_loaders", "make_loader", "make_test_loader"]


def make_loaders(name: str, data_dir: str | os.PathLike | None = None, batch_size: int = 128,
                 eval_batch_size: int | None = None, seed: int = 0, augment: bool = True,
                 train_subset: int | None = None, test_subset: int | None = None, channels_last: bool = False,
                 *, stratified: bool = False, drop_last: bool = False, device: torch.device | str | None = None,
                 num_workers: int | None = None) -> tuple[BatchLoader, BatchLoader, DatasetInfo]:
    """Build the training and test loaders of a registered dataset.

    The training loader shuffles and (with ``augment``) applies the dataset's default augmentation
    (:attr:`DatasetInfo.crop_padding`, :attr:`DatasetInfo.hflip`); the test loader keeps file order, no
    augmentation, and never drops the last batch.

    Args:
        name: Dataset name (:func:`~sparsetrain.data.list_datasets`).
        data_dir: Data root (default ``$SPARSETRAIN_DATA``; the built-in subset needs none).
        batch_size: Training batch size.
        eval_batch_size: Test batch size (default ``batch_size``).
        seed: Base seed of the shuffling/augmentation generator.
        augment: Apply training augmentation.
        train_subset: Keep only the first N training images (for quick runs).
        test_subset: Keep only the first N test images.
        channels_last: Yield ``torch.channels_last`` tensors.
        stratified: Make the subsets class-balanced (still the earliest images of each class).
        drop_last: Drop the last incomplete training batch.
        device: Device the batches are produced on.
        num_workers: Decoding worker processes, used only by folder datasets (``imagenet_folder``).

    Returns:
        ``(train_loader, test_loader, info)``.

    Example:
        >>> train, test, info = make_loaders("fashion_mnist_small", batch_size=100)
        >>> len(train), len(test), info.num_classes
        (100, 20, 10)
    """
    info = dataset_info(name)
    eval_batch_size = eval_batch_size or batch_size
    if not info.in_memory:
        return make_folder_loaders(name, data_dir=data_dir, batch_size=batch_size, eval_batch_size=eval_batch_size,
                                   seed=seed, augment=augment, train_subset=train_subset, test_subset=test_subset,
                                   channels_last=channels_last, stratified=stratified, drop_last=drop_last,
                                   num_workers=num_workers)
    common = dict(data_dir=data_dir, seed=seed, augment=augment, stratified=stratified, channels_last=channels_last,
                  device=device)
    train = make_loader(name, "train", batch_size=batch_size, subset=train_subset, drop_last=drop_last, **common)
    test = make_loader(name, "test", batch_size=eval_batch_size, subset=test_subset, **common)
    return train, test, info


def make_loader(name: str, split: str, data_dir: str | os.PathLike | None = None, batch_size: int = 128, *,
                seed: int = 0, augment: bool = True, subset: int | None = None, stratified: bool = False,
                channels_last: bool = False, drop_last: bool = False,
                device: torch.device | str | None = None) -> BatchLoader:
    """One loader of an in-memory dataset, reading only that split (e.g. evaluation without loading the train set).

    ``split="train"`` gives the shuffled, augmented (if ``augment``) training loader of :func:`make_loaders`; any
    test split gives the file-order, unaugmented loader (``drop_last`` is then ignored).

    Example:
        >>> test = make_loader("fashion_mnist_small", "test", batch_size=500)
        >>> len(test), test.augment
        (4, False)
    """
    info = dataset_info(name)
    train = normalize_split(split) == "train"
    x, y = load_arrays(name, split, data_dir)
    if subset is not None:
        idx = subset_indices(y, subset, info.num_classes, stratified)
        x, y = x[idx], y[idx]
    return BatchLoader(x, y, batch_size, mean=info.mean, std=info.std, shuffle=train,
                       crop_padding=info.crop_padding if (train and augment) else 0, hflip=info.hflip and train and augment,
                       drop_last=drop_last and train, seed=seed, channels_last=channels_last, device=device)


def make_test_loader(name: str, data_dir: str | os.PathLike | None = None, batch_size: int = 500, *,
                     subset: int | None = None, device: torch.device | str | None = None):
    """The test split alone, in file order (the first ``subset`` images, as training evaluated them), of any
    registered dataset: an in-memory dataset reads only its test arrays, an image folder uses its loader factory.

    Example:
        >>> len(make_test_loader("fashion_mnist_small", batch_size=500, subset=1000))
        2
    """
    if dataset_info(name).in_memory:
        return make_loader(name, "test", data_dir, batch_size, subset=subset, device=device)
    return make_loaders(name, data_dir=data_dir, batch_size=batch_size, augment=False, device=device,
                        test_subset=subset)[1]
