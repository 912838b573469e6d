"""Time a CIFAR-10 training epoch of ResNet-20, dense vs sparse modes, in the same process.

Prints samples/s of each and the ratio against the dense baseline (no timed tests: this is the measurement).
The real training loop's pieces are used (``BatchLoader`` with crop + flip augmentation, SGD with momentum,
``handle.step``). Real CIFAR-10 is used when found (``--data-dir`` or ``SPARSETRAIN_DATA`` or
``../shared/data``); the timing does not depend on the pixel values, so ``--synthetic`` runs anywhere.

    python benchmarks/bench_epoch.py                       # 20,000 images; dense, SWAT-U 0.1, 0.2, 0.1 period 100
    python benchmarks/bench_epoch.py --images 50000        # a full epoch
    python benchmarks/bench_epoch.py --images 5120 --modes dense swat-u-0.1 swat-channel-0.5 grad-prune-0.9
    python benchmarks/bench_epoch.py --recipes dense swat-u --density 0.1      # the older flags still work

Modes use the grammar of ``_common.py``: ``dense``, ``swat-u-<d>[-p<P>]``, ``swat-channel-<d>``,
``grad-prune-<p>``, ``naive-<d>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

import sparsetrain
from sparsetrain.data import BatchLoader, dataset_info, load_arrays

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import apply_mode, machine_info, parse_mode  # noqa: E402

DEFAULT_MODES = ["dense", "swat-u-0.1", "swat-u-0.2", "swat-u-0.1-p100"]


def _data(args) -> tuple[torch.Tensor, torch.Tensor]:
    if not args.synthetic:
        for d in (args.data_dir, os.environ.get("SPARSETRAIN_DATA"),
                  Path(__file__).resolve().parents[2] / "shared" / "data"):
            if d and Path(d).exists():
                try:
                    return load_arrays("cifar10", "train", data_dir=d)
                except FileNotFoundError:
                    pass
        print("CIFAR-10 not found: using synthetic uint8 images (timing is value-independent)")
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (args.images, 32, 32, 3), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (args.images,), generator=g))


def epoch_steps(mode: str, x: torch.Tensor, y: torch.Tensor, args) -> Iterator[int]:
    """One epoch of ``mode``, a training step per ``next()`` (loading the batch included); yields its sample count.

    A generator so that modes can be interleaved in chunks in one process (``bench_fastpath.py``): slow drifts of a
    shared machine then hit every mode alike.
    """
    torch.manual_seed(0)
    info = dataset_info("cifar10")
    model = sparsetrain.create_model(args.model, num_classes=10)
    handle = apply_mode(model, parse_mode(mode))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loader = BatchLoader(x, y, batch_size=args.batch_size, mean=info.mean, std=info.std, shuffle=True,
                         seed=0, crop_padding=info.crop_padding, hflip=info.hflip)
    model.train()
    for xb, yb in loader:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        if handle is not None:
            handle.step(opt)
        yield len(yb)


def time_epoch(mode: str, x: torch.Tensor, y: torch.Tensor, args) -> tuple[float, float]:
    """(samples per wall-clock second, samples per CPU second of this process) after ``args.warmup`` batches."""
    steps = epoch_steps(mode, x, y, args)
    for _ in range(args.warmup):
        next(steps, None)
    start, cpu_start = time.perf_counter(), time.process_time()
    seen = sum(steps)
    return seen / (time.perf_counter() - start), seen / (time.process_time() - cpu_start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--modes", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_MODES)}")
    p.add_argument("--recipes", nargs="+", help="older form: preset names (dense, swat-u, swat-channel, "
                   "grad-prune), with --density for the swat presets")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, default=20_000, help="use the first N training images")
    p.add_argument("--warmup", type=int, default=3, help="batches excluded from the timing")
    p.add_argument("--data-dir")
    p.add_argument("--synthetic", action="store_true")
    args = p.parse_args()
    modes = args.modes or DEFAULT_MODES
    if args.recipes:
        modes = [r if r == "dense" else f"{r}-0.9" if r == "grad-prune" else f"{r}-{args.density}"
                 for r in args.recipes]
    for m in modes:
        parse_mode(m)
    torch.set_num_threads(args.threads)
    x, y = _data(args)
    x, y = x[: args.images], y[: args.images]
    info = machine_info()
    print(f"{args.model}, {len(y)} images/epoch, batch {args.batch_size}, {info['cpu']}, torch {info['torch']}, "
          f"{torch.get_num_threads()} threads")
    start = time.perf_counter()
    results = {}
    for r in modes:
        results[r] = time_epoch(r, x, y, args)
        print(f"  {r:<16} {results[r][0]:8.1f} samples/s   {results[r][1]:8.1f} samples/CPU-s", flush=True)
    base = results.get("dense") or next(iter(results.values()))
    print(f"throughput ratio vs dense (higher = faster; total {time.perf_counter() - start:.0f} s). Per CPU second "
          "is the measure to trust on a shared machine (single-threaded runs; see docs/performance.md):")
    print("| mode | samples/s | / dense | samples per CPU-s | / dense |\n|---|---:|---:|---:|---:|")
    for r, (v, c) in results.items():
        print(f"| {r} | {v:.1f} | {v / base[0]:.3f} | {c:.1f} | {c / base[1]:.3f} |")


if __name__ == "__main__":
    main()
