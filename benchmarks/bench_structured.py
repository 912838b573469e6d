"""Where sparsity can skip work on this CPU: one conv layer, dense vs channel-compacted vs unstructured CSR.

The layer is a 128->128 3x3 conv (padding 1) on a 16x16 feature map, batch 64 (a ResNet stage-2 conv at CIFAR
scale). Timed, each as the median of ``--repeats`` calls in the same process:

* ``dense``: ``conv2d`` forward, and the training step's two backward GEMMs (grad-input and grad-weight, one
  ``aten.convolution_backward`` call);
* ``compact <f>``: the same conv with only a fraction ``f`` of the *input channels* kept and physically removed
  (``Cin`` = 128·f; what structured channel sparsity such as Changpinyo's random channels or a channel top-K
  could run); ``+ gather`` adds the ``index_select`` that builds the compacted input from the full one (needed
  when the previous layer still produces all channels);
* ``unfold + CSR <d>``: unstructured weight sparsity the direct way: ``F.unfold`` (im2col) then
  ``torch.sparse.mm`` with the weight in CSR at density ``d`` (forward only); ``unfold + dense mm`` is the same
  im2col path with a dense GEMM, for contrast;
* ``2:4 semi-structured``: ``torch.sparse.to_sparse_semi_structured`` is tried and its error printed (it needs
  an Ampere or newer NVIDIA GPU).

    python benchmarks/bench_structured.py
    python benchmarks/bench_structured.py --batch 128 --repeats 21
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def timed(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def conv_times(x: torch.Tensor, w: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(forward ms, backward ms: grad-input + grad-weight) of a 3x3 padding-1 conv."""
    y = F.conv2d(x, w, padding=1)
    dy = torch.randn_like(y)
    fwd = timed(lambda: F.conv2d(x, w, padding=1), repeats)
    bwd = timed(lambda: torch.ops.aten.convolution_backward(
        dy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False]), repeats)
    return fwd, bwd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--fractions", nargs="+", type=float, default=[0.5, 0.25])
    p.add_argument("--csr-density", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, c, s = args.batch, args.channels, args.size
    x = torch.randn(b, c, s, s)
    w = torch.randn(c, c, 3, 3) * 0.05
    print(f"bench_structured: conv {c}->{c} 3x3, {s}x{s}, batch {b}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    rows = []
    fwd, bwd = conv_times(x, w, args.repeats)
    rows.append({"variant": "dense conv2d", "fwd_ms": fwd, "bwd_ms": bwd})
    for f in args.fractions:
        keep = torch.randperm(c)[: max(1, round(f * c))].sort().values
        xc, wc = x.index_select(1, keep).contiguous(), w.index_select(1, keep).contiguous()
        fwd_c, bwd_c = conv_times(xc, wc, args.repeats)
        gather = timed(lambda: x.index_select(1, keep), args.repeats)
        rows.append({"variant": f"compact input channels {f}", "fwd_ms": fwd_c, "bwd_ms": bwd_c})
        rows.append({"variant": f"compact input channels {f} + gather", "fwd_ms": fwd_c + gather, "bwd_ms": bwd_c})

    # Unstructured weight sparsity through im2col + CSR (forward only; what "just use sparse kernels" means).
    d = args.csr_density
    w2 = w.reshape(c, -1)
    thr = w2.abs().reshape(-1).kthvalue(w2.numel() - int(round(d * w2.numel())) + 1).values
    w_sparse = w2 * (w2.abs() >= thr)
    w_csr = w_sparse.to_sparse_csr()

    def unfold_csr() -> torch.Tensor:
        cols = F.unfold(x, 3, padding=1)                          # (b, c*9, s*s)
        cols = cols.transpose(0, 1).reshape(c * 9, b * s * s)      # (c*9, b*s*s)
        return torch.sparse.mm(w_csr, cols)

    def unfold_dense() -> torch.Tensor:
        cols = F.unfold(x, 3, padding=1).transpose(0, 1).reshape(c * 9, b * s * s)
        return w_sparse @ cols

    ref = F.conv2d(x, w_sparse.reshape_as(w), padding=1)
    got = unfold_csr().reshape(c, b, s, s).transpose(0, 1)
    err = (got - ref).abs().max().item()
    rows.append({"variant": f"unfold + CSR mm, weight density {d}", "fwd_ms": timed(unfold_csr, args.repeats),
                 "bwd_ms": None, "max_abs_err_vs_conv": err})
    rows.append({"variant": "unfold + dense mm", "fwd_ms": timed(unfold_dense, args.repeats), "bwd_ms": None})

    try:
        from torch.sparse import to_sparse_semi_structured
        to_sparse_semi_structured(torch.randn(128, 128))
        semi = "ran (unexpected on CPU)"
    except Exception as e:  # noqa: BLE001 - the point is to print whatever this build says
        semi = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    base_f, base_b = rows[0]["fwd_ms"], rows[0]["bwd_ms"]
    print("| variant | forward ms | forward / dense | backward ms (dx + dW) | backward / dense |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        bw = "-" if r["bwd_ms"] is None else f"{r['bwd_ms']:.1f}"
        bwr = "-" if r["bwd_ms"] is None else f"{r['bwd_ms'] / base_b:.3f}"
        print(f"| {r['variant']} | {r['fwd_ms']:.1f} | {r['fwd_ms'] / base_f:.3f} | {bw} | {bwr} |")
    print(f"unfold + CSR max |error| vs conv2d with the same sparse weight: {err:.2e}")
    print(f"2:4 semi-structured (to_sparse_semi_structured) on this machine: {semi}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"torch": torch.__version__, "threads": args.threads, "rows": rows, "semi_structured": semi},
                      fh, indent=1)


if __name__ == "__main__":
    main()
