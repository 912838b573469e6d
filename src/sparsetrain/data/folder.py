"""ImageFolder-style datasets (ImageNet): ``train/<class>/*.jpg`` and ``val/<class>/*.jpg``.

Images are decoded with ``torchvision.io`` (the only torchvision dependency, imported lazily) in
``DataLoader`` worker processes. The geometric transforms are plain torch ops, so they are testable without
torchvision:

* training: random-resized crop (scale ``[0.08, 1]``, aspect ratio ``[3/4, 4/3]``, the Inception/torchvision
  recipe) to ``image_size`` plus a horizontal flip with probability 1/2;
* evaluation: resize the shorter side to ``image_size / 0.875`` (256 for 224) and take the centre crop.

Per-image randomness comes from a generator seeded with ``(seed, epoch, image index)``, so the result does not
depend on which worker decodes which image.

Example:
    >>> from sparsetrain.data import make_loaders
    >>> train, val, info = make_loaders("imagenet_folder", data_dir="/data", batch_size=256)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from sparsetrain.data.datasets import DatasetInfo, candidate_dirs, dataset_info
from sparsetrain.data.loader import EpochBatches, epoch_seed, normalize_to_float, subset_indices

__all__ = [
    "IMG_EXTENSIONS",
    "require_torchvision",
    "scan_image_folder",
    "resize_shorter",
    "center_crop",
    "random_resized_crop_params",
    "resized_crop",
    "FolderLoader",
    "make_folder_loaders",
]

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_EVAL_CROP_FRACTION = 0.875  # 224 / 256, the standard ImageNet evaluation crop


def require_torchvision():
    """Import and return ``torchvision.io``, or raise an ImportError that says how to install it."""
    try:
        import torchvision.io as tvio
    except ImportError as e:
        raise ImportError(
            "dataset 'imagenet_folder' decodes images with torchvision, which is not installed; "
            "install it with: pip install 'sparsetrain[torchvision]'") from e
    return tvio


def scan_image_folder(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """List ``root/<class>/<image>`` files, classes sorted by name (label = position), files sorted per class.

    Args:
        root: Folder with one sub-folder per class.

    Returns:
        ``(samples, classes)`` with ``samples`` a list of ``(path, label)``.

    Raises:
        FileNotFoundError: No class folder or no image file with an extension in :data:`IMG_EXTENSIONS`.
    """
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not classes:
        raise FileNotFoundError(f"{root}: expected one sub-folder per class, found none")
    samples = []
    for label, cls in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / cls, followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), label))
    if not samples:
        raise FileNotFoundError(f"{root}: no images with extensions {', '.join(IMG_EXTENSIONS)} in the class folders")
    return samples, classes


def _resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    out = F.interpolate(img[None].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def resize_shorter(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 ``C x H x W`` image (bilinear, antialiased) so its shorter side equals ``size``."""
    h, w = img.shape[-2:]
    if h <= w:
        nh, nw = size, max(1, round(w * size / h))
    else:
        nh, nw = max(1, round(h * size / w)), size
    return img if (nh, nw) == (h, w) else _resize(img, nh, nw)


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """Central ``size x size`` window of a ``C x H x W`` image (at least ``size`` on each side)."""
    h, w = img.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"image {h}x{w} is smaller than the crop {size}")
    top, left = (h - size) // 2, (w - size) // 2
    return img[..., top:top + size, left:left + size]


