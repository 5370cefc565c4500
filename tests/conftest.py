"""Shared test fixtures: a tiny UNet (a few thousand parameters) and small real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_UNET, run_cli, tiny_config

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def alexnet_home(tmp_path_factory):
    """A torch hub cache holding a randomly initialised AlexNet (float16 halves the file; loading casts)."""
    import torchvision

    from wherefrom.evaluation.distances import ALEXNET_FILE

    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    state = {k: v.half() for k, v in torchvision.models.alexnet(weights=None).state_dict().items()}
    torch.save(state, home / "hub" / "checkpoints" / ALEXNET_FILE)
    return home


@pytest.fixture
def float64():
    """float64 as the default dtype for the test."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def tiny_unet() -> dict:
    return dict(TINY_UNET)


@pytest.fixture(scope="session")
def ddp_runs(tmp_path_factory) -> dict[int, Path]:
    """One tiny run (lr = 0, so the weights stay at their seeded init; float64; 2 epochs) fitted in this
    process and with 2 DDP processes (CPU, gloo), captured in one fit by TRAKFeatures (after epoch 1 and
    after training, ``store``), KFACFactors after training (2 passes, EK-FAC, ``after``) and during
    training (``during``). Returns each run's folder by rank count (its checkpoint: ``run/last.ckpt``)."""
    from wherefrom import cli

    roots = {}
    for devices in (1, 2):
        root = tmp_path_factory.mktemp(f"ddp{devices}")
        kfac = {"class_path": "wherefrom.callbacks.KFACFactors", "init_args": {"batch_size": 5}}
        callbacks = [
            {"class_path": "wherefrom.callbacks.TRAKFeatures",
             "init_args": {"store": str(root / "store"), "timesteps": 3, "proj_dim": 64, "every_n_epochs": 1, "batch_size": 5}},
            {**kfac, "init_args": {**kfac["init_args"], "store": str(root / "after"), "passes": 2, "ekfac": True}},
            {**kfac, "init_args": {**kfac["init_args"], "store": str(root / "during"), "mode": "during"}},
        ]  # fmt: skip
        cfg = tiny_config(root, callbacks, lr=0.0, precision="64-true", epochs=2)
        if devices == 1:
            cli.main(["fit", "--config", str(cfg)])
        else:
            r = run_cli("fit", "--config", str(cfg), "--trainer.devices", "2", "--trainer.strategy", "ddp", cwd=root)
            assert r.returncode == 0, r.stderr[-3000:]
        roots[devices] = root
    return roots
