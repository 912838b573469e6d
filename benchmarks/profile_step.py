"""Where a training step's time goes: ``torch.profiler`` self CPU time per op for one mode.

Builds the model for one mode (the grammar of ``_common.py``), runs two warm-up steps, profiles ``--rounds``
single steps and prints the op table of the step with the smallest total (the least disturbed by other
processes), as Markdown: op, self ms, calls, share of the step.

    python benchmarks/profile_step.py                                  # ResNet-20, swat-u-0.1-p1, batch 64
    python benchmarks/profile_step.py --mode dense --top 10
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import sparsetrain

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import apply_mode, parse_mode  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--mode", default="swat-u-0.1-p1")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--top", type=int, default=24)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = sparsetrain.create_model(args.model, num_classes=10)
    handle = apply_mode(model, parse_mode(args.mode))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if handle is not None:
            handle.step(opt)

    step()
    step()
    best: tuple[float, list] | None = None
    for _ in range(args.rounds):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        ev = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]
        total = sum(v for _, v, _ in ev)
        if best is None or total < best[0]:
            best = (total, ev)
    assert best is not None
    total, ev = best
    print(f"{args.model} {args.mode} batch {args.batch}, {args.threads} thread(s): one step, self CPU total "
          f"{total / 1e3:.0f} ms (least of {args.rounds} profiled steps)")
    print("| op | self ms | calls | share |\n|---|---:|---:|---:|")
    for key, v, c in sorted(ev, key=lambda t: -t[1])[: args.top]:
        print(f"| `{key}` | {v / 1e3:.1f} | {c} | {100 * v / total:.1f}% |")


if __name__ == "__main__":
    main()
