"""Dataset registry and on-disk readers returning uint8 NHWC tensors.

Every in-memory dataset is read into two tensors: ``x`` (uint8, ``N x H x W x C``) and ``y`` (int64, ``N``). Three
families of on-disk layouts are accepted, so the official downloads work unchanged:

* IDX files (MNIST, Fashion-MNIST): ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
  ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``;
* the official CIFAR python pickles: ``cifar-10-batches-py/data_batch_1..5, test_batch`` and
  ``cifar-100-python/train, test`` (fine labels);
* npz files with keys ``x`` (uint8 NHWC) and ``y``: ``train.npz``/``test.npz``, or shards
  ``train_0.npz, train_1.npz, ...`` (concatenated in order), or a single ``<name>.npz`` bundle with keys
  ``x_train, y_train, x_test, y_test`` (the Keras ``mnist.npz`` layout, and the built-in subset).

Example:
    >>> from sparsetrain.data import dataset_info, load_arrays
    >>> x, y = load_arrays("fashion_mnist_small", "test")
    >>> x.shape, x.dtype, y.dtype
    (torch.Size([2000, 28, 28, 1]), torch.uint8, torch.int64)
    >>> dataset_info("cifar10").mean
    (0.4914, 0.4822, 0.4465)
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

__all__ = [
    "DATA_ENV_VAR",
    "BUILTIN_DATA_DIR",
    "DatasetInfo",
    "dataset_info",
    "list_datasets",
    "load_arrays",
    "normalize_split",
    "read_idx",
    "read_cifar_pickle",
    "candidate_dirs",
]

logger = logging.getLogger(__name__)

DATA_ENV_VAR = "SPARSETRAIN_DATA"
BUILTIN_DATA_DIR = Path(__file__).resolve().parents[1] / "_data"

_SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test", "valid": "test", "validation": "test"}

_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot")
_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# CIFAR-100 fine label names, in label order (alphabetical, as in the official ``meta`` file).
_CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset.

    Attributes:
        name: Registry name.
        num_classes: Number of labels (``y`` lies in ``[0, num_classes)``).
        channels: Image channels (1 for MNIST-type, 3 for colour).
        image_size: Height = width of the images fed to the model.
        mean: Per-channel mean of the training pixels, in ``[0, 1]`` units.
        std: Per-channel standard deviation of the training pixels, in ``[0, 1]`` units.
        description: One line for ``sparsetrain list``.
        crop_padding: Default zero padding of the training random crop (0 disables cropping).
        hflip: Whether training augmentation flips horizontally by default (never for digits).
        class_names: Label names in label order (empty when unknown, e.g. folder datasets before scanning).
        in_memory: True when :func:`load_arrays` can read the whole dataset into uint8 tensors.
    """

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str
    crop_padding: int = 0
    hflip: bool = False
    class_names: tuple[str, ...] = field(default=(), repr=False)
    in_memory: bool = True

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"{self.name}: mean/std need {self.channels} entries, got {self.mean} / {self.std}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")


# --------------------------------------------------------------------------------------------------------------------
# Layouts: how one split of a dataset may be stored in one directory
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """One accepted on-disk layout. ``files(split)`` lists the exact names; ``read(dir, split)`` loads them."""

    description: str
    files: Callable[[str], list[str]]
    present: Callable[[Path, str], bool]
    read: Callable[[Path, str], tuple[np.ndarray, np.ndarray]]


