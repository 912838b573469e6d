"""Data-parallel training under torchrun (gloo on CPU), mid-epoch checkpoints, and one writer per run directory.

The multi-process tests launch real processes (``python -m torch.distributed.run``) on real data and read what they
leave behind; each rank of the DDP run also dumps its final weights and weight masks (through a wrapper of the
public ``train.finalize``), so the test can compare the ranks with each other.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sparsetrain import distributed, runs
from sparsetrain.data.loader import BatchLoader, epoch_seed
from sparsetrain.runs import RunDir

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _loader(n=50, batch=8, **kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 6, 6, 1), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 10
    return BatchLoader(x, y, batch, mean=(0.5,), std=(0.25,), shuffle=True, crop_padding=2, hflip=True, seed=3, **kw)


# ------------------------------------------------------------------------------------------- the sharded loader
@pytest.mark.parametrize("world", [2, 3, 4])
def test_shards_partition_each_global_batch_identically(world):
    """Every rank draws the same order and augmentation for the whole global batch and keeps its slice: the ranks'
    slices, concatenated, are the single-process batch bit for bit, and each sample appears once per epoch."""
    full = list(_loader())
    shards = [list(_loader().shard(r, world)) for r in range(world)]
    # 50 = 6 x 8 + 2: the 2-sample tail is split on 2 ranks and dropped on 3 or 4 (every rank must step)
    assert all(len(s) == (7 if world == 2 else 6) for s in shards)
    for b, (x, y) in enumerate(full[:len(shards[0])]):
        assert torch.equal(torch.cat([s[b][0] for s in shards]), x)
        assert torch.equal(torch.cat([s[b][1] for s in shards]), y)
    seen = torch.cat([s[b][1] for s in shards for b in range(len(s))])
    assert len(seen) == (50 if world == 2 else 48)


def test_training_loader_drops_a_tail_smaller_than_the_world():
    loader = _loader(n=49, batch=8).shard(1, 2)  # last global batch: 1 sample for 2 ranks
    assert len(loader) == 6 and len(_loader(n=49, batch=8)) == 7
    assert all(len(y) == 4 for _, y in loader)


def test_start_batch_continues_an_epoch_exactly():
    """``set_epoch(e, start_batch=k)`` yields batches k.. of epoch e as an uninterrupted pass does (the skipped
    batches' augmentation is still drawn, so the generator is where it would be)."""
    a, b = _loader(), _loader()
    a.set_epoch(2)
    full = list(a)
    b.set_epoch(2, start_batch=3)
    rest = list(b)
    assert len(rest) == len(full) - 3
    for (x1, y1), (x2, y2) in zip(full[3:], rest):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert b.epoch == 3  # a finished pass moves on; the next one starts at batch 0
    assert torch.equal(next(iter(b))[1], next(iter(_loader_at(3)))[1])


def _loader_at(epoch):
    loader = _loader()
    loader.set_epoch(epoch)
    return loader


def test_shard_and_start_batch_validate():
    with pytest.raises(ValueError, match="rank must be in"):
        _loader().shard(2, 2)
    with pytest.raises(ValueError, match="start_batch must be in"):
        _loader().set_epoch(0, start_batch=99)
    assert epoch_seed(0, 0) != epoch_seed(0, 1)


def test_rank_seed_keeps_rank_zero_and_fits_numpy():
    assert distributed.rank_seed(7, 0) == 7
    seeds = {distributed.rank_seed(7, r) for r in range(1, 64)}
    assert len(seeds) == 63 and all(0 <= s < 2 ** 32 for s in seeds)


# ------------------------------------------------------------------------------------------- two processes (gloo)
_WORKER = textwrap.dedent("""
    import os, sys, torch
    import sparsetrain.training.loop as T
    from sparsetrain.cli import main

    real = T.finalize

    def finalize(s):
        # each rank leaves its final weights and weight-derived sparsity state for the test to compare
        torch.save({"model": s.model.state_dict(), "shared": s.handle.shared_state(),
                    "world": s.env.world_size, "rank": s.env.rank},
                   os.path.join(sys.argv[1], f"rank{s.env.rank}.pt"))
        return real(s)

    T.finalize = finalize
    sys.exit(main(sys.argv[2:]))
""")


def _torchrun(tmp_path, nproc, args, timeout=600):
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    dumps = tmp_path / "dumps"
    dumps.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(worker),
           str(dumps), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV), dumps


