"""One training step (forward + backward + SGD step) of a CIFAR-shaped CNN: time and *measured* memory per mode.

Every (model, batch, mode) runs in a fresh child process (this script with ``--child``), so one mode's allocator
state cannot flatter or penalise the next. Each child prints

* ``ms``: the median wall time of ``--steps`` steps after ``--warmup`` steps (``zero_grad``, forward,
  cross-entropy, backward, ``SGD.step``, ``handle.step``); ``cpu_ms`` the median CPU time of the process over
  the same steps (all threads), which other processes on the machine disturb less than wall time;
* ``peak_mib``: the peak RSS growth of a step, from just before the forward to the end of the backward;
* ``saved_mib``: the bytes autograd saves for backward in one step (every tensor handed to a
  ``torch.autograd.graph.saved_tensors_hooks`` pack hook, de-duplicated by storage, parameters excluded).

and the parent prints ratios to ``dense`` *from the same run* (same machine state, same build).

How the peak is measured, and why it is trustworthy: glibc serves large blocks with ``mmap`` and unmaps them on
``free`` only above a threshold it raises on its own as a program runs, and it keeps freed heap chunks (and
reuses them for later tensors, so their pages stay resident). The child is therefore *started* with glibc's mmap
and trim thresholds fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``; fixing them also
stops the automatic raising): every tensor's memory is mapped when it is first written and returned when it is
freed, so RSS follows the live tensors. (Switching with ``mallopt`` after some steps is not enough: the large
free chunks already in the heap keep being reused and never returned; this inflated the peaks by up to 2x.)
A background thread reads ``/proc/self/statm`` every ~1 ms during the step (torch releases the GIL inside its
kernels, so the thread keeps sampling); the peak minus the RSS just before the forward is the step's growth, and
the maximum over ``--mem-steps`` steps is reported (a missed sample can only lower a step's peak). Not used:
``ru_maxrss`` (a high-water mark of the whole process: after warm-up its delta is zero).

The memory steps run first (after one warm-up step); the child then sets the thresholds to glibc's own ceiling
(32 MiB mmap, 64 MiB trim: where its automatic raising ends up) with ``mallopt``, runs ``--warmup`` more steps
and times ``--steps`` steps. Timing under the 128 KiB thresholds would not be representative: mapping fresh,
zero-filled pages for every tensor made a ResNet-20 step up to 2-3x slower here. The last warm-up step counts
the saved bytes (the pack hook costs a little time, so it is not a timed step).

    python benchmarks/bench_step.py                     # ResNet-18 + ResNet-20, batch 64 and 128, all modes
    python benchmarks/bench_step.py --quick             # < 1 min smoke run
    python benchmarks/bench_step.py --models resnet20 --batch 128 --modes dense swat-u-0.1-p1 naive-0.1
    python benchmarks/bench_step.py --json out.json
    python benchmarks/bench_step.py --compare before.json after.json     # side-by-side ratio tables

Modes: ``dense``, ``swat-u-<d>[-p<P>]``, ``swat-channel-<d>``, ``grad-prune-<p>``, ``naive-<d>`` (see
``_common.py``; ``naive`` is a plain autograd Function with an exact ``kthvalue`` every step and the top-K copies
stored as dense tensors). With ``-p100`` no threshold is recomputed inside the timed window (the first is
computed in warm-up): the time is the cached-threshold step, which is 99 of every 100 steps.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import torch
import torch.nn.functional as F

DEFAULT_MODES = ["dense", "swat-u-0.1-p1", "swat-u-0.1-p100", "swat-u-0.2-p1", "swat-u-0.2-p100", "swat-u-0.5-p1",
                 "swat-u-0.5-p100", "swat-channel-0.5", "grad-prune-0.9", "naive-0.1"]
QUICK_MODES = ["dense", "swat-u-0.1-p1", "swat-u-0.1-p100", "naive-0.1"]
LEAN_MALLOC_BYTES = 128 * 1024
LEAN_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(LEAN_MALLOC_BYTES), "MALLOC_TRIM_THRESHOLD_": str(LEAN_MALLOC_BYTES)}
GLIBC_MMAP_MAX = 32 * 2**20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc; the dynamic trim threshold is twice it
MIB = 2**20


# ----------------------------------------------------------------------------------------------- child side
class RssSampler:
    """Samples this process's resident set size on a background thread; :meth:`window` returns peak growth."""

    def __init__(self, interval: float = 0.001) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.fd = os.open("/proc/self/statm", os.O_RDONLY)
        self.interval = interval
        self.peak = 0
        self._run = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        return int(os.pread(self.fd, 128, 0).split()[1]) * self.page

    def _loop(self) -> None:
        while not self._stop:
            if self._run.wait(0.05):
                r = self.rss()
                if r > self.peak:
                    self.peak = r
                time.sleep(self.interval)

    def start(self) -> int:
        base = self.rss()
        self.peak = base
        self._run.set()
        return base

    def stop(self) -> int:
        self._run.clear()
        r = self.rss()  # the end of the window counts too
        self.peak = max(self.peak, r)
        time.sleep(3 * self.interval)  # let an in-flight sample land before the next window resets the peak
        return self.peak

    def close(self) -> None:
        self._stop = True
        self._run.set()
        self._thread.join()
        os.close(self.fd)