def _gz_or_raw(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
               0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), raw or gzip-compressed.

    The header is two zero bytes, a dtype code (0x08 = uint8), the number of dimensions and one big-endian uint32
    per dimension; the data follow in C order.

    Args:
        path: File path; a ``.gz`` suffix means gzip.

    Returns:
        The array with its stored shape and dtype (native byte order).

    Raises:
        ValueError: Bad magic number or a size that does not match the header.
    """
    path = Path(path)
    with _open_maybe_gz(path) as f:
        raw = f.read()
    fix = "the file is truncated or corrupt; delete it and copy or download it again"
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex()!r}); {fix}")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: the IDX header needs {header} bytes, the file has {len(raw)}; {fix}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but {len(raw) - header} bytes "
                         f"follow; {fix}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _idx_names(split: str) -> list[str]:
    p = _IDX_PREFIX[split]
    return [f"{p}-images-idx3-ubyte", f"{p}-labels-idx1-ubyte"]


def _idx_layout() -> _Layout:
    def present(d: Path, split: str) -> bool:
        return all(_gz_or_raw(d, n) is not None for n in _idx_names(split))

    def read(d: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
        img_path, lbl_path = (_gz_or_raw(d, n) for n in _idx_names(split))
        x, y = read_idx(img_path), read_idx(lbl_path)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{img_path}, {lbl_path}: expected images N x H x W and N labels, got {x.shape}, "
                             f"{y.shape}")
        return x[..., None], y

    return _Layout(
        description="IDX files (raw or .gz)",
        files=lambda split: [f"{n}[.gz]" for n in _idx_names(split)],
        present=present,
        read=read,
    )


# The official CIFAR pickles hold only numpy arrays, lists, bytes and str. A restricted unpickler refuses anything
# else, so pointing data_dir at a hostile file cannot execute code.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D102 - pickle API
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")
        return super().find_class(module, name)


def read_cifar_pickle(path: str | os.PathLike, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Read one official CIFAR python batch (``data_batch_1``, ``test_batch``, ``cifar-100-python/train``...).

    Each batch is a pickled dict with ``data`` (``N x 3072`` uint8, rows are the R, G and B planes of a 32x32
    image) and ``labels`` (CIFAR-10) or ``fine_labels`` / ``coarse_labels`` (CIFAR-100). Keys may be bytes (the
    official Python 2 pickles) or str.

    Args:
        path: Batch file.
        label_key: ``"labels"``, ``"fine_labels"`` or ``"coarse_labels"``.

    Returns:
        ``(x, y)``: uint8 ``N x 32 x 32 x 3`` and int64 ``N``.
    """
    path = Path(path)
    with open(path, "rb") as f:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
    batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: CIFAR batch needs keys 'data' and {label_key!r}, found {sorted(batch)}")
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' should be N x 3072, got {data.shape}")
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), np.asarray(batch[label_key], dtype=np.int64)


