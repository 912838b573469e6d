"""Time one CIFAR-10 training epoch of ResNet-20, dense vs SWAT-U, in the same process.

Prints samples/s of each and the ratio against the dense baseline (no timed tests: this is the measurement).
Real CIFAR-10 is used when found (``--data-dir`` or ``SPARSETRAIN_DATA`` or ``../shared/data``); the timing does
not depend on the pixel values, so ``--synthetic`` runs anywhere.

    python benchmarks/bench_epoch.py                       # full epoch (50k images), dense then swat-u
    python benchmarks/bench_epoch.py --images 5120 --recipes dense swat-u swat-channel grad-prune
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsetrain
from sparsetrain.data import BatchLoader, dataset_info, load_arrays


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


def time_epoch(recipe: str, x: torch.Tensor, y: torch.Tensor, args) -> float:
    torch.manual_seed(0)
    info = dataset_info("cifar10")
    model = sparsetrain.create_model(args.model, num_classes=10)
    handle = None if recipe == "dense" else sparsetrain.sparsify_(model, recipe, **(
        {"density": args.density} if recipe.startswith(("swat", "meprop")) else {}))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loader = BatchLoader(x, y, batch_size=args.batch_size, mean=info.mean, std=info.std, shuffle=True,
                         seed=0, crop_padding=info.crop_padding, hflip=info.hflip)
    model.train()
    seen = 0
    start = None
    for i, (xb, yb) in enumerate(loader):
        if i == args.warmup:
            start = time.perf_counter()
            seen = 0
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        if handle is not None:
            handle.step(opt)
        seen += len(yb)
    return seen / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--recipes", nargs="+", default=["dense", "swat-u"])
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, default=None, help="use the first N training images (default: all)")
    p.add_argument("--warmup", type=int, default=3, help="batches excluded from the timing")
    p.add_argument("--data-dir")
    p.add_argument("--synthetic", action="store_true")
    args = p.parse_args()
    if args.images is None:
        args.images = 50_000
    x, y = _data(args)
    x, y = x[: args.images], y[: args.images]
    print(f"{args.model}, {len(y)} images/epoch, batch {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    results = {}
    for r in args.recipes:
        results[r] = time_epoch(r, x, y, args)
        print(f"  {r:<14} {results[r]:8.1f} samples/s", flush=True)
    base = results.get("dense") or next(iter(results.values()))
    print("ratio vs dense (higher = faster):")
    for r, v in results.items():
        print(f"  {r:<14} {v / base:6.3f}x")


if __name__ == "__main__":
    main()
