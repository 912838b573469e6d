"""Does ``torch.compile`` work on a sparsified model, and where does Dynamo break the graph?

Builds ResNet-20 (CIFAR shape) with ``sparsify_(model, <recipe>, density=<d>)``, runs
``torch._dynamo.explain`` on one forward (graph count, graph-break count, every break reason with the source line
it points at, grouped), then trains ``--steps`` steps through ``torch.compile(model)`` and compares the first
step's loss with the eager model's (same weights, same batch).

    python benchmarks/compile_check.py                      # swat-u, density 0.1, inductor, 2 steps
    python benchmarks/compile_check.py --recipe swat-u --threshold-period 100 --backend aot_eager
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import time

import torch
import torch.nn.functional as F

import sparsetrain


def explain(model: torch.nn.Module, x: torch.Tensor) -> dict:
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model)(x)
    grouped: collections.Counter = collections.Counter()
    for br in ex.break_reasons:
        frame = br.user_stack[-1] if br.user_stack else None
        where = f"{frame.filename.split('/src/')[-1]}:{frame.lineno} ({frame.line.strip() if frame.line else ''})" \
            if frame else "?"
        grouped[(br.reason.splitlines()[0][:200], where)] += 1
    return {"graph_count": ex.graph_count, "graph_break_count": ex.graph_break_count,
            "op_count": ex.op_count,
            "breaks": [{"reason": r, "where": w, "count": n} for (r, w), n in grouped.most_common()]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--recipe", default="swat-u")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--threshold-period", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="compiled training steps; 0 = only the explain report")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = sparsetrain.create_model(args.model, num_classes=10)
    handle = sparsetrain.sparsify_(model, args.recipe, density=args.density, threshold_period=args.threshold_period)
    model.train()
    eager = copy.deepcopy(model)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    print(f"compile_check: {args.model} {args.recipe} density {args.density} period {args.threshold_period}, "
          f"torch {torch.__version__}, backend {args.backend}")

    out: dict = {"torch": torch.__version__, "args": vars(args)}
    try:
        out["explain"] = explain(model, x)
        e = out["explain"]
        print(f"dynamo explain: {e['graph_count']} graphs, {e['graph_break_count']} graph breaks, "
              f"{e['op_count']} ops")
        for b in e["breaks"]:
            print(f"  {b['count']:3d}x  {b['reason']}\n        at {b['where']}")
    except Exception as ex:  # noqa: BLE001 - report whatever Dynamo raises
        out["explain_error"] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:300]}"
        print("dynamo explain failed:", out["explain_error"])

    if args.steps < 1:  # --steps 0: the graph-break report only
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1, default=str)
        return
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=args.backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses, times = [], []
    try:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(compiled(x), y)
            loss.backward()
            opt.step()
            handle.step(opt)
            losses.append(loss.item())
            times.append(time.perf_counter() - t0)
        ref = F.cross_entropy(eager(x), y).item()
        out["compiled"] = {"ok": True, "losses": losses, "step_s": times, "eager_first_loss": ref}
        print(f"torch.compile: {args.steps} training steps ran; step times {', '.join(f'{t:.1f}' for t in times)} s "
              f"(first includes compilation); first loss {losses[0]:.6f} vs eager {ref:.6f}")
    except Exception as ex:  # noqa: BLE001
        out["compiled"] = {"ok": False, "error": f"{type(ex).__name__}: {str(ex).splitlines()[0][:300]}"}
        print("torch.compile training failed:", out["compiled"]["error"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