def _cifar10_pickle_layout() -> _Layout:
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

    def read(d: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
        parts = [read_cifar_pickle(d / n) for n in names[split]]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return _Layout(
        description="CIFAR-10 python pickle batches (folder cifar-10-batches-py)",
        files=lambda split: list(names[split]),
        present=lambda d, split: all((d / n).is_file() for n in names[split]),
        read=read,
    )


def _cifar100_pickle_layout() -> _Layout:
    return _Layout(
        description="CIFAR-100 python pickles, fine labels (folder cifar-100-python)",
        files=lambda split: [split],
        present=lambda d, split: (d / split).is_file(),
        read=lambda d, split: read_cifar_pickle(d / split, label_key="fine_labels"),
    )


def _npz_xy(path: Path, xkey: str = "x", ykey: str = "y") -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        if xkey not in z or ykey not in z:
            raise ValueError(f"{path}: expected keys {xkey!r} and {ykey!r}, found {sorted(z.files)}")
        return z[xkey], z[ykey]


def _shards(d: Path, split: str) -> list[Path]:
    out = []
    while (d / f"{split}_{len(out)}.npz").is_file():
        out.append(d / f"{split}_{len(out)}.npz")
    return out


def _npz_layout() -> _Layout:
    return _Layout(
        description="npz with keys x (uint8 N x H x W x C) and y",
        files=lambda split: [f"{split}.npz"],
        present=lambda d, split: (d / f"{split}.npz").is_file(),
        read=lambda d, split: _npz_xy(d / f"{split}.npz"),
    )


def _npz_shard_layout() -> _Layout:
    def read(d: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
        parts = [_npz_xy(p) for p in _shards(d, split)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return _Layout(
        description="npz shards with keys x and y, concatenated in order",
        files=lambda split: [f"{split}_0.npz", f"{split}_1.npz", "..."],
        present=lambda d, split: bool(_shards(d, split)),
        read=read,
    )


def _npz_bundle_layout(stem: str) -> _Layout:
    def present(d: Path, split: str) -> bool:
        return (d / f"{stem}.npz").is_file()

    return _Layout(
        description="one npz with keys x_train, y_train, x_test, y_test",
        files=lambda split: [f"{stem}.npz"],
        present=present,
        read=lambda d, split: _npz_xy(d / f"{stem}.npz", f"x_{split}", f"y_{split}"),
    )


# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    info: DatasetInfo
    subdirs: tuple[str, ...]  # searched inside each data root, in order ("." = the root itself)
    layouts: tuple[_Layout, ...]
    builtin: bool = False


_MNIST_MEAN, _MNIST_STD = (0.1307,), (0.3081,)
_FMNIST_MEAN, _FMNIST_STD = (0.2860,), (0.3530,)

_REGISTRY: dict[str, _Entry] = {
    "mnist": _Entry(
        DatasetInfo("mnist", 10, 1, 28, _MNIST_MEAN, _MNIST_STD, "MNIST handwritten digits, 60k/10k, 1x28x28",
                    crop_padding=2, hflip=False, class_names=tuple(str(i) for i in range(10))),
        subdirs=("mnist", "MNIST", "MNIST/raw", "."),
        layouts=(_idx_layout(), _npz_layout(), _npz_shard_layout(), _npz_bundle_layout("mnist")),
    ),
    "fashion_mnist": _Entry(
        DatasetInfo("fashion_mnist", 10, 1, 28, _FMNIST_MEAN, _FMNIST_STD,
                    "Fashion-MNIST (Zalando), 60k/10k, 1x28x28", crop_padding=2, hflip=False,
                    class_names=_FASHION_CLASSES),
        subdirs=("fashion_mnist", "fashion-mnist", "FashionMNIST", "FashionMNIST/raw", "."),
        layouts=(_idx_layout(), _npz_layout(), _npz_shard_layout(), _npz_bundle_layout("fashion_mnist")),
    ),
    "fashion_mnist_small": _Entry(
        # Mean/std of the full Fashion-MNIST training set; the balanced subset's statistics differ by < 0.002.
        DatasetInfo("fashion_mnist_small", 10, 1, 28, _FMNIST_MEAN, _FMNIST_STD,
                    "built-in balanced Fashion-MNIST subset, 10k/2k (1000/200 per class), 1x28x28",
                    crop_padding=2, hflip=False, class_names=_FASHION_CLASSES),
        subdirs=("fashion_mnist_small", "."),
        # Only the bundle: a bare train.npz in the root belongs to some other dataset.
        layouts=(_npz_bundle_layout("fashion_mnist_small"),),
        builtin=True,
    ),
    "cifar10": _Entry(
        DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                    "CIFAR-10, 50k/10k, 3x32x32", crop_padding=4, hflip=True, class_names=_CIFAR10_CLASSES),
        subdirs=("cifar10", "cifar-10", "CIFAR10", "cifar-10-batches-py", "cifar10/cifar-10-batches-py", "."),
        layouts=(_cifar10_pickle_layout(), _npz_layout(), _npz_shard_layout(), _npz_bundle_layout("cifar10")),
    ),
    "cifar100": _Entry(
        DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                    "CIFAR-100 (fine labels), 50k/10k, 3x32x32", crop_padding=4, hflip=True,
                    class_names=_CIFAR100_CLASSES),
        subdirs=("cifar100", "cifar-100", "CIFAR100", "cifar-100-python", "cifar100/cifar-100-python", "."),
        layouts=(_cifar100_pickle_layout(), _npz_layout(), _npz_shard_layout(), _npz_bundle_layout("cifar100")),
    ),
    "imagenet_folder": _Entry(
        DatasetInfo("imagenet_folder", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                    "ImageFolder-style train/ and val/ class folders (ImageNet), 3x224x224; needs torchvision",
                    crop_padding=0, hflip=True, in_memory=False),
        subdirs=("imagenet", "ImageNet", "imagenet_folder", "."),
        layouts=(),  # read by sparsetrain.data.folder, not into memory
    ),
}


def list_datasets() -> list[str]:
    """Names of all registered datasets, sorted.

    Example:
        >>> "cifar10" in list_datasets()
        True
    """
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(list_datasets())}") from None


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a registered dataset.

    Raises:
        ValueError: Unknown name (the message lists the valid ones).
    """
    return _entry(name).info


def normalize_split(split: str) -> str:
    """Map ``train``/``test`` (and the aliases ``val``, ``valid``, ``validation`` -> ``test``) to a canonical split."""
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; valid choices: {', '.join(_SPLIT_ALIASES)}") from None


def _data_roots(data_dir: str | os.PathLike | None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    return []


def candidate_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for ``name``, in order.

    The roots are ``data_dir`` if given, else the ``SPARSETRAIN_DATA`` environment variable (several roots may be
    joined with ``os.pathsep``); inside each root the dataset's usual sub-folder names are tried, then the root
    itself. The built-in subset also falls back to the package's ``_data`` folder.
    """
    entry = _entry(name)
    dirs: list[Path] = []
    for root in _data_roots(data_dir):
        for sub in entry.subdirs:
            d = root if sub == "." else root / sub
            if d not in dirs:
                dirs.append(d)
    if entry.builtin and BUILTIN_DATA_DIR not in dirs:
        dirs.append(BUILTIN_DATA_DIR)
    return dirs


