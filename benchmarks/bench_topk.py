"""Exact top-K threshold of an activation-like tensor: ``sparsetrain.sparsifiers.topk_threshold`` vs ``kthvalue``.

The tensor imitates a post-ReLU activation: ``relu(N(0, 1))``, so about half the elements are exactly zero and
the rest are ``|N(0, 1)|``. Both functions get the same magnitude tensor; the k-th largest value
(``k = ceil(density * numel)``) must be *identical* (the script checks and prints it), and the time of each is
the median of ``--repeats`` calls in the same process. ``kthvalue`` is called the way a plain implementation
does: ``score.reshape(-1).kthvalue(n - k + 1)``.

    python benchmarks/bench_topk.py                        # 8M and 2M elements, densities 0.01 0.1 0.2 0.5
    python benchmarks/bench_topk.py --sizes 8388608 --densities 0.1 --repeats 21
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

from sparsetrain.sparsifiers import topk_threshold


def kthvalue_threshold(score: torch.Tensor, density: float) -> torch.Tensor:
    """The reference: one exact selection over the whole flattened tensor."""
    n = score.numel()
    k = min(n, max(1, math.ceil(density * n)))
    return score.reshape(-1).kthvalue(n - k + 1).values


def timed(fn, *args, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn(*args)  # warm-up (and the value to compare)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[8 * 2**20, 2 * 2**20])
    p.add_argument("--densities", nargs="+", type=float, default=[0.01, 0.1, 0.2, 0.5])
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"bench_topk: torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| elements | density | topk_threshold ms | kthvalue ms | speed-up | identical |")
    print("|---:|---:|---:|---:|---:|---|")
    rows, ok = [], True
    for n in args.sizes:
        g = torch.Generator().manual_seed(0)
        # Activation-like: shaped like a conv output, half exact zeros, the rest |N(0,1)|.
        score = torch.relu(torch.randn(n, generator=g)).reshape(-1, 64, 16, 16) if n % (64 * 256) == 0 \
            else torch.relu(torch.randn(n, generator=g))
        for d in args.densities:
            t_new, v_new = timed(topk_threshold, score, d, repeats=args.repeats)
            t_ref, v_ref = timed(kthvalue_threshold, score, d, repeats=args.repeats)
            same = bool(torch.equal(v_new.reshape(()), v_ref.reshape(())))
            ok &= same
            rows.append({"numel": n, "density": d, "topk_threshold_ms": 1e3 * t_new, "kthvalue_ms": 1e3 * t_ref,
                         "speedup": t_ref / t_new, "identical": same, "value": float(v_ref)})
            print(f"| {n:,} | {d} | {1e3 * t_new:.1f} | {1e3 * t_ref:.1f} | {t_ref / t_new:.2f}x | "
                  f"{'yes' if same else 'NO: %r vs %r' % (float(v_new), float(v_ref))} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "rows": rows}, f, indent=1)
    if not ok:
        sys.exit("topk_threshold disagreed with kthvalue")


if __name__ == "__main__":
    main()