def test_two_processes_train_one_model_then_resume_on_one(tmp_path, data_root, require_dataset):
    require_dataset("mnist")
    out = tmp_path / "run"
    args = ["train", "--model", "lenet5", "--dataset", "mnist", "--data-dir", str(data_root), "--recipe", "swat-u",
            "--density", "0.2", "--epochs", "2", "--train-subset", "4000", "--test-subset", "1000", "--batch-size",
            "64", "--lr", "0.05", "--quiet", "--check-consistency", "10", "--out", str(out)]
    proc, dumps = _torchrun(tmp_path, 2, args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("sparsetrain train: finished") == 1  # rank 0 prints

    r0, r1 = (torch.load(dumps / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k  # weights and BN buffers alike
    assert r0["shared"].keys() == r1["shared"].keys() and any(".thresholds.weight" in k for k in r0["shared"])
    for k in r0["shared"]:
        assert torch.equal(r0["shared"][k], r1["shared"][k]), k

    run = RunDir(out)
    metrics = run.read_metrics()
    assert [m["epoch"] for m in metrics] == [0, 1]  # one line per epoch: rank 0 alone writes
    assert all(m["world_size"] == 2 for m in metrics)
    assert metrics[-1]["test_acc"] > 0.5  # chance is 0.1
    assert metrics[-1]["densities"]["conv2"]["weight"] == pytest.approx(0.2, abs=0.01)
    files = sorted(p.name for p in out.iterdir())
    assert files.count("checkpoint.pt") == 1 and "summary.json" in files
    ckpt = runs.load_checkpoint(out)
    assert ckpt["world_size"] == 2 and len(ckpt["ranks"]) == 2
    # A global batch of 64 on 2 ranks takes the same number of steps per epoch as one process.
    assert metrics[-1]["step"] == 2 * (4000 // 64 + 1)

    # The same run continues on one process (the loader re-shards; rank 0's streams go on).
    from sparsetrain.cli import main

    assert main(["train", "--resume", str(out), "--epochs", "3", "--quiet"]) == 0
    metrics = run.read_metrics()
    assert [m["epoch"] for m in metrics] == [0, 1, 2] and "world_size" not in metrics[-1]
    assert metrics[-1]["test_acc"] > 0.5


# ------------------------------------------------------------------------------------------- mid-epoch checkpoints
def _run_args(out, *extra):
    return [sys.executable, "-m", "sparsetrain", "train", "--epochs", "2", "--train-subset", "6000", "--test-subset",
            "500", "--batch-size", "16", "--quiet", "--checkpoint-every", "7", "--out", str(out), *extra]


def _wait_for(predicate, proc, timeout=120.0):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, "the run ended before the test could act: " + proc.stdout.read()
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.01)


def test_sigkill_inside_an_epoch_resumes_exactly_from_checkpoint_every(tmp_path):
    """World size 1: a run killed inside an epoch resumes from its last intra-epoch checkpoint and ends with the
    same weights (and the same metrics, apart from times) as a run that was never interrupted."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert subprocess.run(_run_args(ref), capture_output=True, text=True, env=ENV, timeout=600).returncode == 0

    victim = subprocess.Popen(_run_args(cut), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        _wait_for(lambda: RunDir(cut).has_checkpoint(), victim)
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.wait()
    ckpt = runs.load_checkpoint(cut)
    assert ckpt.get("in_epoch") is not None and ckpt["in_epoch"]["epoch"] == 0, "killed after the epoch ended"
    done = ckpt["step"]
    assert 0 < done < 375 and done % 7 == 0

    proc = subprocess.run([sys.executable, "-m", "sparsetrain", "train", "--resume", str(cut), "--quiet"],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = runs.load_checkpoint(ref), runs.load_checkpoint(cut)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["step"] == b["step"] == 750
    ma, mb = RunDir(ref).read_metrics(), RunDir(cut).read_metrics()
    assert len(ma) == len(mb) == 2
    for x, y in zip(ma, mb):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "densities", "curve"):
            assert x[key] == y[key], key


# ------------------------------------------------------------------------------------------- one writer per run
def test_second_process_on_a_run_directory_fails_at_once(tmp_path):
    out = tmp_path / "run"
    args = [a for a in _run_args(out) if a not in ("--checkpoint-every", "7")]  # no checkpoint inside epoch 1
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        _wait_for(lambda: RunDir(out).config_path.exists(), first)
        t0 = time.time()
        second = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=120)
        assert second.returncode == 2, second.stderr
        assert "in use by another sparsetrain run" in second.stderr and f"pid {first.pid}" in second.stderr
        assert time.time() - t0 < 60
        # --resume of a run still in progress is refused the same way
        _wait_for(lambda: RunDir(out).has_checkpoint(), first)
        resume = subprocess.run([sys.executable, "-m", "sparsetrain", "train", "--resume", str(out), "--quiet"],
                                capture_output=True, text=True, env=ENV, timeout=120)
        if first.poll() is None:
            assert resume.returncode == 2 and "in use by another sparsetrain run" in resume.stderr, resume.stderr
    finally:
        rest, _ = first.communicate(timeout=600)
    assert first.returncode == 0, rest
    assert [m["epoch"] for m in RunDir(out).read_metrics()] == [0, 1]


def test_a_killed_run_does_not_block_its_resume(tmp_path):
    out = tmp_path / "run"
    victim = subprocess.Popen(_run_args(out, "--epochs", "1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=ENV)
    try:
        _wait_for(lambda: RunDir(out).has_checkpoint(), victim)
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.wait()
    proc = subprocess.run([sys.executable, "-m", "sparsetrain", "train", "--resume", str(out), "--quiet"],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(RunDir(out).summary_path.read_text())["final_test_acc"] > 0.3


# ------------------------------------------------------------------------------------------- per-rank state
def test_set_rank_gives_ranks_their_own_pruning_noise():
    """Rank 0 keeps the single-process streams; another rank prunes the same gradient with other noise."""
    import sparsetrain
    from sparsetrain.models import create_model

    def grads(rank):
        torch.manual_seed(0)
        model = create_model("lenet5", num_classes=10, in_channels=1)
        handle = sparsetrain.sparsify_(model, "grad-prune", p=0.9)
        handle.set_rank(rank)
        x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()], handle

    base, h0 = grads(0)
    again, _ = grads(0)
    other, h1 = grads(1)
    assert all(torch.equal(a, b) for a, b in zip(base, again))
    assert not all(torch.equal(a, b) for a, b in zip(base, other))
    # The state that must agree across ranks is the same for both ranks (nothing weight-derived is random here).
    assert h0.shared_state().keys() == h1.shared_state().keys()


def _consistency_worker(rank, world, init_file, perturb, result_file):
    import torch.distributed as dist

    import sparsetrain
    from sparsetrain.models import create_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = create_model("lenet5", num_classes=10, in_channels=1)
        handle = sparsetrain.sparsify_(model, "swat-u", density=0.3)
        model(torch.randn(2, 1, 28, 28)).sum().backward()  # thresholds and masks exist now
        env = distributed.DistEnv(rank, world)
        distributed.check_consistency(model, handle.shared_state(), env, step=1)
        if perturb and rank == 1:
            with torch.no_grad():
                model.conv2.weight.view(-1)[5] += 1e-3
        try:
            distributed.check_consistency(model, handle.shared_state(), env, step=2)
            outcome = "ok"
        except distributed.ConsistencyError as e:
            outcome = str(e)
        Path(f"{result_file}.{rank}").write_text(outcome)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("perturb", [False, True], ids=["identical", "one-weight-differs"])
def test_check_consistency_fails_loudly_on_every_rank(tmp_path, perturb):
    import torch.multiprocessing as mp

    result = tmp_path / "result"
    mp.spawn(_consistency_worker, args=(2, str(tmp_path / "init"), perturb, str(result)), nprocs=2)
    outcomes = [Path(f"{result}.{r}").read_text() for r in (0, 1)]
    if not perturb:
        assert outcomes == ["ok", "ok"]
    else:
        for text in outcomes:
            assert "step 2: state that must be identical on all 2 ranks differs: param conv2.weight" in text
