"""sparsetrain's caching CPU allocator (``_native/allocator.cpp`` via :mod:`sparsetrain.allocator`).

Most checks run in a fresh interpreter: the allocator is process-wide, and the test process itself runs under it
once any test has called ``sparsify_`` (which is itself a check: the whole suite passes on top of it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import sparsetrain as st
from sparsetrain._native import build_native

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the caching allocator needs mmap")


def _native_or_skip():
    if build_native() is None:
        pytest.skip("native kernels unavailable")


def _run(code: str, **env: str) -> str:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "SPARSETRAIN_ALLOCATOR"))}
    e.update(env)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def test_install_serves_reuses_and_bounds_the_cache():
    _native_or_skip()
    out = _run("""
        import torch, sparsetrain as st
        assert st.allocator.allocator_kind() == "default" and st.allocator_stats() == {}
        assert st.lean_allocator() is True and st.lean_allocator() is True    # idempotent
        assert st.allocator.allocator_kind() == "caching"
        a = torch.arange(1 << 20, dtype=torch.float32)                        # 4 MiB: mapped
        assert a.data_ptr() % 64 == 0 and a[12345].item() == 12345.0
        s0 = st.allocator_stats(); assert s0["live_bytes"] >= 4 << 20, s0
        p = a.data_ptr(); del a
        b = torch.empty(1 << 20)                                              # the same size class: the cached block
        assert b.data_ptr() == p and st.allocator_stats()["hits"] == s0["hits"] + 1
        small = torch.ones(10); assert small.sum().item() == 10 and small.data_ptr() % 64 == 0
        z = torch.empty(0); z2 = torch.empty(3, 0)                            # zero-size tensors
        r = torch.zeros(100); r.resize_(1 << 18); r.fill_(2.0); assert r.sum().item() == 2.0 * (1 << 18)
        n = torch.ones(1 << 18).numpy(); assert n.sum() == 1 << 18           # numpy views our memory
        # live + cached stays within 1/16 of the live peak, plus the block being mapped
        for size in [1 << 18, 3 << 18, 5 << 18, 7 << 18, 9 << 18] * 20:
            t = torch.empty(size); del t
        s = st.allocator_stats()
        assert s["mapped_bytes"] <= s["peak_live_bytes"] * 17 // 16 + (9 << 20), s
        st.allocator.empty_cache(); assert st.allocator_stats()["cached_bytes"] == 0
        assert st.restore_allocator() is True and st.allocator.allocator_kind() == "default"
        del b                                                                 # freed after restore: still fine
        c = torch.randn(1 << 20); assert st.allocator_stats() == {}
        print("ok")
    """)
    assert out == "ok"


def test_opt_out_and_sparsify_installs_once_on_cpu_models():
    _native_or_skip()
    code = """
        import torch, torch.nn as nn, sparsetrain as st
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
        st.sparsify_(m, "swat-u", density=0.25, first_layer_dense=False)
        print(st.allocator.allocator_kind())
    """
    assert _run(code) == "caching"
    assert _run(code, SPARSETRAIN_ALLOCATOR="default") == "default"
    assert _run("import sparsetrain as st; print(st.lean_allocator())", SPARSETRAIN_ALLOCATOR="default") == "False"
    assert _run("import torch, sparsetrain; print(sparsetrain.allocator.allocator_kind())") == "default"  # import
    with pytest.warns(RuntimeWarning, match="SPARSETRAIN_ALLOCATOR='defualt' is not one of default, system"):
        os.environ["SPARSETRAIN_ALLOCATOR"] = "defualt"
        try:
            from sparsetrain.allocator import _opted_out

            assert _opted_out() is False
        finally:
            del os.environ["SPARSETRAIN_ALLOCATOR"]


def test_bad_threshold_is_a_clear_error():
    for bad in (0, 100, -5, 1.5, "1M", True):
        with pytest.raises(ValueError, match="threshold must be an integer number of bytes >= 4096"):
            st.lean_allocator(bad)


def test_training_is_bit_identical_and_fork_safe_under_the_allocator():
    """The same SWAT steps with and without the allocator (uninitialised memory must never reach a result), then a
    DataLoader with forked workers (the allocator's lock across fork)."""
    _native_or_skip()
    code = """
        import hashlib, torch, torch.nn.functional as F, sparsetrain as st
        torch.manual_seed(0); torch.set_num_threads(2)
        m = st.create_model("resnet20", num_classes=10)
        h = st.sparsify_(m, "swat-u", density=0.1)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        x = torch.randn(32, 3, 32, 32); y = torch.randint(0, 10, (32,))
        for _ in range(3):
            opt.zero_grad(set_to_none=True); F.cross_entropy(m(x), y).backward(); opt.step(); h.step(opt)
        ds = torch.utils.data.TensorDataset(torch.randn(64, 3, 8, 8), torch.arange(64))
        dl = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, multiprocessing_context="fork")
        assert sum(int(b[1].sum()) for b in dl) == sum(range(64))
        hsh = hashlib.sha256()
        for v in m.state_dict().values():
            hsh.update(v.detach().contiguous().numpy().tobytes())
        print(st.allocator.allocator_kind(), hsh.hexdigest())
    """
    on = _run(code).split()
    off = _run(code, SPARSETRAIN_ALLOCATOR="default").split()
    assert on[0] == "caching" and off[0] == "default"
    assert on[1] == off[1]


def test_rss_follows_live_tensors_in_a_fragmenting_pattern():
    """Big transients freed between small survivors (a sparse forward's pattern): glibc's heap keeps the freed
    pages; under the allocator the peak RSS stays near the live peak."""
    _native_or_skip()
    code = """
        import sys, torch, sparsetrain as st
        if sys.argv[1] == "on":
            st.lean_allocator()
        def hwm():
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) << 10
        base = hwm(); keep = []
        for step in range(3):
            for i in range(40):
                big = torch.ones((1 << 20) + i * 4096)     # ~4 MiB transient, a slightly different size each time
                keep.append(big[: 1 << 16].clone())        # a 256 KiB survivor
                del big
            keep.clear()
        print((hwm() - base) >> 20)
    """
    on = int(_run(code.replace("sys.argv[1]", '"on"')))
    assert on < 40, on  # live peak ~14 MiB (40 survivors + one transient); glibc's heap here grows far beyond


def test_composed_blocks_keep_every_live_tensor_intact_and_a_repeating_step_maps_nothing_new():
    """A request no cached block matches is composed of cached pages of other sizes (mremap); random sizes with
    every live tensor's content checked after each allocation (a moved page must never be one still in use), then
    a chain of growing transients (a few new mappings: the pieces add up until one is mapped whole), then a step's
    pattern (activations, then gradients of other sizes): after warm-up served from the cache's pages (a few small
    remainders fault); the process's mapping count stays bounded."""
    _native_or_skip()
    out = _run("""
        import random, resource, torch, sparsetrain as st
        st.lean_allocator(); random.seed(0)
        live = {}
        for i in range(1500):
            if live and (len(live) > 24 or random.random() < 0.45):
                live.pop(random.choice(list(live)))
            n = random.choice([1 << 15, 3 << 15, 1 << 17, 5 << 16, 1 << 19, 3 << 18, 1 << 20, 9 << 17])
            n += random.randrange(0, 8192)
            live[i] = torch.full((n,), float(i))
            for k, t in live.items():
                assert t[0].item() == k and t[-1].item() == k and t[len(t) // 2].item() == k, (i, k)
        s = st.allocator_stats(); assert s["composed"] > 0 and s["moves"] > 0, s
        live.clear()
        def chain():  # each transient a little larger than the one freed before it: composed from its pages
            keep = []
            for j in range(6):
                big = torch.ones((1 << 20) + j * 65536)
                keep.append(torch.ones((3 << 17) + j * 8192))
                del big
        s0 = st.allocator_stats()
        for _ in range(20):  # the pieces of a chain add up until a composition is mapped anew: now and then
            chain()
        assert st.allocator_stats()["misses"] - s0["misses"] <= 8
        st.allocator.empty_cache()
        def step():  # a training step's shape: activations kept, then gradients of other sizes while they go
            acts = [torch.ones((1 << 20) >> i) for i in range(4)]
            for i in reversed(range(4)):
                g = torch.ones(((3 << 19) >> i) + 4096 * i)
                acts[i] = g[:10].clone()
                del g
            return sum(float(a.sum()) for a in acts)
        for _ in range(3):
            step()
        s0 = st.allocator_stats(); f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            assert step() == 40.0
        s1 = st.allocator_stats(); faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        assert s1["composed"] - s0["composed"] >= 20, (s0, s1)               # not served by its own sizes
        # The gradients mapped anew each step would fault ~2,800 pages per step (56k here); composed, the small
        # remainders and a block now and then (~5k).
        assert faults < 12000, (faults, s0, s1)
        assert s1["mapped_bytes"] <= s1["peak_live_bytes"] * 17 // 16 + (4 << 20), s1
        assert len(open("/proc/self/maps").readlines()) < 2000
        print("ok")
    """)
    assert out == "ok"


def test_cli_applies_it_by_default_and_the_flag_turns_it_off():
    from sparsetrain.cli import build_parser
    from sparsetrain.commands.train import resolve_config
    from sparsetrain.training import TrainConfig

    def cfg(*argv):
        return TrainConfig.from_dict(resolve_config(build_parser().parse_args(["train", *argv])))

    assert cfg().lean_allocator is True
    assert cfg("--no-lean-allocator").lean_allocator is False
    assert cfg("--lean-allocator").lean_allocator is True
