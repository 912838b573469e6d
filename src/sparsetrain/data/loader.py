"""In-memory batch loader with whole-batch tensor augmentation.

The datasets used for sparse-training experiments (MNIST, Fashion-MNIST, CIFAR) fit in memory as uint8, so
instead of a ``DataLoader`` with worker processes and per-image transforms, :class:`BatchLoader` keeps the images
as one uint8 ``N x C x H x W`` tensor, indexes a batch out of it and augments it with a handful of tensor ops on
the whole batch:

* random crop with zero padding ``p`` = pad the batch once, then one ``torch.gather`` with a per-image flat
  pixel index (the window of image ``i`` starts at a random ``(oy_i, ox_i)`` in ``[0, 2p]^2``);
* horizontal flip = ``torch.where`` reversing the column part of that same index for a random half of the
  images, so crop and flip together cost a single copy;
* normalisation ``(x / 255 - mean) / std`` = one multiply-add with per-channel constants on the float batch.

Padding happens on the raw uint8 pixels, so the border is black (0) before normalisation, exactly like
``torchvision.transforms.RandomCrop(32, padding=4)`` followed by ``Normalize``.

Randomness comes from a ``torch.Generator`` seeded from ``(seed, epoch)``: the same seed and epoch always give
the same order and the same augmentations, so a run resumed at epoch ``e`` (``loader.set_epoch(e)``) sees exactly
the batches the uninterrupted run saw.

Example:
    >>> from sparsetrain.data import make_loaders
    >>> train, test, info = make_loaders("fashion_mnist_small", batch_size=64, train_subset=256)
    >>> train.set_epoch(0)
    >>> x, y = next(iter(train))
    >>> x.shape, x.dtype, y.dtype
    (torch.Size([64, 1, 28, 28]), torch.float32, torch.int64)
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "BatchLoader",
    "crop_flip",
    "random_crop_flip",
    "draw_crop_flip",
    "normalize_to_float",
    "subset_indices",
    "epoch_seed",
    "EpochBatches",
]

logger = logging.getLogger(__name__)

_MASK63 = (1 << 63) - 1


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the generator used in ``epoch`` (a fixed mix of the two integers, in ``[0, 2**63)``)."""
    # Multiply-add with two odd 64-bit constants (PCG/Knuth multipliers) so nearby (seed, epoch) pairs land far apart.
    return (seed * 6364136223846793005 + (epoch + 1) * 1442695040888963407) & _MASK63


def crop_flip(x: torch.Tensor, padding: int, offset_y: torch.Tensor, offset_x: torch.Tensor,
              flip: torch.Tensor | None = None) -> torch.Tensor:
    """Zero-pad an NCHW batch by ``padding`` and take one ``H x W`` window per image, optionally mirrored.

    Image ``i`` of the result is ``padded[i, :, oy:oy+H, ox:ox+W]`` with ``(oy, ox) = (offset_y[i], offset_x[i])``,
    reversed along the width when ``flip[i]``. Crop and flip are a single ``torch.gather`` over the whole batch
    with a per-image flat pixel index (the flip just reverses the column order of that index): no per-image loop.

    Args:
        x: ``N x C x H x W`` tensor (any dtype; uint8 in the loader).
        padding: Zero border added on each side (0 = no crop; offsets must then be 0).
        offset_y: ``N`` integer offsets in ``[0, 2 * padding]``.
        offset_x: ``N`` integer offsets in ``[0, 2 * padding]``.
        flip: Optional ``N`` bool tensor; True mirrors the image horizontally.

    Returns:
        Contiguous ``N x C x H x W`` tensor of ``x``'s dtype.
    """
    n, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (padding, padding, padding, padding)) if padding > 0 else x.contiguous()
    rows = offset_y.to(dev).view(n, 1) + torch.arange(h, device=dev)  # N x H
    cols = offset_x.to(dev).view(n, 1) + torch.arange(w, device=dev)  # N x W
    if flip is not None:
        cols = torch.where(flip.to(dev).view(n, 1), cols.flip(1), cols)
    flat = (rows.view(n, h, 1) * (w + 2 * padding) + cols.view(n, 1, w)).view(n, 1, h * w)
    return torch.gather(padded.view(n, c, -1), 2, flat.expand(n, c, h * w)).view(n, c, h, w)


