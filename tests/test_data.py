"""Datasets and loaders: real-data checks against SOURCE.md figures, file formats on synthetic files, the missing
-data message, whole-batch augmentation against per-image references, determinism, and the built-in subset."""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import re
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain.data import (
    BUILTIN_DATA_DIR,
    BatchLoader,
    crop_flip,
    dataset_info,
    epoch_seed,
    list_datasets,
    load_arrays,
    make_loader,
    make_loaders,
    normalize_to_float,
    random_crop_flip,
    read_cifar_pickle,
    read_idx,
    subset_indices,
)
from sparsetrain.data import folder as folder_mod
from sparsetrain.data.subset import (
    BUILTIN_SUBSET_PATH,
    first_per_class,
    sha256_file,
    write_npz_deterministic,
)

# Figures from the SOURCE.md files next to the shared data.
REAL = {
    "mnist": dict(
        n=(60000, 10000),
        first_test=[7, 2, 1, 0, 4, 1, 4, 9, 5, 9],
        train_counts=[5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
        test_counts=[980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
        mean=(0.1307,),
        std=(0.3081,),
    ),
    "fashion_mnist": dict(
        n=(60000, 10000),
        first_test=[9, 2, 1, 1, 6, 1, 4, 6, 5, 7],
        train_counts=[6000] * 10,
        test_counts=[1000] * 10,
        mean=(0.2860,),
        std=(0.3530,),
    ),
    "cifar10": dict(
        n=(50000, 10000),
        first_test=[3, 8, 8, 0, 6, 6, 1, 6, 3, 1],
        first_train=[6, 9, 9, 4, 1, 1, 2, 7, 8, 3],
        train_counts=[5000] * 10,
        test_counts=[1000] * 10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
}


def _channel_stats(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std in [0, 1] units of a uint8 NHWC tensor, in int64 chunks (no 600 MB float copy)."""
    s = np.zeros(x.shape[-1], dtype=np.float64)
    s2 = np.zeros_like(s)
    for chunk in torch.split(x, 5000):
        c = chunk.reshape(-1, x.shape[-1]).to(torch.int64)
        s += c.sum(0).numpy()
        s2 += (c * c).sum(0).numpy()
    n = x.numel() / x.shape[-1]
    mean = s / n
    return mean / 255, np.sqrt(s2 / n - mean**2) / 255


# ------------------------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------------------------


def test_registry_and_info():
    assert list_datasets() == [
        "cifar10",
        "cifar100",
        "fashion_mnist",
        "fashion_mnist_small",
        "imagenet_folder",
        "mnist",
    ]
    info = dataset_info("cifar100")
    assert (info.num_classes, info.channels, info.image_size) == (100, 3, 32)
    assert list(info.class_names) == sorted(info.class_names) and len(set(info.class_names)) == 100
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.num_classes = 3
    # digits and clothes are never flipped; CIFAR is
    assert (dataset_info("mnist").hflip, dataset_info("mnist").crop_padding) == (False, 2)
    assert (dataset_info("fashion_mnist_small").hflip, dataset_info("fashion_mnist_small").crop_padding) == (False, 2)
    assert (dataset_info("cifar10").hflip, dataset_info("cifar10").crop_padding) == (True, 4)
    with pytest.raises(ValueError, match=r"unknown dataset 'svhn'.*cifar10.*mnist"):
        dataset_info("svhn")
    with pytest.raises(ValueError, match=r"unknown split 'dev'.*train.*test"):
        load_arrays("mnist", "dev")
    with pytest.raises(ValueError, match="make_loaders"):
        load_arrays("imagenet_folder", "train")


# ------------------------------------------------------------------------------------------------------------------
# Real data (the conftest fixtures skip when ../shared/data is absent, and fail when CI is set)
# ------------------------------------------------------------------------------------------------------------------


# cifar10's 50,000 colour images take ~5 s to read and check; the MNISTs well under 2 s.
_FIXTURE_USER = """
def test_root(data_root):
    assert data_root.is_dir()

def test_mnist(require_dataset):
    assert (require_dataset("mnist") / "test.npz").is_file()
"""


@pytest.mark.parametrize("ci", ["", "true"])
def test_data_fixtures_skip_or_fail_in_ci(pytester, monkeypatch, tmp_path, ci):
    """The conftest fixtures skip when the data is missing, but fail when CI is set: real-data tests cannot
    vanish from a CI run."""
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_uses_data=_FIXTURE_USER)
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("SPARSETRAIN_DATA", str(tmp_path / "absent"))
    result = pytester.runpytest("-rsf")
    if ci:
        result.assert_outcomes(errors=2)  # pytest.fail in a fixture: an error, the run fails
        result.stdout.fnmatch_lines([f"*shared data folder {tmp_path / 'absent'} not found*CI is set*"])
    else:
        result.assert_outcomes(skipped=2)
        result.stdout.fnmatch_lines([f"*shared data folder {tmp_path / 'absent'} not found*"])
    # The folder exists but lacks the dataset: the message names the dataset's folder.
    (tmp_path / "present" / "mnist").mkdir(parents=True)
    monkeypatch.setenv("SPARSETRAIN_DATA", f"{tmp_path / 'absent'}{os.pathsep}{tmp_path / 'present'}")
    result = pytester.runpytest("-rsf")
    if ci:
        result.assert_outcomes(passed=1, failed=1)  # called in the test body: a failure
    else:
        result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines([f"*shared dataset 'mnist' not found: no .npz files in {tmp_path / 'present' / 'mnist'}*"])


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "cifar10" else n for n in sorted(REAL)])
def test_real_dataset(name, require_dataset, data_root):
    require_dataset(name)
    ref, info = REAL[name], dataset_info(name)
    for split, n, counts in (("train", ref["n"][0], ref["train_counts"]), ("test", ref["n"][1], ref["test_counts"])):
        x, y = load_arrays(name, split, data_root)
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert tuple(x.shape) == (n, info.image_size, info.image_size, info.channels)
        assert torch.bincount(y, minlength=10).tolist() == counts
        if split == "test":
            assert y[:10].tolist() == ref["first_test"]
        elif "first_train" in ref:
            assert y[:10].tolist() == ref["first_train"]
        if split == "train":
            mean, std = _channel_stats(x)
            np.testing.assert_allclose(mean, ref["mean"], atol=6e-5)
            np.testing.assert_allclose(std, ref["std"], atol=6e-5)
            np.testing.assert_allclose(mean, info.mean, atol=6e-5)  # the registry's constants are right
            np.testing.assert_allclose(std, info.std, atol=6e-5)


def test_env_var_and_cifar_loader(monkeypatch, require_dataset, data_root):
    require_dataset("cifar10")
    monkeypatch.setenv("SPARSETRAIN_DATA", str(data_root))
    _, y = load_arrays("cifar10", "val")  # val = test; found through the environment variable
    assert y[:10].tolist() == REAL["cifar10"]["first_test"]
    train, test, info = make_loaders("cifar10", batch_size=32, train_subset=64, test_subset=50)
    assert (len(train), len(test)) == (2, 2)
    xb, yb = next(iter(train))
    assert xb.shape == (32, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    xt, yt = next(iter(test))
    assert yt[:10].tolist() == REAL["cifar10"]["first_test"]


# ------------------------------------------------------------------------------------------------------------------
# File formats (synthetic files)
# ------------------------------------------------------------------------------------------------------------------


def _write_idx(path: Path, arr: np.ndarray) -> None:
    raw = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_format(tmp_path, gz):
    rng = np.random.default_rng(0)
    d = tmp_path / "fashion-mnist"
    d.mkdir()
    ext = ".gz" if gz else ""
    data = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        _write_idx(d / f"{prefix}-images-idx3-ubyte{ext}", x)
        _write_idx(d / f"{prefix}-labels-idx1-ubyte{ext}", y)
        data[prefix] = (x, y)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = load_arrays("fashion_mnist", split, tmp_path)  # found in the "fashion-mnist" sub-folder
        assert tuple(x.shape) == (len(data[prefix][0]), 28, 28, 1) and x.dtype == torch.uint8
        np.testing.assert_array_equal(x[..., 0].numpy(), data[prefix][0])
        np.testing.assert_array_equal(y.numpy(), data[prefix][1])
        assert y.dtype == torch.int64


def test_idx_errors(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short-idx"
    short.write_bytes(struct.pack(">HBBI", 0, 8, 1, 10) + b"\x00" * 9)
    with pytest.raises(ValueError, match=r"shape \(10,\).*9 bytes follow"):
        read_idx(short)


def _cifar_batch(rng: np.random.Generator, n: int, label_keys: dict[str, int]) -> dict:
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"batch_label": b"synthetic"}
    for key, classes in label_keys.items():
        batch[key.encode()] = rng.integers(0, classes, n).tolist()
    return batch


def test_cifar10_pickle_batches(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = _cifar_batch(rng, 4, {"labels": 10})
        with open(d / name, "wb") as f:
            pickle.dump(batches[name], f, protocol=2)  # what the official Python 2 files use
    x, y = load_arrays("cifar10", "train", tmp_path)
    assert tuple(x.shape) == (20, 32, 32, 3)
    assert y.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    # data rows are the R, G, B planes of the image in row-major order
    data = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    for i, r, c, ch in [(0, 0, 0, 0), (7, 31, 0, 2), (19, 5, 17, 1), (12, 31, 31, 2)]:
        assert x[i, r, c, ch].item() == data[i, ch * 1024 + r * 32 + c]
    xt, yt = load_arrays("cifar10", "test", d)  # data_dir may also be the batches folder itself
    np.testing.assert_array_equal(xt.numpy().transpose(0, 3, 1, 2).reshape(4, -1), batches["test_batch"][b"data"])


def test_cifar100_pickle_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(2)
    d = tmp_path / "cifar100" / "cifar-100-python"
    d.mkdir(parents=True)
    for split in ("train", "test"):
        batch = _cifar_batch(rng, 6, {"fine_labels": 100, "coarse_labels": 20})
        with open(d / split, "wb") as f:
            pickle.dump({k.decode(): v for k, v in batch.items()}, f)  # str keys, current protocol
        x, y = load_arrays("cifar100", split, tmp_path)
        assert tuple(x.shape) == (6, 32, 32, 3)
        assert y.tolist() == batch[b"fine_labels"]


class _Evil:
    def __reduce__(self):
        return (os.getpid, ())


def test_cifar_pickle_refuses_code(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [_Evil()]}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_cifar_pickle(path)


def test_npz_layouts_and_validation(tmp_path):
    rng = np.random.default_rng(3)
    d = tmp_path / "cifar10"
    d.mkdir()
    x0, x1 = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (3, 4))
    y0, y1 = rng.integers(0, 10, 3), rng.integers(0, 10, 4)
    np.savez(d / "train_0.npz", x=x0, y=y0)
    np.savez(d / "train_1.npz", x=x1, y=y1)
    np.savez(d / "test.npz", x=x0.transpose(0, 3, 1, 2), y=y0)  # NCHW is transposed on load
    x, y = load_arrays("cifar10", "train", tmp_path)
    np.testing.assert_array_equal(x.numpy(), np.concatenate([x0, x1]))
    np.testing.assert_array_equal(y.numpy(), np.concatenate([y0, y1]))
    xt, _ = load_arrays("cifar10", "test", tmp_path)
    np.testing.assert_array_equal(xt.numpy(), x0)
    # Keras-style bundle, images without a channel axis
    m = tmp_path / "mnist"
    m.mkdir()
    np.savez(
        m / "mnist.npz",
        x_train=np.zeros((2, 28, 28), np.uint8),
        y_train=np.array([1, 9]),
        x_test=np.full((1, 28, 28), 7, np.uint8),
        y_test=np.array([3]),
    )
    xt, yt = load_arrays("mnist", "test", tmp_path)
    assert tuple(xt.shape) == (1, 28, 28, 1) and xt.max().item() == 7 and yt.tolist() == [3]
    # wrong image size and out-of-range labels are refused with the file named
    np.savez(d / "test.npz", x=np.zeros((2, 28, 28, 3), np.uint8), y=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"cifar10 images must be uint8 N x 32 x 32 x 3, got uint8 \(2, 28, 28, 3\)"):
        load_arrays("cifar10", "test", tmp_path)
    np.savez(d / "test.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.array([0, 10]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\), got \[0, 10\]"):
        load_arrays("cifar10", "test", tmp_path)


def test_missing_dataset_message(tmp_path, monkeypatch):
    (tmp_path / "cifar10").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load_arrays("cifar10", "train", tmp_path)
    msg = str(err.value)
    assert "dataset 'cifar10' (split 'train') not found" in msg
    assert str(tmp_path / "cifar10") in msg and f"{tmp_path / 'cifar-10-batches-py'}  (does not exist)" in msg
    assert re.search(rf"^  {re.escape(str(tmp_path))}$", msg, re.M)  # the root itself was searched too
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["train.npz", "train_0.npz", "train_1.npz", "cifar10.npz"]:
        assert name in msg
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte\[\.gz\], t10k-labels-idx1-ubyte\[\.gz\]"):
        load_arrays("mnist", "test", tmp_path)
    monkeypatch.delenv("SPARSETRAIN_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="pass data_dir .* or set SPARSETRAIN_DATA"):
        load_arrays("mnist", "train")



@pytest.mark.parametrize("damage", ["truncated npz", "bad crc npz", "truncated gz", "bad pickle"])
def test_damaged_dataset_file_names_the_file_and_the_way_out(tmp_path, damage):
    d = tmp_path / ("cifar-10-batches-py" if damage == "bad pickle" else "mnist")
    d.mkdir()
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((64, 28, 28), np.uint8), y=np.zeros(64, np.int64))
    raw = bytearray(buf.getvalue())
    if damage == "truncated npz":
        (d / "train.npz").write_bytes(bytes(raw[: len(raw) // 2]))
        name, bad = "mnist", d / "train.npz"
    elif damage == "bad crc npz":
        raw[200:260] = bytes(b ^ 0xFF for b in raw[200:260])  # inside the first member's data
        (d / "train.npz").write_bytes(bytes(raw))
        name, bad = "mnist", d / "train.npz"
    elif damage == "truncated gz":
        for n in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
            (d / f"{n}.gz").write_bytes(gzip.compress(b"\0\0\x08\x03" + bytes(100))[:30])
        name, bad = "mnist", d / "train-images-idx3-ubyte"
    else:
        for i in range(1, 6):
            (d / f"data_batch_{i}").write_bytes(b"\x80\x04not a pickle")
        name, bad = "cifar10", d / "data_batch_1"
    with pytest.raises(ValueError) as err:
        load_arrays(name, "train", tmp_path)
    msg = str(err.value)
    assert str(bad) in msg and "truncated or corrupt" in msg and "copy or download it again" in msg, msg


# ------------------------------------------------------------------------------------------------------------------
# Augmentation and normalisation
# ------------------------------------------------------------------------------------------------------------------


def _rand_nchw(n: int, c: int, h: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, h, h), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_crop_flip_matches_per_image_reference():
    x = _rand_nchw(6, 3, 8)
    p = 2
    oy, ox = torch.tensor([0, 4, 2, 1, 3, 4]), torch.tensor([4, 0, 2, 3, 1, 4])
    flip = torch.tensor([False, True, False, True, True, False])
    out = crop_flip(x, p, oy, ox, flip)
    padded = torch.zeros(6, 3, 12, 12, dtype=torch.uint8)
    padded[:, :, p:-p, p:-p] = x
    for i in range(6):
        ref = padded[i, :, oy[i] : oy[i] + 8, ox[i] : ox[i] + 8]
        assert torch.equal(out[i], ref.flip(-1) if flip[i] else ref)
    # the centre window without flip is the identity; a pure flip is an exact mirror
    centre = torch.full((6,), p)
    assert torch.equal(crop_flip(x, p, centre, centre), x)
    assert torch.equal(
        crop_flip(
            x, 0, torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.bool)
        ),
        x.flip(-1),
    )
    # a shift by one pixel moves the content and brings in zeros
    shifted = crop_flip(x, p, torch.full((6,), p + 1), centre)
    assert torch.equal(shifted[:, :, :-1], x[:, :, 1:]) and shifted[:, :, -1].eq(0).all()


@pytest.mark.parametrize("c,h,p,hflip", [(3, 32, 4, True), (1, 28, 2, False)])
def test_random_crop_is_a_window_of_the_padded_input(c, h, p, hflip):
    n = 64
    x = _rand_nchw(n, c, h, seed=5)
    out = random_crop_flip(x, p, hflip, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    offsets, flips = set(), 0
    for i in range(n):
        hits = [
            (dy, dx, f)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            for f in (False, True)
            if torch.equal(out[i], (lambda w: w.flip(-1) if f else w)(padded[i, :, dy : dy + h, dx : dx + h]))
        ]
        assert len(hits) == 1, f"image {i}: {hits}"
        offsets.add(hits[0][:2])
        flips += hits[0][2]
    assert len(offsets) > (2 * p + 1) ** 2 // 3  # offsets are spread over the range
    if hflip:
        assert 16 <= flips <= 48
    else:
        assert flips == 0  # no mirrored digits


def test_normalisation():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 2, 4, 4).contiguous()
    mean, std = (0.5, 0.25), (0.2, 0.4)
    out = normalize_to_float(x, mean, std)
    assert out.dtype == torch.float32 and out.shape == (3, 2, 4, 4) and out.is_contiguous()
    for i, v in enumerate((0, 51, 255)):
        for ch in range(2):
            torch.testing.assert_close(out[i, ch], torch.full((4, 4), (v / 255 - mean[ch]) / std[ch]))
    cl = normalize_to_float(x, mean, std, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, out)
    with pytest.raises(ValueError, match="mean/std need 2 entries for 2 channels"):
        normalize_to_float(x, (0.5,), (0.2,))


def test_builtin_batches_are_standardised():
    train, _, info = make_loaders("fashion_mnist_small", batch_size=1000, augment=False)
    xs = torch.cat([xb for xb, _ in train])
    assert xs.shape == (10000, 1, 28, 28)
    # mean/std are the full Fashion-MNIST constants; the subset's own statistics are within 0.001 of them
    assert abs(xs.mean().item()) < 0.01 and abs(xs.std().item() - 1) < 0.01
    torch.testing.assert_close(xs.min(), torch.tensor(-info.mean[0] / info.std[0]))


def _indexed_loader(n=50, batch_size=8, **kw) -> BatchLoader:
    """Images whose first pixel is their index, so the order can be read back from the batches."""
    x = torch.zeros(n, 4, 4, 1, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return BatchLoader(x, torch.arange(n) % 10, batch_size, mean=(0.0,), std=(1 / 255,), **kw)


def _epoch(loader: BatchLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_loader_order_length_and_determinism():
    loader = _indexed_loader(shuffle=True, seed=3)
    assert len(loader) == 7 and len(_indexed_loader(drop_last=True)) == 6
    loader.set_epoch(4)
    x, y = _epoch(loader)
    order = x[:, 0, 0, 0].round().long()
    assert sorted(order.tolist()) == list(range(50)) and order.tolist() != list(range(50))
    assert torch.equal(y, order % 10)  # labels travel with their images
    assert loader.epoch == 5  # a complete pass advances the epoch
    other = _indexed_loader(shuffle=True, seed=3)
    other.set_epoch(4)
    assert torch.equal(_epoch(other)[0], x)  # same (seed, epoch) -> same batches
    assert not torch.equal(_epoch(other)[0], x)  # epoch 5 differs
    seed4 = _indexed_loader(shuffle=True, seed=4)
    seed4.set_epoch(4)
    assert not torch.equal(_epoch(seed4)[0], x)
    dropped = _indexed_loader(shuffle=True, seed=3, drop_last=True)
    dropped.set_epoch(4)
    assert torch.equal(_epoch(dropped)[0], x[:48])  # drop_last only drops the tail
    plain = _indexed_loader()
    assert _epoch(plain)[0][:, 0, 0, 0].round().long().tolist() == list(range(50))


def test_resumed_run_sees_same_augmented_batches():
    x = _rand_nchw(40, 3, 32, seed=9).permute(0, 2, 3, 1).contiguous()
    y = torch.arange(40) % 10
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, crop_padding=4, hflip=True, seed=11)
    full = BatchLoader(x, y, 16, **kw)
    epochs = [_epoch(full) for _ in range(3)]  # epochs 0, 1, 2 without set_epoch
    resumed = BatchLoader(x, y, 16, **kw)
    resumed.set_epoch(2)
    rx, ry = _epoch(resumed)
    assert torch.equal(rx, epochs[2][0]) and torch.equal(ry, epochs[2][1])
    assert not torch.equal(epochs[1][0], epochs[2][0])
    assert epoch_seed(11, 1) != epoch_seed(11, 2) != epoch_seed(12, 2)
    cl = BatchLoader(x, y, 16, channels_last=True, **kw)
    cl.set_epoch(2)
    xb, _ = next(iter(cl))
    assert xb.is_contiguous(memory_format=torch.channels_last) and torch.equal(xb, rx[:16])


def test_make_loaders_defaults_and_subsets():
    train, test, info = make_loaders(
        "fashion_mnist_small",
        batch_size=64,
        eval_batch_size=500,
        seed=1,
        train_subset=100,
        test_subset=30,
        stratified=True,
    )
    assert info.name == "fashion_mnist_small"
    assert (train.shuffle, train.crop_padding, train.hflip) == (True, 2, False)
    assert (test.shuffle, test.augment, test.batch_size) == (False, False, 500)
    assert torch.bincount(train.y, minlength=10).tolist() == [10] * 10
    assert torch.bincount(test.y, minlength=10).tolist() == [3] * 10
    assert (len(train), len(test)) == (2, 1)
    y = torch.tensor([0, 0, 1, 0, 2, 1, 2, 2, 0])
    assert subset_indices(y, 4).tolist() == [0, 1, 2, 3]
    assert subset_indices(y, 4, 3, stratified=True).tolist() == [0, 1, 2, 4]  # 2 + 1 + 1, earliest of each class
    assert subset_indices(y, 100).tolist() == list(range(9))
    plain, _, _ = make_loaders("fashion_mnist_small", augment=False, train_subset=10)
    assert not plain.augment and plain.shuffle
    # a single split, read on its own, equals the corresponding loader of make_loaders
    alone = make_loader("fashion_mnist_small", "val", batch_size=500, subset=30, stratified=True)
    assert not alone.augment and not alone.shuffle
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(alone, test))
    train.set_epoch(7)
    alone_train = make_loader("fashion_mnist_small", "train", batch_size=64, seed=1, subset=100, stratified=True)
    alone_train.set_epoch(7)
    assert torch.equal(_epoch(alone_train)[0], _epoch(train)[0])


# ------------------------------------------------------------------------------------------------------------------
# Built-in subset
# ------------------------------------------------------------------------------------------------------------------


def test_builtin_subset_counts_and_provenance(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSETRAIN_DATA", raising=False)
    xs = {}
    for split, n in (("train", 1000), ("test", 200)):
        x, y = load_arrays("fashion_mnist_small", split)  # no data dir needed
        assert tuple(x.shape) == (10 * n, 28, 28, 1) and x.dtype == torch.uint8
        assert torch.bincount(y, minlength=10).tolist() == [n] * 10
        xs[split] = (x, y)
    # found even when a data dir without it is given
    assert torch.equal(load_arrays("fashion_mnist_small", "test", tmp_path)[1], xs["test"][1])
    with np.load(BUILTIN_SUBSET_PATH) as z:
        arrays = {k: z[k] for k in z.files}
    assert list(arrays) == ["x_train", "y_train", "index_train", "x_test", "y_test", "index_test"]
    # rebuilding from the stored arrays reproduces the shipped bytes, and the licence file records that hash
    digest = write_npz_deterministic(tmp_path / "again.npz", arrays)
    assert digest == sha256_file(BUILTIN_SUBSET_PATH)
    assert digest in (BUILTIN_DATA_DIR / "FASHION_MNIST_LICENSE.md").read_text()
    assert "Copyright (c) 2017 Zalando SE" in (BUILTIN_DATA_DIR / "FASHION_MNIST_LICENSE.md").read_text()


def test_builtin_subset_matches_full_fashion_mnist(require_dataset, data_root):
    require_dataset("fashion_mnist")
    with np.load(BUILTIN_SUBSET_PATH) as z:
        arrays = {k: z[k] for k in z.files}
    for split, n in (("train", 1000), ("test", 200)):
        full_x, full_y = load_arrays("fashion_mnist", split, data_root)
        idx = first_per_class(full_y.numpy(), n, 10)  # the first n of every class, in official order
        np.testing.assert_array_equal(arrays[f"index_{split}"], idx)
        np.testing.assert_array_equal(arrays[f"x_{split}"], full_x[idx].numpy())
        np.testing.assert_array_equal(arrays[f"y_{split}"], full_y[idx].numpy())


# ------------------------------------------------------------------------------------------------------------------
# imagenet_folder (torchvision is optional)
# ------------------------------------------------------------------------------------------------------------------


def test_imagenet_folder_needs_torchvision(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes the import fail even where it is installed
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'sparsetrain[torchvision]'")):
        make_loaders("imagenet_folder", data_dir=tmp_path)


def test_folder_transforms():
    img = torch.arange(3 * 40 * 60, dtype=torch.int64).remainder(256).to(torch.uint8).view(3, 40, 60)
    assert folder_mod.resize_shorter(img, 20).shape == (3, 20, 30)
    assert folder_mod.resize_shorter(img.transpose(1, 2), 20).shape == (3, 30, 20)
    assert torch.equal(folder_mod.center_crop(img, 20), img[:, 10:30, 20:40])
    flat = torch.full((3, 40, 60), 77, dtype=torch.uint8)
    assert folder_mod.resize_shorter(flat, 256).eq(77).all()  # resizing a constant image keeps it constant
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = folder_mod.random_resized_crop_params(40, 60, gen)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60
        assert 0.08 * 2400 * 0.9 <= h * w and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    a = folder_mod.random_resized_crop_params(40, 60, torch.Generator().manual_seed(1))
    assert a == folder_mod.random_resized_crop_params(40, 60, torch.Generator().manual_seed(1))
    # no try fits a 1-pixel-high strip: fall back to the largest centred crop with a clamped aspect ratio
    assert folder_mod.random_resized_crop_params(1, 100, gen) == (0, 49, 1, 1)
    assert folder_mod.resized_crop(img, 5, 7, 20, 30, 16).shape == (3, 16, 16)


def test_imagenet_folder_pipeline_with_stub_decoder(tmp_path, monkeypatch):
    """The whole folder pipeline, with torchvision.io replaced by a PIL-based stub (torchvision is not installed)."""
    pil = pytest.importorskip("PIL.Image")
    colours = {"cat": (200, 10, 10), "dog": (10, 200, 10)}
    for split, count in (("train", 3), ("val", 2)):
        for cls, rgb in colours.items():
            (tmp_path / "imagenet" / split / cls).mkdir(parents=True)
            for i in range(count):
                pil.new("RGB", (300 + 10 * i, 260), rgb).save(tmp_path / "imagenet" / split / cls / f"{i}.png")
    (tmp_path / "imagenet" / "train" / "cat" / "notes.txt").write_text("not an image")

    tvio = types.ModuleType("torchvision.io")
    tvio.ImageReadMode = types.SimpleNamespace(RGB="RGB")
    tvio.read_file = lambda path: torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
    tvio.decode_image = lambda data, mode: (
        torch.from_numpy(np.array(pil.open(io.BytesIO(data.numpy().tobytes())).convert(mode)))
        .permute(2, 0, 1)
        .contiguous()
    )
    tv = types.ModuleType("torchvision")
    tv.io = tvio
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.io", tvio)

    train, val, info = make_loaders(
        "imagenet_folder", data_dir=tmp_path, batch_size=4, eval_batch_size=4, num_workers=0
    )
    assert (info.num_classes, info.class_names, info.image_size) == (2, ("cat", "dog"), 224)
    assert (train.num_samples, val.num_samples, len(train), len(val)) == (6, 4, 2, 1)
    xb, yb = next(iter(val))
    assert xb.shape == (4, 3, 224, 224) and yb.tolist() == [0, 0, 1, 1]
    for i, lbl in enumerate(yb.tolist()):  # constant images stay constant through resize + centre crop
        expect = torch.tensor(
            [(v / 255 - m) / s for v, m, s in zip(colours[info.class_names[lbl]], info.mean, info.std)]
        )
        torch.testing.assert_close(xb[i].mean(dim=(1, 2)), expect, atol=1e-4, rtol=0)
    train.set_epoch(0)
    a = _epoch(train)
    train.set_epoch(0)
    b = _epoch(train)
    assert a[0].shape == (6, 3, 224, 224) and sorted(a[1].tolist()) == [0, 0, 0, 1, 1, 1]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train/<class>/<image> and val/<class>/<image>"):
        make_loaders("imagenet_folder", data_dir=tmp_path / "other")
