"""Exact top-K threshold of an activation-like tensor: ``sparsetrain.sparsifiers.topk_threshold`` vs ``kthvalue``.

The tensor imitates a post-ReLU activation: ``relu(N(0, 1))``, so about half the elements are exactly zero and
the rest are ``|N(0, 1)|``. Both functions get the same magnitude tensor; the k-th largest value
(``k = ceil(density * numel)``) must be *identical* (the script checks and prints it), and the time of each is
the median of ``--repeats`` calls in the same process, the two called alternately. Both wall time and the CPU time
of the process are printed; on a machine shared with other jobs, the CPU time of a ``--threads 1`` run is the
number to trust (see docs/performance.md). ``kthvalue`` is called the way a plain implementation
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


def timed_pair(fns, *args, repeats: int) -> tuple[list[float], list[float], list[torch.Tensor]]:
    """Median wall and CPU seconds of each function, called alternately (so both see the same machine load)."""
    outs = [fn(*args) for fn in fns]  # warm-up, and the values to compare
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0, c0 = time.perf_counter(), time.process_time()
            fn(*args)
            wall[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
    return [statistics.median(w) for w in wall], [statistics.median(c) for c in cpu], outs


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
    print("| elements | density | topk_threshold ms | kthvalue ms | speed-up | CPU ms (topk_threshold / kthvalue) "
          "| CPU speed-up | identical |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    rows, ok = [], True
    for n in args.sizes:
        g = torch.Generator().manual_seed(0)
        # Activation-like: shaped like a conv output, half exact zeros, the rest |N(0,1)|.
        score = torch.relu(torch.randn(n, generator=g)).reshape(-1, 64, 16, 16) if n % (64 * 256) == 0 \
            else torch.relu(torch.randn(n, generator=g))
        for d in args.densities:
            (t_new, t_ref), (c_new, c_ref), (v_new, v_ref) = timed_pair(
                (topk_threshold, kthvalue_threshold), score, d, repeats=args.repeats)
            same = bool(torch.equal(v_new.reshape(()), v_ref.reshape(())))
            ok &= same
            rows.append({"numel": n, "density": d, "topk_threshold_ms": 1e3 * t_new, "kthvalue_ms": 1e3 * t_ref,
                         "speedup": t_ref / t_new, "topk_threshold_cpu_ms": 1e3 * c_new, "kthvalue_cpu_ms": 1e3 * c_ref,
                         "cpu_speedup": c_ref / c_new, "identical": same, "value": float(v_ref)})
            print(f"| {n:,} | {d} | {1e3 * t_new:.1f} | {1e3 * t_ref:.1f} | {t_ref / t_new:.2f}x | "
                  f"{1e3 * c_new:.1f} / {1e3 * c_ref:.1f} | {c_ref / c_new:.2f}x | "
                  f"{'yes' if same else 'NO: %r vs %r' % (float(v_new), float(v_ref))} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "rows": rows}, f, indent=1)
    if not ok:
        sys.exit("topk_threshold disagreed with kthvalue")


if __name__ == "__main__":
    main()