def draw_crop_flip(n: int, padding: int, hflip: bool, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The random parameters of :func:`random_crop_flip` for ``n`` images: ``(offset_y, offset_x, flip)``.

    Draws from ``generator`` in a fixed order (offsets y, offsets x, then flips; offsets only when ``padding > 0``,
    flips only when ``hflip``), so skipping a batch by drawing its parameters leaves the generator exactly where
    building it would have (how a run resumed mid-epoch sees the batches the uninterrupted run saw).
    """
    if padding > 0:
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    else:
        oy = ox = torch.zeros(n, dtype=torch.long)
    flip = torch.rand(n, generator=generator) < 0.5 if hflip else None
    return oy, ox, flip


def random_crop_flip(x: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and (if ``hflip``) random horizontal flip of an NCHW batch.

    Offsets are uniform in ``[0, 2 * padding]`` per image, flips have probability 1/2 (:func:`draw_crop_flip`).

    Args:
        x: ``N x C x H x W`` batch.
        padding: Zero padding of the crop (0 = no crop).
        hflip: Whether to flip.
        generator: Source of randomness.

    Returns:
        The augmented batch, same shape and dtype.
    """
    oy, ox, flip = draw_crop_flip(x.shape[0], padding, hflip, generator)
    if padding == 0 and flip is None:
        return x
    return crop_flip(x, padding, oy, ox, flip)


def normalize_to_float(x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                       channels_last: bool = False) -> torch.Tensor:
    """Convert a uint8 NCHW batch to normalised float32: ``(x / 255 - mean) / std`` per channel.

    Args:
        x: ``N x C x H x W`` uint8 batch.
        mean: ``C`` channel means in ``[0, 1]`` units.
        std: ``C`` channel standard deviations in ``[0, 1]`` units.
        channels_last: Return the result in ``torch.channels_last`` memory format.

    Returns:
        Float32 ``N x C x H x W``.
    """
    c = x.shape[1]
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device)
    if mean_t.numel() != c or std_t.numel() != c:
        raise ValueError(f"mean/std need {c} entries for {c} channels, got {list(mean)} / {list(std)}")
    # Folded into one multiply-add: x * (1 / (255 std)) + (-mean / std).
    scale = (1.0 / (255.0 * std_t)).view(1, c, 1, 1)
    bias = (-mean_t / std_t).view(1, c, 1, 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(torch.float32, memory_format=fmt).mul_(scale).add_(bias)


def subset_indices(y: torch.Tensor, n: int, num_classes: int | None = None, stratified: bool = False) -> torch.Tensor:
    """Indices of the first ``n`` samples, optionally balanced over classes, in original order.

    With ``stratified=True`` each class gets ``n // num_classes`` samples (the first classes one more when ``n`` does
    not divide), always its earliest ones in file order. A class with too few samples contributes all it has.

    Args:
        y: int64 labels.
        n: Subset size (``n >= len(y)`` keeps everything).
        num_classes: Number of classes (default ``y.max() + 1``).
        stratified: Balance the classes.

    Returns:
        Sorted int64 index tensor.
    """
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    total = len(y)
    if n >= total:
        return torch.arange(total)
    if not stratified:
        return torch.arange(n)
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    picks = []
    for cls in range(num_classes):
        want = n // num_classes + (1 if cls < n % num_classes else 0)
        idx = torch.nonzero(y == cls).view(-1)[:want]
        if len(idx) < want:
            logger.warning("stratified subset: class %d has only %d samples, wanted %d", cls, len(idx), want)
        picks.append(idx)
    return torch.sort(torch.cat(picks)).values


@contextlib.contextmanager
def _intra_op_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None = leave it alone)."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class EpochBatches:
    """What both loaders share: the epoch and start batch to iterate, and the rank's slice of each global batch.

    A subclass sets ``batch_size``, ``shuffle``, ``drop_last`` and implements ``num_samples``; it calls
    ``_init_epochs()`` in its constructor.
    """

    batch_size: int
    shuffle: bool
    drop_last: bool

    def _init_epochs(self) -> None:
        self.epoch = 0
        self._start_batch = 0
        self.rank, self.world_size = 0, 1

    @property
    def num_samples(self) -> int:  # pragma: no cover - every loader overrides it
        raise NotImplementedError

    def shard(self, rank: int, world_size: int):
        """Make this loader yield rank ``rank``'s slice of each global batch (in place; returns ``self``)."""
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"shard: rank must be in [0, world_size), got rank {rank!r} of {world_size!r}")
        self.rank, self.world_size = rank, world_size
        return self

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose order and augmentations the next iteration produces, and the batch it starts at."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.epoch = int(epoch)
        self._start_batch = int(start_batch)

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        # A training step needs every rank: a last global batch with fewer samples than ranks is dropped.
        tail = self.shuffle and self.world_size > 1 and not self.drop_last and 0 < n % b < self.world_size
        return n // b if self.drop_last or tail else math.ceil(n / b)


