"""The split compaction (``sparsetrain._compaction.compact``) against torch's serial CPU ``nonzero``, in one process.

    python benchmarks/bench_compaction.py [--models resnet20 resnet18] [--rounds 9] [--threads 2]

Two figures, both same-process A/B (the split is switched off by raising ``_SPLIT_MIN_NUMEL``, nothing else
changes, so the comparison is free of the between-process noise that a ``--baseline-src`` child run carries):

* the compaction alone: positions of an 8.4M-element mask at density 0.14 (what the activation bracket compacts
  for ``relu(randn(128, 64, 32, 32))`` at d = 0.1), median of 15 calls each way; the positions must be identical;
* the eager SWAT-U(0.1) training step / dense, batch 64, with and without the split, modes interleaved step by
  step (dense, split, serial), median of the per-round ratios.

The 1-minute load average is printed beside each figure: time only on an idle machine (this run's own threads put
it near ``--threads``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import sparsetrain as st
from sparsetrain import _compaction

OFF = 1 << 62


def load() -> float:
    return os.getloadavg()[0]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compaction(repeats: int = 15) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(128 * 64 * 32 * 32, generator=g) < 0.14
    orig = _compaction._SPLIT_MIN_NUMEL
    try:
        split = _compaction.compact(mask)
        assert torch.equal(split, torch.nonzero(mask).view(-1)), "split compaction changed the positions"
        t_split, t_serial = [], []
        for _ in range(repeats):
            _compaction._SPLIT_MIN_NUMEL = orig
            t_split.append(timed(lambda: _compaction.compact(mask)))
            _compaction._SPLIT_MIN_NUMEL = OFF
            t_serial.append(timed(lambda: _compaction.compact(mask)))
    finally:
        _compaction._SPLIT_MIN_NUMEL = orig
    return statistics.median(t_split), statistics.median(t_serial)


def step_ratios(model: str, rounds: int, batch: int = 64) -> tuple[float, float, float]:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def make(sparse: bool):
        m = st.create_model(model, num_classes=10)
        h = st.sparsify_(m, "swat-u", density=0.1) if sparse else None
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()
            if h is not None:
                h.step(opt)
        return step

    dense, sparse = make(False), make(True)
    for f in (dense, sparse, dense, sparse):
        f()
    orig = _compaction._SPLIT_MIN_NUMEL
    r_split, r_serial, t_dense = [], [], []
    try:
        for _ in range(rounds):
            td = timed(dense)
            _compaction._SPLIT_MIN_NUMEL = orig
            ts = timed(sparse)
            _compaction._SPLIT_MIN_NUMEL = OFF
            tp = timed(sparse)
            r_split.append(ts / td)
            r_serial.append(tp / td)
            t_dense.append(td)
    finally:
        _compaction._SPLIT_MIN_NUMEL = orig
    return statistics.median(r_split), statistics.median(r_serial), statistics.median(t_dense)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet18"])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"bench_compaction: torch {torch.__version__}, {a.threads} threads, load at start {load():.2f}")
    ts, tp = compaction()
    print("\n| compaction of an 8.4M-element mask (d 0.14) | split | serial `nonzero` | speed-up | load |")
    print("|---|---:|---:|---:|---:|")
    print(f"| positions identical | {ts * 1e3:.1f} ms | {tp * 1e3:.1f} ms | {tp / ts:.2f}x | {load():.2f} |")
    print("\n| model, batch 64 | SWAT-U(0.1) / dense, split | same, serial | dense step | load |")
    print("|---|---:|---:|---:|---:|")
    for model in a.models:
        rs, rp, td = step_ratios(model, a.rounds)
        print(f"| {model} | {rs:.3f} | {rp:.3f} | {td * 1e3:.0f} ms | {load():.2f} |")


if __name__ == "__main__":
    main()
