"""The top-K DDP communication hook (sparsetrain.comm), on two real gloo processes.

Every tensor a rank hands to a collective is recorded (torch.distributed's functions are wrapped in the worker), and
so is every bucket's local gradient (a hook around ``topk_hook``); the checks are then made in parameter space,
because DDP changes its buckets after the first iteration.
"""

import copy
import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from sparsetrain.comm import MIN_START_ITER, TopKCompressionState, register_topk_hook, topk_hook

WORLD = 2
STEPS = 6
DENSITY = 0.2
# Two buckets after DDP's rebuild: [2.bias, 2.weight, 0.bias] (31 entries) and [0.weight] (35).
BUCKET_CAP_MB = 0.0001


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)


def _train(ddp: nn.Module, rank: int, steps: int, on_step=None) -> None:
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(steps):
        if on_step is not None:
            on_step(step)
        x, y = _batch(rank, step)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()


class _Recorder:
    """Wraps the collectives and the hook: per bucket call, the local gradient, the tensors sent and the result."""

    def __init__(self) -> None:
        self.wire: list[tuple[str, torch.Tensor]] = []
        self.calls: list[dict] = []
        self.step = -1
        for name in ("all_reduce", "all_gather_single", "all_gather_into_tensor"):
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def recorded(*args, **kwargs):
            tensor = args[0] if name == "all_reduce" else args[1]
            self.wire.append((name, tensor.detach().clone()))
            return fn(*args, **kwargs)
        return recorded

    def hook_for(self, model: nn.Module):
        names = {id(p): n for n, p in model.named_parameters()}

        def hook(state, bucket):
            start = len(self.wire)
            call = {"step": self.step, "grad": bucket.buffer().clone(),
                    "layout": [(names[id(p)], p.numel()) for p in bucket.parameters()]}
            fut = topk_hook(state, bucket)
            call["wire"] = self.wire[start:]

            def done(f):
                call["result"] = f.value().clone()
                self.calls.append(call)
                return f.value()
            return fut.then(done)
        return hook


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        rec = _Recorder()
        out = {}

        # (a) top-K with error feedback
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=BUCKET_CAP_MB)
        state = TopKCompressionState(density=DENSITY, model=model)
        ddp.register_comm_hook(state, rec.hook_for(model))
        _train(ddp, rank, STEPS, on_step=lambda s: setattr(rec, "step", s))
        out["calls"], rec.calls = rec.calls, []
        out["state"] = state.state_dict()

        # resumed: the saved residual goes out with the first (dense) iteration of a new DDP model
        model2 = _model()
        model2.load_state_dict(model.state_dict())
        ddp2 = nn.parallel.DistributedDataParallel(model2, bucket_cap_mb=BUCKET_CAP_MB)
        state2 = TopKCompressionState(density=DENSITY, model=model2)
        state2.load_state_dict(copy.deepcopy(out["state"]))
        ddp2.register_comm_hook(state2, rec.hook_for(model2))
        rec.step = STEPS
        _train(ddp2, rank, 1)
        out["resumed_calls"] = rec.calls
        out["resumed_state"] = state2.state_dict()
        out["resumed_residuals_in_memory"] = len(state2.residuals)

        # (b) density 1.0 against plain DDP, from the same weights on the same data
        exact, plain = _model(), _model()
        ddp_exact = nn.parallel.DistributedDataParallel(exact, bucket_cap_mb=BUCKET_CAP_MB)
        register_topk_hook(ddp_exact, density=1.0)
        ddp_plain = nn.parallel.DistributedDataParallel(plain, bucket_cap_mb=BUCKET_CAP_MB)
        _train(ddp_exact, rank, STEPS)
        _train(ddp_plain, rank, STEPS)
        out["exact"] = {n: p.detach().clone() for n, p in exact.named_parameters()}
        out["plain"] = {n: p.detach().clone() for n, p in plain.named_parameters()}
        torch.save(out, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two ranks recorded."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("comm")
    ctx = mp.start_processes(_worker, args=(str(tmp),), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 300  # a hang must fail the test, not the suite
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two gloo workers did not finish")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _per_param(vector: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, numel in layout:
        out[name] = vector[offset:offset + numel]
        offset += numel
    assert offset == vector.numel()
    return out


def _sent(call) -> torch.Tensor:
    """What the rank sent in one bucket call, as a dense vector of the bucket."""
    if [name for name, _ in call["wire"]] == ["all_reduce"]:
        return call["wire"][0][1] * WORLD  # dense: the averaging hook divides by the world size before the sum
    (_, values), (_, indices) = call["wire"]
    dense = torch.zeros_like(call["grad"])
    dense[indices.long()] = values
    return dense


def _sum_by_param(calls, key) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for call in calls:
        vector = _sent(call) if key == "sent" else call[key]
        for name, part in _per_param(vector, call["layout"]).items():
            total[name] = total.get(name, 0) + part
    return total


def test_sent_plus_residual_is_the_sum_of_the_local_gradients(ranks):
    for rank in ranks:
        assert sorted({c["step"] for c in rank["calls"]}) == list(range(STEPS))
        assert [len(c["wire"]) for c in rank["calls"] if c["step"] < MIN_START_ITER] == [1] * 3  # 1 bucket, then 2
        assert all(len(c["wire"]) == 2 for c in rank["calls"] if c["step"] >= MIN_START_ITER)  # values, indices
        sent, grads = _sum_by_param(rank["calls"], "sent"), _sum_by_param(rank["calls"], "grad")
        residual = rank["state"]["residuals"]
        assert sorted(residual) == sorted(grads) and any(r.abs().sum() > 0 for r in residual.values())
        for name in grads:
            torch.testing.assert_close(sent[name] + residual[name], grads[name], rtol=1e-5, atol=1e-6)


def test_every_rank_gets_the_average_of_what_the_ranks_sent(ranks):
    by_step = [{} for _ in ranks]
    for r, rank in enumerate(ranks):
        for call in rank["calls"]:
            for name, part in _per_param(call["result"], call["layout"]).items():
                by_step[r][(call["step"], name)] = (part, _per_param(_sent(call), call["layout"])[name])
    assert by_step[0].keys() == by_step[1].keys()
    for key, (result0, sent0) in by_step[0].items():
        result1, sent1 = by_step[1][key]
        assert torch.equal(result0, result1), key  # bit for bit: the replicas must not drift apart
        assert torch.equal(result0, (sent0 + sent1) / WORLD), key
        if key[0] >= MIN_START_ITER:
            assert torch.count_nonzero(sent0) <= math.ceil(DENSITY * 35)


def test_byte_counter_matches_the_tensors_sent(ranks):
    for rank in ranks:
        on_wire = sum(t.numel() * t.element_size() for c in rank["calls"] for _, t in c["wire"])
        expected = 0
        for c in rank["calls"]:
            n = c["grad"].numel()
            expected += n * 4 if c["step"] < MIN_START_ITER else math.ceil(DENSITY * n) * (4 + 4)  # float32, int32
        last = sum(t.numel() * t.element_size() for c in rank["calls"] if c["step"] == STEPS - 1 for _, t in c["wire"])
        state = rank["state"]
        assert state["bytes_sent"] == on_wire == expected and state["last_step_bytes"] == last > 0
        assert state["iter"] == STEPS
        assert all(t.dtype == torch.int32 for c in rank["calls"] for name, t in c["wire"][1:])


def test_a_resumed_state_sends_its_residual_with_the_first_step(ranks):
    for rank in ranks:
        calls = rank["resumed_calls"]
        assert {c["step"] for c in calls} == {STEPS} and all(len(c["wire"]) == 1 for c in calls)  # dense
        sent, grads = _sum_by_param(calls, "sent"), _sum_by_param(calls, "grad")
        residual = rank["state"]["residuals"]
        for name in grads:
            torch.testing.assert_close(sent[name], grads[name] + residual[name], rtol=1e-5, atol=1e-6)
        resumed = rank["resumed_state"]
        assert resumed["iter"] == STEPS + 1 and resumed["residuals"] == {} and rank["resumed_residuals_in_memory"] == 0
        assert resumed["bytes_sent"] == rank["state"]["bytes_sent"] + 66 * 4  # one dense step of all 66 gradients


def test_density_one_is_plain_ddp_exactly(ranks):
    for rank in ranks:
        assert rank["exact"].keys() == rank["plain"].keys()
        for name, weight in rank["exact"].items():
            assert torch.equal(weight, rank["plain"][name]), name


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), True, "0.1", None])
def test_bad_density_is_rejected(density):
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
        TopKCompressionState(density=density)


@pytest.mark.parametrize("start_iter", [0, 1, 2.0])
def test_bad_start_iter_is_rejected(start_iter):
    with pytest.raises(ValueError, match=f"start_iter must be an integer >= {MIN_START_ITER}"):
        TopKCompressionState(start_iter=start_iter)


def test_k_rounds_up_and_sends_at_least_one():
    state = TopKCompressionState(density=0.07)
    assert [state.k(n) for n in (1, 10, 100, 101)] == [1, 1, 7, 8]
    assert TopKCompressionState(density=1.0).k(33) == 33


def test_loading_residuals_needs_the_parameter_names():
    with pytest.raises(ValueError, match="created without model="):
        TopKCompressionState().load_state_dict({"iter": 3, "bytes_sent": 10, "residuals": {"0.weight": torch.ones(2)}})
    with pytest.raises(ValueError, match="no parameters named so"):
        TopKCompressionState(model=_model()).load_state_dict(
            {"iter": 3, "bytes_sent": 10, "residuals": {"fc9.weight": torch.ones(2)}})