class BatchLoader(EpochBatches):
    """Iterate over an in-memory uint8 NHWC dataset in batches of normalised float32 NCHW images.

    Args:
        x: ``N x H x W x C`` uint8 tensor.
        y: ``N`` int64 labels.
        batch_size: Images per batch.
        mean: Per-channel normalisation mean (``[0, 1]`` units).
        std: Per-channel normalisation std.
        shuffle: Random order each epoch.
        crop_padding: Random-crop zero padding (0 = no crop).
        hflip: Random horizontal flips.
        drop_last: Drop the final incomplete batch.
        seed: Base seed; epoch ``e`` uses ``epoch_seed(seed, e)``.
        channels_last: Yield tensors in ``torch.channels_last`` memory format.
        device: Move each uint8 batch here before augmenting (default: stay on the CPU).
        single_thread: Build each batch with one intra-op thread. The batch ops are small (about 1 ms), so splitting
            them across threads buys little, and on a busy machine the thread hand-offs cost 10x more than the work
            itself (measured: a CIFAR-10 epoch took 16 s with 2 threads under load vs 1.1 s with 1). The previous
            thread count is restored before each batch is yielded; disable if another thread trains concurrently.

    The epoch starts at 0; :meth:`set_epoch` selects it, and a completed pass advances it by one, so forgetting
    ``set_epoch`` still reshuffles. A resumed run calls ``set_epoch(start_epoch)`` to reproduce the original order,
    ``set_epoch(e, start_batch=k)`` to continue an epoch after its first ``k`` batches.

    Data parallelism (:meth:`shard`): ``batch_size`` stays the *global* batch. Every rank draws the same order and
    the same augmentation parameters for the whole global batch (from ``(seed, epoch)`` only) and keeps its part,
    ``torch.tensor_split`` of the batch into ``world_size`` nearly equal slices. So each sample is seen once per
    epoch, the global batches are those of a single process whatever the world size, and a run resumed on another
    number of processes re-shards the same batches. A training loader drops a last global batch smaller than the
    world size (every rank must take part in every step); an evaluation loader yields only non-empty slices.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, mean: Sequence[float],
                 std: Sequence[float], shuffle: bool = False, crop_padding: int = 0, hflip: bool = False,
                 drop_last: bool = False, seed: int = 0, channels_last: bool = False,
                 device: torch.device | str | None = None, single_thread: bool = True) -> None:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"x must be a uint8 N x H x W x C tensor, got {x.dtype} {tuple(x.shape)}")
        if y.dim() != 1 or len(y) != len(x):
            raise ValueError(f"y must hold one label per image: {tuple(y.shape)} labels for {len(x)} images")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        # Stored planar (N x C x H x W) once: every per-batch op then runs on contiguous image planes, which is
        # several times faster on CPU than working with 1- or 3-byte channel-innermost pixels.
        self._planar = x.permute(0, 3, 1, 2).contiguous()
        self.y = y.to(torch.int64)
        self.batch_size = batch_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.shuffle, self.crop_padding, self.hflip = shuffle, crop_padding, hflip
        self.drop_last, self.seed, self.channels_last = drop_last, seed, channels_last
        self.device = torch.device(device) if device is not None else None
        self.single_thread = single_thread
        self._init_epochs()
        normalize_to_float(self._planar[:1], self.mean, self.std)  # fail now, not mid-epoch, on a bad mean/std

    @property
    def x(self) -> torch.Tensor:
        """The images as a uint8 ``N x H x W x C`` view (no copy)."""
        return self._planar.permute(0, 2, 3, 1)

    @property
    def num_samples(self) -> int:
        """Number of images in the dataset (before ``drop_last``)."""
        return len(self.y)

    @property
    def augment(self) -> bool:
        """Whether any random augmentation is applied."""
        return self.crop_padding > 0 or self.hflip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=gen) if self.shuffle else None
        start, self._start_batch = self._start_batch, 0
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, n)
            # Drawn for the whole global batch, even when skipped or sharded: the generator must advance exactly
            # as in an uninterrupted single-process epoch.
            params = draw_crop_flip(hi - lo, self.crop_padding, self.hflip, gen) if self.augment else None
            if b < start:
                continue
            if self.world_size > 1:
                part = torch.tensor_split(torch.arange(hi - lo), self.world_size)[self.rank]
                if len(part) == 0:
                    continue
                a, z = int(part[0]), int(part[-1]) + 1
                lo, hi = lo + a, lo + z
                params = None if params is None else tuple(None if p is None else p[a:z] for p in params)
            with _intra_op_threads(1 if self.single_thread else None):
                batch = self._make_batch(lo, hi, order, params)
            yield batch
        self.epoch += 1

    def _make_batch(self, lo: int, hi: int, order: torch.Tensor | None,
                    params: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        if order is None:
            xb, yb = self._planar[lo:hi], self.y[lo:hi]
        else:
            idx = order[lo:hi]
            # index_select on 2-D rows is much faster than fancy indexing on the 4-D tensor
            xb = self._planar.view(len(self.y), -1).index_select(0, idx).view(-1, *self._planar.shape[1:])
            yb = self.y.index_select(0, idx)
        if self.device is not None:
            xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
        if params is not None and (self.crop_padding > 0 or params[2] is not None):
            xb = crop_flip(xb, self.crop_padding, *params)
        return normalize_to_float(xb, self.mean, self.std, self.channels_last), yb

    def __repr__(self) -> str:
        return (f"BatchLoader(n={len(self.y)}, batch_size={self.batch_size}, batches={len(self)}, "
                f"shuffle={self.shuffle}, crop_padding={self.crop_padding}, hflip={self.hflip}, seed={self.seed}, "
                f"epoch={self.epoch}" + (f", rank={self.rank}/{self.world_size}" if self.world_size > 1 else "") + ")")
