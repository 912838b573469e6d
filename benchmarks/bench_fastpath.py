"""Every figure of the fast-path issue in one run: same-run ratios against dense, the load average beside each.

    python benchmarks/bench_fastpath.py                 # all figures (~10-15 min on 2 idle cores)
    python benchmarks/bench_fastpath.py --quick         # smaller/fewer repeats (~3 min), a smoke run
    python benchmarks/bench_fastpath.py --only step rss --json out.json
    python benchmarks/bench_fastpath.py --baseline-src /path/to/old/src   # the previous commit, same run

Figures (each a ratio to the dense model measured in the same process, or in the same run for RSS):

* ``step``: eager training step (zero_grad, forward, cross-entropy, backward, SGD momentum step, ``handle.step``)
  of SWAT-U(0.1) and of the naive ``torch.nn.utils.prune`` peer (L1 90 % re-selected from the dense weights every
  step, weights only), ResNet-18 and ResNet-20 CIFAR, batch 64; modes interleaved step by step, median of the
  per-round ratios. With ``--baseline-src`` the same SWAT-U step of that source tree runs in a child process
  (same batch, same round count) so the previous commit is measured in the same run.
* ``rss``: peak RSS growth over 3 steps (the high-water mark ``VmHWM`` after 3 steps minus after a 2-image warm-up
  forward; ``ru_maxrss`` would inherit this process's own peak across fork + exec), a fresh process per mode, no
  ``MALLOC_*`` variables, ResNet-18 batch 128, three rows (``RSS_MODES``): what a user's two processes show (dense
  PyTorch under glibc; ``sparsify_`` installs sparsetrain's caching allocator), both under that allocator (the CLI's
  setting), and both under glibc (``SPARSETRAIN_ALLOCATOR=default``; what earlier commits measured).
* ``topk``: the exact top-K threshold of an 8.4M-element post-ReLU activation (``relu(randn(128, 64, 32, 32))``,
  d = 0.1) vs ``kthvalue``; the values must be identical.
* ``compile``: ``torch.compile(fullgraph=True)`` of a SWAT-U conv stack (forward and backward equal eager), then
  ResNet-20 SWAT-U(0.1) vs dense, both compiled with Inductor: graph breaks, recompiles after warm-up, step ratio.
* ``epoch``: a real-loader epoch of ResNet-20 on CIFAR-10 (``bench_epoch.epoch_steps``: ``BatchLoader``, crop + flip,
  SGD momentum + weight decay, batch 128, all 50,000 images by default, 2 warm-up batches), samples/s of SWAT-U at
  d = 0.1 and 0.2 against dense. Each mode trains in its own process (as a user's run: dense under PyTorch's
  allocator, SWAT-U under the one ``sparsify_`` installs); the processes take turns of 4 batches, one at a time
  (``bench_epoch.py`` says when it falls back to synthetic images).

Timing needs an idle machine: the 1-minute load average is printed next to every figure; the run warns (and with
``--strict`` stops) when it is above 1 at start, or later above 1 plus this run's own threads. Threads: 2 (``--threads``), the setting users have.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as prune

import sparsetrain

RESULTS: dict = {}


def load() -> float:
    return os.getloadavg()[0]


def check_load(args, what: str) -> float:
    """Warn (or stop, ``--strict``) when other work runs: the load minus this run's own threads above 1."""
    la = load()
    if la - args.own > 1.0:
        msg = f"[load {la:.2f} (this run accounts for about {args.own}) before {what}: the figure is noise]"
        if args.strict:
            sys.exit(msg)
        print(msg, flush=True)
    return la


# ----------------------------------------------------------------------------------------------- step
def interleaved_ratios(steps: dict, rounds: int, costs: dict | None = None) -> dict[str, float]:
    """Median over ``rounds`` of each mode's step time / the ``dense`` step's, the modes run alternately.

    ``costs`` (if given) receives each mode's page faults and system CPU ms per step: unlike the time ratios these
    barely move with the machine's load, and they show what the allocator costs.
    """
    ratios: dict[str, list[float]] = {k: [] for k in steps if k != "dense"}
    faults = {k: 0 for k in steps}
    sys_s = {k: 0.0 for k in steps}
    for _ in range(rounds):
        t = {}
        for k, s in steps.items():
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            s()
            t[k] = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            faults[k] += r1.ru_minflt - r0.ru_minflt
            sys_s[k] += r1.ru_stime - r0.ru_stime
        for k in ratios:
            ratios[k].append(t[k] / t["dense"])
    if costs is not None:
        costs.update({k: (faults[k] / rounds, sys_s[k] / rounds * 1e3) for k in steps})
    return {k: statistics.median(v) for k, v in ratios.items()}


