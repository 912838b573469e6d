"""The Lightning callback (sparsetrain.integrations.lightning): a tiny model is fitted, checkpointed, resumed with
``ckpt_path=`` and compared with an uninterrupted fit; densities reach the trainer's logger; DDP on CPU."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="lightning not installed (pip install 'sparsetrain[lightning]')")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from sparsetrain.integrations.lightning import SparsityCallback  # noqa: E402

# The tiny model and data, also written into the DDP script below (one definition).
MODEL_SOURCE = '''
import torch, torch.nn as nn, torch.nn.functional as F
import lightning.pytorch as pl


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                   nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
'''
_ns: dict = {}
exec(compile(MODEL_SOURCE, "<tiny model>", "exec"), _ns)
Tiny, loader = _ns["Tiny"], _ns["loader"]

# threshold_period 3 with 4 steps per epoch: a resume at an epoch end lands inside a threshold period, so it is
# exact only if the cached thresholds come back from the checkpoint.
RECIPE = dict(density=0.25, first_layer_dense=False, threshold_period=3)


def _trainer(tmp_path: Path, epochs: int, **kw) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                      enable_model_summary=False, log_every_n_steps=2, default_root_dir=tmp_path, **kw)


def _fit(tmp_path: Path, epochs: int, ckpt_path=None, checkpoint_dir=None, logger=False):
    module, cb = Tiny(), SparsityCallback("swat-u", module="model", **RECIPE)
    callbacks = [cb] + ([ModelCheckpoint(dirpath=checkpoint_dir, save_last=True)] if checkpoint_dir else [])
    trainer = _trainer(tmp_path, epochs, callbacks=callbacks, logger=logger,
                       enable_checkpointing=checkpoint_dir is not None)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return module, cb, trainer


def test_fit_sparsifies_steps_and_logs_densities(tmp_path):
    module, cb, trainer = _fit(tmp_path, 2, logger=CSVLogger(tmp_path, name="log"))
    assert sorted(cb.handle.layers) == ["0", "2", "5"]
    assert cb.handle.step_count == trainer.global_step == 8
    # The forward really uses a quarter of each weight.
    w = cb.handle.densities()["2"]["weight"]
    assert w == pytest.approx(0.25, abs=0.01)
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = [r for r in rows if r.get("density/weight")]
    assert [int(r["step"]) for r in logged] == [1, 3, 5, 7]  # steps 0, 2, 4, 6 measured; logged after their step
    assert float(logged[-1]["density/weight"]) == pytest.approx(cb.last_densities["density/weight"])
    assert 0.24 < float(logged[-1]["density/weight"]) < 0.26  # every layer sparse here
    assert 0 < float(logged[-1]["density/2/activation"]) <= 0.26
    # The checkpoint-free module is the dense model's state_dict layout.
    assert set(module.state_dict()) == set(Tiny().state_dict())


def test_ckpt_path_resumes_exactly(tmp_path, caplog):
    full, _, _ = _fit(tmp_path / "full", 4)
    _, first, _ = _fit(tmp_path / "a", 2, checkpoint_dir=tmp_path / "ckpt")
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("SparsityCallback")]
    assert state["handle"]["step"] == 8
    resumed, cb, trainer = _fit(tmp_path / "b", 4, ckpt_path=last)
    assert trainer.global_step == cb.handle.step_count == 16
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # Without the callback's state the cached thresholds are lost and the run drifts: the state is what makes it exact.
    del saved["callbacks"]
    torch.save(saved, tmp_path / "stripped.ckpt")
    with caplog.at_level(logging.WARNING, logger="sparsetrain.integrations.lightning"):
        drifted, _, _ = _fit(tmp_path / "c", 4, ckpt_path=tmp_path / "stripped.ckpt")
    assert "resuming at optimizer step 8 but the sparsity state is at step 0" in caplog.text
    assert not all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), drifted.state_dict().values()))


def test_bad_submodule_names_the_children(tmp_path):
    trainer = _trainer(tmp_path, 1, callbacks=[SparsityCallback("swat-u", module="net")], logger=False,
                       enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"module='net'.*no such submodule; its children: model"):
        trainer.fit(Tiny(), loader())
    with pytest.raises(ValueError, match="log_every_n_steps must be an integer >= 0"):
        SparsityCallback(log_every_n_steps=-1)


DDP_SCRIPT = MODEL_SOURCE + '''
import json, sys
import torch.distributed as dist
from sparsetrain.integrations.lightning import SparsityCallback

if __name__ == "__main__":
    out = sys.argv[1]
    cb = SparsityCallback("swat-u", module="model", density=0.25, first_layer_dense=False)
    module = Tiny()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", callbacks=[cb],
                         enable_progress_bar=False, enable_model_summary=False, logger=False,
                         enable_checkpointing=False, log_every_n_steps=1)
    trainer.fit(module, loader())
    flat = torch.cat([p.detach().flatten() for p in module.parameters()])
    sums = [torch.zeros(2) for _ in range(2)]
    dist.all_gather(sums, torch.stack([flat.sum(), (flat * flat).sum()]))
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
        json.dump({"world": trainer.world_size, "steps": cb.handle.step_count, "global_step": trainer.global_step,
                   "layers": sorted(cb.handle.layers), "sums": [s.tolist() for s in sums],
                   "density": cb.last_densities.get("density/weight")}, f)
    # Leave the process group before the interpreter exits: gloo's threads torn down at exit can abort the process
    # ("terminate called without an active exception", seen once in ~10 runs).
    dist.barrier()
    dist.destroy_process_group()
'''


@pytest.mark.slow  # two processes importing torch and lightning: ~20 s on 2 shared cores
def test_ddp_strategy_on_cpu(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["world"] == 2 and r["layers"] == ["0", "2", "5"]
        # 64 samples, global batch 2 x 16: 2 steps per epoch.
        assert r["steps"] == r["global_step"] == 4
        assert r["density"] == pytest.approx(0.25, abs=0.01)
    # Every rank ends with the same weights (DDP averaged the sparse gradients).
    assert results[0]["sums"][0] == pytest.approx(results[0]["sums"][1], rel=0, abs=0)
