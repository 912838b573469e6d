"""Data-parallel step cost on this machine: DDP (gloo) with the dense all-reduce vs the top-K gradient hook.

Starts ``--world`` processes with ``torch.multiprocessing`` (gloo on CPU, one intra-op thread each) and times
``--steps`` SGD steps of a sparsified ResNet-20 on a synthetic CIFAR-shaped global batch, once per gradient
communication mode: ``dense`` (DDP's own all-reduce), then the top-K hook (:mod:`sparsetrain.comm`) at each
``--densities`` value. Prints per mode the mean step time (median over ranks of each rank's mean wall time per step,
after ``--warmup`` steps) and the bytes each rank handed to the collectives per step, both as ratios to ``dense``
run in the same job.

On one 2-core machine the processes share the cores and the "network" is loopback, so the time ratio shows the
hook's compute overhead, not a bandwidth saving; the bytes ratio is what a real interconnect would carry.

    python benchmarks/bench_ddp.py --world 2 --steps 30 --densities 0.01,0.1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


def _worker(rank: int, world: int, init: str, args: argparse.Namespace, modes: list[str], out: str) -> None:
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel as DDP

    import sparsetrain
    from sparsetrain.comm import register_topk_hook

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    rows = []
    try:
        g = torch.Generator().manual_seed(1)
        x_all = torch.randn(args.batch, 3, 32, 32, generator=g)
        y_all = torch.randint(0, 10, (args.batch,), generator=g)
        x, y = x_all.tensor_split(world)[rank], y_all.tensor_split(world)[rank]
        for mode in modes:
            torch.manual_seed(0)
            model = sparsetrain.create_model(args.model, num_classes=10)
            handle = sparsetrain.sparsify_(model, "swat-u", density=args.swat_density)
            net = DDP(model)
            state = None if mode == "dense" else register_topk_hook(net, density=float(mode), start_iter=2)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            times = []
            for step in range(args.warmup + args.steps):
                dist.barrier()
                t0 = time.perf_counter()
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                handle.step(opt)
                if step >= args.warmup:
                    times.append(time.perf_counter() - t0)
            sent = state.last_step_bytes if state is not None else dense_bytes
            rows.append((mode, statistics.mean(times), sent))
        torch.save(rows, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4, help="untimed steps first (the hook is dense for 2)")
    p.add_argument("--swat-density", type=float, default=0.1)
    p.add_argument("--densities", default="0.01,0.1", help="top-K densities of the gradient hook")
    args = p.parse_args()
    modes = ["dense", *[d.strip() for d in args.densities.split(",") if d.strip()]]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows")
        mp.spawn(_worker, args=(args.world, os.path.join(tmp, "init"), args, modes, out), nprocs=args.world)
        per_rank = [torch.load(f"{out}.{r}") for r in range(args.world)]
    print(f"# DDP gloo, {args.world} processes x 1 thread, {args.model} SWAT-U {args.swat_density}, global batch "
          f"{args.batch}, {args.steps} timed steps; torch {torch.__version__}, {os.cpu_count()} CPUs")
    base_t = statistics.median(r[0][1] for r in per_rank)
    base_b = per_rank[0][0][2]
    print(f"{'gradient comm':>16} {'step ms':>9} {'time / dense':>13} {'bytes/step/rank':>16} {'bytes / dense':>14}")
    for i, mode in enumerate(modes):
        t = statistics.median(r[i][1] for r in per_rank)
        b = per_rank[0][i][2]
        name = "dense all-reduce" if mode == "dense" else f"top-K {mode}"
        print(f"{name:>16} {1000 * t:9.1f} {t / base_t:13.2f} {b:16,d} {b / base_b:14.4f}")


if __name__ == "__main__":
    sys.exit(main())