def naive_prune_(model: nn.Module, amount: float = 0.9):
    """What a user writes with torch.nn.utils.prune: L1 masks on every conv/linear weight, re-selected each step."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in layers:
        prune.l1_unstructured(m, "weight", amount=amount)
    method = prune.L1Unstructured(amount)

    def reselect():
        with torch.no_grad():
            for m in layers:  # from the dense weights, every step
                m.weight_mask.copy_(method.compute_mask(m.weight_orig, torch.ones_like(m.weight_mask)))
    return reselect


def make_step(model_name: str, mode: str, x, y):
    torch.manual_seed(0)
    m = sparsetrain.create_model(model_name, num_classes=10)
    h = sparsetrain.sparsify_(m, "swat-u", density=0.1) if mode == "swat" else None
    reselect = naive_prune_(m) if mode == "prune" else None
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

    def step():
        if reselect is not None:
            reselect()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        opt.step()
        if h is not None:
            h.step(opt)
    return step


# The previous commit's SWAT-U step, timed the way bench_step times this one: this file's make_step and
# interleaved_ratios, imported with that commit's src/ first on the path (so `sparsetrain` is that commit's).
STEP_CHILD = r'''
import sys, json, torch
sys.path[:0] = [sys.argv[1], sys.argv[6]]
import sparsetrain, bench_fastpath as bench
torch.set_num_threads(int(sys.argv[3])); torch.manual_seed(0)
x = torch.randn(int(sys.argv[4]), 3, 32, 32); y = torch.randint(0, 10, (int(sys.argv[4]),))
steps = {k: bench.make_step(sys.argv[2], k, x, y) for k in ("dense", "swat")}
for f in steps.values(): f(); f()
costs = {}
ratio = bench.interleaved_ratios(steps, int(sys.argv[5]), costs)["swat"]
print(json.dumps({"ratio": ratio, "src": sparsetrain.__file__,
                  "faults": {k: c[0] for k, c in costs.items()}, "sys_ms": {k: c[1] for k, c in costs.items()}}))
'''


def bench_step(args) -> None:
    print("\n## Eager training step / dense (same process, interleaved, median of per-round ratios)", flush=True)
    print("| model | batch | SWAT-U(0.1) / dense | naive prune peer / dense | page faults per step: dense / SWAT-U / peer "
          "| system CPU ms per step: dense / SWAT-U / peer | load |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    out = {}
    for model_name in args.models:
        la = check_load(args, f"step {model_name}")
        x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
        steps = {k: make_step(model_name, k, x, y) for k in ("dense", "swat", "prune")}
        for s in steps.values():
            s()
            s()
        costs: dict = {}
        med = interleaved_ratios(steps, args.rounds, costs)
        la = max(la, load())
        flt = " / ".join(f"{costs[k][0]:.0f}" for k in ("dense", "swat", "prune"))
        sys_ms = " / ".join(f"{costs[k][1]:.1f}" for k in ("dense", "swat", "prune"))
        print(f"| {model_name} | {args.batch} | {med['swat']:.3f} | {med['prune']:.3f} | {flt} | {sys_ms} | {la:.2f} |",
              flush=True)
        out[model_name] = {**med, "load": la, "faults_per_step": {k: c[0] for k, c in costs.items()},
                           "sys_ms_per_step": {k: c[1] for k, c in costs.items()}}
        if args.baseline_src:
            r = subprocess.run([sys.executable, "-c", STEP_CHILD, args.baseline_src, model_name, str(args.threads),
                                str(args.batch), str(args.rounds), os.path.dirname(os.path.abspath(__file__))],
                               capture_output=True, text=True)
            if r.returncode == 0:
                base = json.loads(r.stdout.strip().splitlines()[-1])
                f, m = base.get("faults", {}), base.get("sys_ms", {})
                print(f"|   baseline `{args.baseline_src}` | {args.batch} | {base['ratio']:.3f} | | "
                      f"{f.get('dense', 0):.0f} / {f.get('swat', 0):.0f} / | "
                      f"{m.get('dense', 0):.1f} / {m.get('swat', 0):.1f} / | {load():.2f} |")
                out[model_name]["baseline"] = base["ratio"]
            else:
                print(f"    baseline failed: {r.stderr.strip().splitlines()[-1:]}")
    RESULTS["step"] = out


# ----------------------------------------------------------------------------------------------- rss
RSS_CHILD = r'''
import sys, torch, torch.nn.functional as F, sparsetrain as st
def hwm():  # this process's own high-water mark (ru_maxrss would inherit the parent's across fork + exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
if sys.argv[5] == "lean":
    st.lean_allocator()
torch.manual_seed(0); torch.set_num_threads(int(sys.argv[4]))
m = st.create_model(sys.argv[1], num_classes=10)
h = None if sys.argv[2] == "dense" else st.sparsify_(m, "swat-u", density=0.1)
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
b = int(sys.argv[3]); x = torch.randn(b, 3, 32, 32); y = torch.randint(0, 10, (b,))
with torch.no_grad(): m(x[:2])
base = hwm()
for _ in range(3):
    opt.zero_grad(set_to_none=True); F.cross_entropy(m(x), y).backward(); opt.step()
    if h is not None: h.step(opt)
print(hwm() - base)
'''


# What each row runs: the allocator of the dense and of the SWAT-U process, and an environment for both.
RSS_MODES = {
    # a user's two scripts: dense PyTorch under glibc; sparsify_ installs the caching allocator
    "default": ("as a user's processes: dense under glibc, SWAT-U under the allocator `sparsify_` installs", {}),
    # the same allocator on both sides (the CLI's setting: `sparsetrain train` installs it for dense runs too)
    "lean": ("both after `sparsetrain.lean_allocator()` (the CLI's setting)", {}),
    # both under glibc: what the previous commits measured
    "glibc": ("both under glibc (`SPARSETRAIN_ALLOCATOR=default`)", {"SPARSETRAIN_ALLOCATOR": "default"}),
}


def bench_rss(args) -> None:
    print("\n## Peak RSS growth over 3 steps, ResNet-18 batch 128 (fresh process per mode, no MALLOC_* variables)")
    print("| allocators | dense MiB | SWAT-U(0.1) MiB | SWAT-U / dense | load |")
    print("|---|---:|---:|---:|---:|")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "SPARSETRAIN_ALLOCATOR"))}
    out = {}
    for alloc, (name, extra) in RSS_MODES.items():
        la = check_load(args, f"rss {alloc}")
        mem = {}
        for mode in ("dense", "swat"):
            vals = []
            for _ in range(args.rss_repeats):
                r = subprocess.run([sys.executable, "-c", RSS_CHILD, "resnet18", mode, "128", str(args.threads), alloc],
                                   capture_output=True, text=True, env={**base_env, **extra})
                if r.returncode:
                    raise SystemExit(f"rss child failed: {r.stderr[-500:]}")
                vals.append(int(r.stdout.split()[-1]) / 1024)
            mem[mode] = statistics.median(vals)
        ratio = mem["swat"] / mem["dense"]
        print(f"| {name} | {mem['dense']:.0f} | {mem['swat']:.0f} | {ratio:.3f} | {max(la, load()):.2f} |",
              flush=True)
        out[alloc] = {"dense_mib": mem["dense"], "swat_mib": mem["swat"], "ratio": ratio}
    RESULTS["rss"] = out


# ----------------------------------------------------------------------------------------------- topk
def bench_topk(args) -> None:
    from sparsetrain.sparsifiers import topk_threshold

    print("\n## Exact top-K threshold, 8.4M-element post-ReLU activation, d = 0.1")
    la = check_load(args, "topk")
    torch.manual_seed(0)
    x = torch.randn(128, 64, 32, 32).relu_()
    n = x.numel()
    k = -(-n // 10)
    ours, ref = topk_threshold(x, 0.1), x.reshape(-1).kthvalue(n - k + 1).values
    assert torch.equal(ours, ref), (ours, ref)
    t = {"ours": [], "kthvalue": []}
    for _ in range(args.topk_repeats):
        t0 = time.perf_counter()
        topk_threshold(x, 0.1)
        t["ours"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        x.reshape(-1).kthvalue(n - k + 1)
        t["kthvalue"].append(time.perf_counter() - t0)
    med = {k_: statistics.median(v) * 1e3 for k_, v in t.items()}
    speed = med["kthvalue"] / med["ours"]
    print(f"topk_threshold {med['ours']:.1f} ms, kthvalue {med['kthvalue']:.1f} ms: **{speed:.2f}x**, "
          f"identical values (load {max(la, load()):.2f})", flush=True)
    RESULTS["topk"] = {**med, "speedup": speed}


# ----------------------------------------------------------------------------------------------- compile
def bench_compile(args) -> None:
    import copy

    print("\n## torch.compile", flush=True)
    torch._dynamo.reset()
    torch.manual_seed(0)
    stack = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16 * 16, 10))
    sparsetrain.sparsify_(stack, "swat-u", density=0.1, first_layer_dense=False)
    ref = copy.deepcopy(stack)
    x = torch.randn(8, 3, 16, 16)
    fn = torch.compile(stack, fullgraph=True)
    y, yr = fn(x), ref(x)
    y.sum().backward()
    yr.sum().backward()
    fwd = (y - yr).abs().max().item()
    bwd = max((p.grad - q.grad).abs().max().item() for p, q in zip(stack.parameters(), ref.parameters()))
    print(f"fullgraph=True SWAT-U conv stack (Inductor): compiles; max |compiled - eager| forward {fwd:.1e}, "
          f"gradients {bwd:.1e}", flush=True)
    out = {"stack_forward_diff": fwd, "stack_grad_diff": bwd}

    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    steps, info, models = {}, {}, {}
    for mode in ("dense", "swat"):
        torch.manual_seed(0)
        m = sparsetrain.create_model("resnet20", num_classes=10)
        h = sparsetrain.sparsify_(m, "swat-u", density=0.1) if mode == "swat" else None
        ex = torch._dynamo.explain(m)(x[:2])
        info[mode] = {"graphs": ex.graph_count, "breaks": ex.graph_break_count}
        models[mode] = (m, h)
    torch._dynamo.reset()  # once, before compiling both (a reset in between would drop the first's code)
    for mode, (m, h) in models.items():
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        cm = torch.compile(m)

        def step(cm=cm, opt=opt, h=h):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(cm(x), y).backward()
            opt.step()
            if h is not None:
                h.step(opt)
        t0 = time.perf_counter()
        step()
        step()
        info[mode]["compile_s"] = time.perf_counter() - t0
        steps[mode] = step
    la = check_load(args, "compiled steps")
    torch._dynamo.config.error_on_recompile = True
    try:
        r, recompiled = interleaved_ratios(steps, args.rounds)["swat"], False
    except torch._dynamo.exc.RecompileError:
        r, recompiled = float("nan"), True
    finally:
        torch._dynamo.config.error_on_recompile = False
    print(f"ResNet-20 b{args.batch} SWAT-U(0.1), Inductor: {info['swat']['graphs']} graph, "
          f"{info['swat']['breaks']} graph breaks, recompiles after warm-up: {'yes' if recompiled else 'none'}; "
          f"compiled SWAT / compiled dense step **{r:.3f}** (warm-up incl. compile {info['swat']['compile_s']:.0f} s "
          f"vs {info['dense']['compile_s']:.0f} s; load {max(la, load()):.2f})", flush=True)
    out.update({"resnet20": info, "ratio": r, "recompiled": recompiled})
    RESULTS["compile"] = out


# ----------------------------------------------------------------------------------------------- epoch
EPOCH_CHILD = r'''
import sys, time, types, torch
sys.path.insert(0, sys.argv[1])
from bench_epoch import _data, epoch_steps
torch.set_num_threads(int(sys.argv[3]))
opts = types.SimpleNamespace(model="resnet20", batch_size=128, images=int(sys.argv[4]), data_dir=sys.argv[5] or None,
                             synthetic=False)
x, y = _data(opts)
steps = epoch_steps(sys.argv[2], x[:opts.images], y[:opts.images], opts)
print("ready", flush=True)
for line in sys.stdin:  # "n": run the next n batches (loading included), answer "samples seconds"
    t0, seen = time.perf_counter(), 0
    for _ in range(int(line)):
        seen += next(steps, 0)
    print(seen, time.perf_counter() - t0, flush=True)
'''


def bench_epoch(args) -> None:
    print(f"\n## Real-loader epoch, ResNet-20 CIFAR-10 ({args.images} images, batch 128, crop + flip), samples/s",
          flush=True)
    la = check_load(args, "epoch")
    modes = ("dense", "swat-u-0.1", "swat-u-0.2")
    # Each mode trains in its own process, as a user's run does (its own allocator state: the dense one PyTorch's,
    # the sparse ones the allocator sparsify_ installs), and the processes take turns of a few batches, one at a time:
    # a drift of the machine over the minutes an epoch takes then falls on every mode alike.
    here = os.path.dirname(os.path.abspath(__file__))
    procs = {m: subprocess.Popen([sys.executable, "-c", EPOCH_CHILD, here, m, str(args.threads), str(args.images),
                                  args.data_dir or ""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for m in modes}

    def run(m: str, n: int) -> tuple[int, float]:
        procs[m].stdin.write(f"{n}\n")
        procs[m].stdin.flush()
        seen, dt = procs[m].stdout.readline().split()
        return int(seen), float(dt)
    for m in modes:
        for line in procs[m].stdout:  # what the worker says before it is ready (e.g. a synthetic-data fallback)
            if line.strip() == "ready":
                break
            print(f"[{m}] {line.strip()}")
        else:
            sys.exit(f"epoch worker {m} failed")
        run(m, 2)  # warm-up batches
    seen, spent, turns = dict.fromkeys(modes, 0), dict.fromkeys(modes, 0.0), {m: [] for m in modes}
    while True:
        got = {m: run(m, 4) for m in modes}
        if any(n < 4 * 128 for n, _ in got.values()):  # the end of the epoch: a short turn is left out
            break
        for m, (n, dt) in got.items():
            seen[m] += n
            spent[m] += dt
            turns[m].append(n / dt)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    rates = {m: seen[m] / spent[m] for m in modes}
    ratio = {m: statistics.median(a / b for a, b in zip(turns[m], turns["dense"])) for m in modes}
    la = max(la, load())
    print(f"dense {rates['dense']:.0f}/s; SWAT-U 0.1: {rates['swat-u-0.1']:.0f}/s "
          f"(**{rates['swat-u-0.1'] / rates['dense']:.3f}x**; median of {len(turns['dense'])} turns "
          f"{ratio['swat-u-0.1']:.3f}); SWAT-U 0.2: {rates['swat-u-0.2']:.0f}/s "
          f"(**{rates['swat-u-0.2'] / rates['dense']:.3f}x**; {ratio['swat-u-0.2']:.3f}) (load {la:.2f})", flush=True)
    RESULTS["epoch"] = {"rates": rates, "turn_ratio_median": ratio}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=["step", "rss", "topk", "compile", "epoch"])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet20"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--rss-repeats", type=int, default=3)
    p.add_argument("--topk-repeats", type=int, default=11)
    p.add_argument("--images", type=int, default=50_000, help="epoch images (default: all of CIFAR-10)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir")
    p.add_argument("--baseline-src", help="a previous commit's src/ folder, timed in the same run")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--strict", action="store_true", help="stop when the load average is above 1")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args()
    if args.quick:
        args.models, args.rounds, args.rss_repeats, args.topk_repeats, args.images = ["resnet20"], 3, 1, 3, 1280
    torch.set_num_threads(args.threads)
    args.own = 0.0
    if load() > 1.0:  # before this run does anything: the machine must be idle
        msg = f"load average {load():.2f} > 1 at start: other work is running; timings would be noise"
        if args.strict:
            sys.exit(msg)
        print(f"[{msg}]")
    args.own = float(args.threads)  # from now on, this run's own threads count in the load average
    print(f"bench_fastpath: sparsetrain {Path(sparsetrain.__file__).parent}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load {load():.2f}", flush=True)
    for name in args.only or ["step", "rss", "topk", "compile", "epoch"]:
        globals()[f"bench_{name}"](args)
    RESULTS["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=2))


if __name__ == "__main__":
    main()