def _missing_message(name: str, split: str, dirs: list[Path], entry: _Entry) -> str:
    lines = [f"dataset {name!r} (split {split!r}) not found."]
    if dirs:
        lines.append("Directories searched:")
        lines += [f"  {d}{'' if d.is_dir() else '  (does not exist)'}" for d in dirs]
    else:
        lines.append(f"No data directory given: pass data_dir (CLI --data-dir) or set {DATA_ENV_VAR}.")
    lines.append("Expected one of these layouts in one of those directories:")
    for layout in entry.layouts:
        lines.append(f"  - {layout.description}: {', '.join(layout.files(split))}")
    lines.append(f"Usual sub-folders of the data directory for {name!r}: "
                 + ", ".join(s for s in entry.subdirs if s != "."))
    return "\n".join(lines)


def _validate(name: str, info: DatasetInfo, x: np.ndarray, y: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim == 3 and info.channels == 1:
        x = x[..., None]
    hwc, chw = (info.image_size, info.image_size, info.channels), (info.channels, info.image_size, info.image_size)
    if x.ndim == 4 and tuple(x.shape[1:]) != hwc and tuple(x.shape[1:]) == chw:
        x = x.transpose(0, 2, 3, 1)  # accept NCHW npz files
    if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != hwc:
        raise ValueError(f"{source}: {name} images must be uint8 N x {hwc[0]} x {hwc[1]} x {hwc[2]}, "
                         f"got {x.dtype} {tuple(x.shape)}")
    y = np.asarray(y).reshape(-1)
    if len(y) != len(x):
        raise ValueError(f"{source}: {len(x)} images but {len(y)} labels")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{source}: labels must be integers, got {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= info.num_classes):
        raise ValueError(f"{source}: labels must lie in [0, {info.num_classes}), got [{y.min()}, {y.max()}]")
    return np.ascontiguousarray(x), y.astype(np.int64)


def load_arrays(name: str, split: str, data_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split of an in-memory dataset.

    Args:
        name: Registered dataset name (see :func:`list_datasets`).
        split: ``"train"`` or ``"test"`` (``"val"`` is an alias of ``"test"``).
        data_dir: Root data directory; default ``$SPARSETRAIN_DATA``. See :func:`candidate_dirs`.

    Returns:
        ``(x, y)``: uint8 tensor ``N x H x W x C`` and int64 tensor ``N``, in file order.

    Raises:
        FileNotFoundError: No accepted layout found; the message names the directories searched and the exact
            file names each layout expects.
        ValueError: Unknown name/split, a folder dataset, or a file with the wrong shape, dtype or labels.

    Example:
        >>> x, y = load_arrays("fashion_mnist_small", "train")
        >>> len(x), int(y.max())
        (10000, 9)
    """
    entry = _entry(name)
    split = normalize_split(split)
    if not entry.info.in_memory:
        raise ValueError(f"dataset {name!r} is read from image folders, not into memory; use make_loaders({name!r})")
    dirs = candidate_dirs(name, data_dir)
    for d in dirs:
        for layout in entry.layouts:
            if d.is_dir() and layout.present(d, split):
                try:
                    x, y = layout.read(d, split)
                except (OSError, EOFError, zipfile.BadZipFile, zlib.error, pickle.UnpicklingError) as e:
                    # A truncated download or a damaged copy: name the file(s) and the way out, not a traceback.
                    files = ", ".join(str(d / f) for f in layout.files(split) if f != "...")
                    raise ValueError(
                        f"dataset {name!r} ({split}): {files} is truncated or corrupt ({type(e).__name__}: {e}); "
                        f"delete it and copy or download it again (expected: {layout.description})") from None
                x, y = _validate(name, entry.info, x, y, f"{d} ({layout.description})")
                logger.info("loaded %s/%s from %s (%s): %d images", name, split, d, layout.description, len(x))
                return torch.from_numpy(x), torch.from_numpy(y)
    raise FileNotFoundError(_missing_message(name, split, dirs, entry))