def random_resized_crop_params(h: int, w: int, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Sample ``(top, left, height, width)`` of a random-resized crop (torchvision's algorithm, own generator).

    Up to ten tries draw an area fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``; if none
    fits, fall back to the largest centred crop whose aspect ratio is clamped into ``ratio``.
    """
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = min(int(u[2] * (h - ch + 1)), h - ch)
            left = min(int(u[3] * (w - cw + 1)), w - cw)
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def resized_crop(img: torch.Tensor, top: int, left: int, height: int, width: int, size: int) -> torch.Tensor:
    """Crop ``img[..., top:top+height, left:left+width]`` and resize it to ``size x size``."""
    return _resize(img[..., top:top + height, left:left + width], size, size)


class _FolderDataset(torch.utils.data.Dataset):
    """Decodes one image per item and returns ``(uint8 3 x S x S, label)``."""

    def __init__(self, samples: list[tuple[str, int]], image_size: int, augment: bool, hflip: bool, seed: int) -> None:
        self.samples, self.image_size, self.augment, self.hflip, self.seed = samples, image_size, augment, hflip, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        tvio = require_torchvision()
        path, label = self.samples[index]
        img = tvio.decode_image(tvio.read_file(path), mode=tvio.ImageReadMode.RGB)
        s = self.image_size
        if self.augment:
            gen = torch.Generator().manual_seed(epoch_seed(epoch_seed(self.seed, self.epoch), index))
            top, left, h, w = random_resized_crop_params(img.shape[-2], img.shape[-1], gen)
            img = resized_crop(img, top, left, h, w, s)
            if self.hflip and bool(torch.rand((), generator=gen) < 0.5):
                img = img.flip(-1)
        else:
            img = center_crop(resize_shorter(img, round(s / _EVAL_CROP_FRACTION)), s)
        return img.contiguous(), label


class FolderLoader(EpochBatches):
    """Batches of normalised float32 NCHW images decoded from an image folder (same interface as BatchLoader).

    Args:
        samples: ``(path, label)`` list, e.g. from :func:`scan_image_folder`.
        batch_size: Images per batch.
        mean: Per-channel mean (``[0, 1]`` units).
        std: Per-channel std.
        image_size: Output side length.
        shuffle: Random order each epoch (else file order).
        augment: Random-resized crop + flip (else resize + centre crop).
        hflip: Flip when augmenting.
        seed: Base seed; epoch ``e`` shuffles with ``epoch_seed(seed, e)``.
        drop_last: Drop the final incomplete batch.
        channels_last: Yield ``torch.channels_last`` tensors.
        num_workers: Decoding processes (default: ``min(8, os.cpu_count())``).
    """

    def __init__(self, samples: list[tuple[str, int]], batch_size: int, *, mean: tuple[float, ...],
                 std: tuple[float, ...], image_size: int = 224, shuffle: bool = False, augment: bool = False,
                 hflip: bool = True, seed: int = 0,
                 drop_last: bool = False, channels_last: bool = False, num_workers: int | None = None) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.samples, self.batch_size, self.mean, self.std = samples, batch_size, tuple(mean), tuple(std)
        self.shuffle, self.augment, self.seed = shuffle, augment, seed
        self.drop_last, self.channels_last = drop_last, channels_last
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        self.dataset = _FolderDataset(samples, image_size, augment, hflip, seed)
        self._init_epochs()

    @property
    def num_samples(self) -> int:
        """Number of images."""
        return len(self.samples)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.dataset.epoch = self.epoch  # workers get a fresh copy of the dataset at each iteration
        if self.shuffle:
            order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(
                epoch_seed(self.seed, self.epoch))).tolist()
        else:
            order = list(range(len(self.samples)))
        start, self._start_batch = self._start_batch, 0
        # Augmentation is seeded per (seed, epoch, sample) in the dataset, so skipping or sharding batches needs
        # no generator bookkeeping here.
        batches = [order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(start, len(self))]
        if self.world_size > 1:
            batches = [[bt[i] for i in part.tolist()] for bt in batches
                       for part in [torch.tensor_split(torch.arange(len(bt)), self.world_size)[self.rank]]]
            batches = [bt for bt in batches if bt]
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers)
        for xb, yb in loader:
            yield normalize_to_float(xb, self.mean, self.std, self.channels_last), yb.long()
        self.epoch += 1


def _find_root(name: str, data_dir: str | os.PathLike | None) -> Path:
    dirs = candidate_dirs(name, data_dir)
    for d in dirs:
        if (d / "train").is_dir() and (d / "val").is_dir():
            return d
    searched = "\n".join(f"  {d}{'' if d.is_dir() else '  (does not exist)'}" for d in dirs) or \
        "  (none: pass data_dir (CLI --data-dir) or set SPARSETRAIN_DATA)"
    raise FileNotFoundError(
        f"dataset {name!r} not found.\nDirectories searched:\n{searched}\n"
        f"Expected layout: train/<class>/<image> and val/<class>/<image> (same class folder names; "
        f"extensions {', '.join(IMG_EXTENSIONS)})")


def make_folder_loaders(name: str = "imagenet_folder", data_dir: str | os.PathLike | None = None,
                        batch_size: int = 256, eval_batch_size: int | None = None, seed: int = 0, augment: bool = True,
                        train_subset: int | None = None, test_subset: int | None = None, channels_last: bool = False,
                        stratified: bool = True, drop_last: bool = False,
                        num_workers: int | None = None) -> tuple[FolderLoader, FolderLoader, DatasetInfo]:
    """Loaders for an ImageFolder dataset; see :func:`sparsetrain.data.make_loaders` for the arguments.

    Subsets of folder datasets are always class-stratified, because file order groups the classes (the first N
    files would all belong to the first classes). ``augment=False`` makes the training loader use the evaluation
    transform (the order is still shuffled). The returned info has ``num_classes`` and ``class_names`` from the
    ``train`` folder.
    """
    require_torchvision()
    info = dataset_info(name)
    root = _find_root(name, data_dir)
    train_samples, classes = scan_image_folder(root / "train")
    val_samples, val_classes = scan_image_folder(root / "val")
    if val_classes != classes:
        raise ValueError(f"{root}: train/ has {len(classes)} class folders and val/ has {len(val_classes)}; "
                         f"their names must match")
    if not stratified:
        logger.info("folder subsets are always stratified (file order groups the classes)")
    chosen = {}
    for key, samples, n in (("train", train_samples, train_subset), ("val", val_samples, test_subset)):
        if n is not None:
            y = torch.tensor([lbl for _, lbl in samples])
            samples = [samples[i] for i in subset_indices(y, n, len(classes), stratified=True).tolist()]
        chosen[key] = samples
    info = dataclasses.replace(info, num_classes=len(classes), class_names=tuple(classes))
    common = dict(mean=info.mean, std=info.std, image_size=info.image_size, seed=seed, channels_last=channels_last,
                  num_workers=num_workers)
    train = FolderLoader(chosen["train"], batch_size, shuffle=True, augment=augment, hflip=info.hflip,
                         drop_last=drop_last, **common)
    test = FolderLoader(chosen["val"], eval_batch_size or batch_size, **common)
    logger.info("%s: %d train / %d val images, %d classes from %s", name, len(chosen["train"]), len(chosen["val"]),
                len(classes), root)
    return train, test, info