def set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """glibc ``mallopt`` M_MMAP_THRESHOLD / M_TRIM_THRESHOLD; ``False`` where glibc is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
        return libc.mallopt(m_mmap_threshold, mmap_bytes) == 1 and libc.mallopt(m_trim_threshold, trim_bytes) == 1
    except (OSError, AttributeError):
        return False


def malloc_trim() -> None:
    """Return free heap pages to the OS, so that reusing them inside the measured window shows up in RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def saved_bytes(model: torch.nn.Module, run_forward) -> dict[str, Any]:
    """Bytes of the tensors autograd saves for backward during ``run_forward()``, by storage (params excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, str]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. sparse layouts: count their own element bytes
            ptr, nbytes = id(t), t.element_size() * t.numel()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (nbytes, str(t.dtype).replace("torch.", ""))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run_forward()
    by_dtype: dict[str, int] = {}
    for nbytes, dt in seen.values():
        by_dtype[dt] = by_dtype.get(dt, 0) + nbytes
    return {"loss": loss, "bytes": sum(by_dtype.values()), "by_dtype": by_dtype, "tensors": len(seen)}


def child(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import apply_mode, parse_mode

    import sparsetrain

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mode = parse_mode(args.mode)
    model = sparsetrain.create_model(args.model, num_classes=10)
    handle = apply_mode(model, mode)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    def forward() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def finish() -> None:
        opt.step()
        if handle is not None:
            handle.step(opt)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        forward().backward()
        finish()

    # Memory first, while the malloc thresholds set at process start still hold (see the module docstring).
    lean = all(os.environ.get(k) == v for k, v in LEAN_MALLOC_ENV.items())
    step()  # warm-up: lazy initialisation, optimizer state, first thresholds
    sampler = RssSampler()
    peaks = []
    for _ in range(args.mem_steps):
        opt.zero_grad(set_to_none=True)
        malloc_trim()
        base = sampler.start()
        forward().backward()
        peaks.append(sampler.stop() - base)
        finish()
    sampler.close()

    set_malloc_thresholds(GLIBC_MMAP_MAX, 2 * GLIBC_MMAP_MAX)
    for _ in range(max(0, args.warmup - 1)):
        step()
    # The last warm-up step counts the saved bytes (the pack hook costs a little time, so not in a timed step).
    opt.zero_grad(set_to_none=True)
    saved = saved_bytes(model, forward)
    saved["loss"].backward()
    finish()
    wall, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)

    return {"model": args.model, "batch": args.batch, "mode": args.mode, "threads": torch.get_num_threads(),
            "ms": 1e3 * statistics.median(wall), "cpu_ms": 1e3 * statistics.median(cpu), "min_ms": 1e3 * min(wall),
            "ms_all": [round(1e3 * w, 2) for w in wall], "peak_mib": max(peaks) / MIB,
            "peak_mib_all": [round(p / MIB, 1) for p in peaks], "lean_malloc": lean, "saved_mib": saved["bytes"] / MIB,
            "saved_by_dtype_mib": {k: round(v / MIB, 2) for k, v in saved["by_dtype"].items()},
            "saved_tensors": saved["tensors"]}


# ---------------------------------------------------------------------------------------------- parent side
def run_child(model: str, batch: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    from _common import loadavg

    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", model, "--batch", str(batch),
           "--mode", mode, "--steps", str(args.steps), "--warmup", str(args.warmup), "--mem-steps",
           str(args.mem_steps), "--threads", str(args.threads)]
    env = {**os.environ, **LEAN_MALLOC_ENV}
    load = loadavg()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        err = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": model, "batch": batch, "mode": mode, "error": err}
    r = json.loads(line[len("RESULT "):])
    r["load_before"] = load
    r["child_s"] = round(time.perf_counter() - t0, 1)
    return r


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:6.3f}" if a is not None and b else "     -"


def print_tables(results: list[dict[str, Any]]) -> str:
    """The ratio tables, one per (model, batch), as Markdown; also returned."""
    out = []
    keys = sorted({(r["model"], r["batch"]) for r in results}, key=lambda k: (k[0], k[1]))
    for model, batch in keys:
        rows = [r for r in results if r["model"] == model and r["batch"] == batch]
        base = next((r for r in rows if r["mode"] == "dense" and "error" not in r), None)
        out.append(f"\n{model}, batch {batch}")
        out.append("| mode | ms/step | time / dense | min time / dense | CPU time / dense | peak RSS growth MiB "
                   "| peak / dense | saved MiB | saved / dense |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            if "error" in r:
                out.append(f"| {r['mode']} | error: {r['error'][:80]} | | | | | | | |")
                continue
            b = base or {}
            out.append(f"| {r['mode']} | {r['ms']:.1f} | {_ratio(r['ms'], b.get('ms'))} | "
                       f"{_ratio(r['min_ms'], b.get('min_ms'))} | {_ratio(r['cpu_ms'], b.get('cpu_ms'))} | {r['peak_mib']:.1f} | "
                       f"{_ratio(r['peak_mib'], b.get('peak_mib'))} | {r['saved_mib']:.1f} | "
                       f"{_ratio(r['saved_mib'], b.get('saved_mib'))} |")
    text = "\n".join(out)
    print(text)
    return text


def compare(before_path: str, after_path: str) -> str:
    """Before/after ratio tables from two ``--json`` files (each ratio is to dense of its *own* run)."""
    runs = []
    for path in (before_path, after_path):
        with open(path) as f:
            runs.append({(r["model"], r["batch"], r["mode"]): r for r in json.load(f)["results"] if "error" not in r})
    out = []
    for model, batch in sorted({k[:2] for k in runs[0]} & {k[:2] for k in runs[1]}):
        bases = [run.get((model, batch, "dense")) for run in runs]
        out.append(f"\n{model}, batch {batch}: ratios to dense of the same run, before -> after")
        out.append("| mode | CPU time / dense | time / dense | peak RSS growth / dense | saved bytes / dense "
                   "| peak MiB | saved MiB |")
        out.append("|---|---|---|---|---|---|---|")
        modes = [k[2] for k in runs[0] if k[:2] == (model, batch) and (model, batch, k[2]) in runs[1]]
        for mode in modes:
            a, b = runs[0][(model, batch, mode)], runs[1][(model, batch, mode)]
            cells = []
            for key in ("cpu_ms", "ms", "peak_mib", "saved_mib"):
                cells.append(f"{_ratio(a[key], bases[0][key]).strip()} -> {_ratio(b[key], bases[1][key]).strip()}")
            out.append(f"| {mode} | {' | '.join(cells)} | {a['peak_mib']:.0f} -> {b['peak_mib']:.0f} "
                       f"| {a['saved_mib']:.0f} -> {b['saved_mib']:.0f} |")
    text = "\n".join(out)
    print(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet20"])
    p.add_argument("--batch", nargs="+", type=int, default=[64, 128])
    p.add_argument("--modes", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_MODES)}")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode (median reported)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps before the timed ones (the last counts the saved bytes); >= 1")
    p.add_argument("--mem-steps", type=int, default=1, help="steps with the RSS sampler (max reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1,
                   help="run every mode this many times, interleaved, and keep the run with the median time")
    p.add_argument("--quick", action="store_true", help="ResNet-20, batch 32, 4 modes, 3 steps: < 1 min")
    p.add_argument("--json", metavar="OUT", help="write every child's result (and the machine) here")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                   help="print before/after ratio tables from two --json files and exit")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        args.batch = args.batch[0] if isinstance(args.batch, list) else args.batch
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    if args.compare:
        compare(*args.compare)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import machine_info, parse_mode

    if args.quick:
        args.models, args.batch, args.steps, args.warmup, args.mem_steps = ["resnet20"], [32], 3, 1, 1
        args.modes = args.modes or QUICK_MODES
    modes = args.modes or DEFAULT_MODES
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the last warm-up step counts the saved bytes)")
    for m in modes:
        parse_mode(m)  # fail before any child starts
    if "dense" not in modes:
        modes = ["dense", *modes]
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"bench_step: {info['cpu']}, {info['nproc']} cores, torch {info['torch']}, {args.threads} threads; "
          f"warm-up {args.warmup}, {args.steps} timed steps, {args.mem_steps} memory steps; fresh process per mode")
    start = time.perf_counter()
    results = []
    for model in args.models:
        for batch in args.batch:
            runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
            for _ in range(args.repeat):
                for mode in modes:
                    r = run_child(model, batch, mode, args)
                    runs[mode].append(r)
                    if "error" in r:
                        print(f"  {model:<9} b{batch:<4} {mode:<17} ERROR {r['error']}", flush=True)
                    else:
                        print(f"  {model:<9} b{batch:<4} {mode:<17} {r['ms']:8.1f} ms  cpu {r['cpu_ms']:8.1f} ms  "
                              f"peak +{r['peak_mib']:7.1f} MiB  saved {r['saved_mib']:7.1f} MiB  "
                              f"(load {r['load_before']:.1f}, {r['child_s']:.0f} s)", flush=True)
            for mode in modes:
                ok = sorted((r for r in runs[mode] if "error" not in r), key=lambda r: r["ms"])
                results.append(ok[len(ok) // 2] if ok else runs[mode][-1])
    total = time.perf_counter() - start
    print(f"\nratios to dense from this run (total {total:.0f} s):")
    print_tables(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": {k: v for k, v in vars(args).items() if k not in ("child",)},
                       "total_s": round(total, 1), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
