"""Shared by the TRAK / D-TRAK tests: the CLI runner and a tiny run's config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import TINY_UNET

SUBSET = list(range(24))


def run_cli(*args: str, cwd: Path, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """``python -m wherefrom.cli ARGS`` (``popen=True``-style kwargs start it without waiting)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "wherefrom.cli", *args]
    if popen.pop("background", False):
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def tiny_config(root: Path, callbacks: list[dict] | None = None, lr: float = 1e-3, precision: str = "32-true", epochs: int = 1) -> Path:
    """A LightningCLI config: the tiny UNet (with attention) on 24 digits, checkpoint at ``root/run/last.ckpt``."""
    unet = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_UNET.items()}
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": epochs, "accelerator": "cpu", "devices": 1, "logger": False, "enable_model_summary": False,
            "default_root_dir": str(root),  # LightningCLI saves config.yaml there, not in the cwd
            "enable_progress_bar": False, "precision": precision,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(root / "run"), "filename": "last", "enable_version_counter": False}},
                          *(callbacks or [])],
        },
        "model": {"class_path": "wherefrom.DiffusionModel", "init_args": {"unet": unet, "lr": lr, "warmup": 0.0}},
        "data": {"class_path": "wherefrom.DigitsDataModule", "init_args": {"batch_size": 8, "subset": SUBSET}},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tiny_checkpoint(root: Path):
    """A tiny model trained one epoch (lr 3e-3) on SUBSET, saved as ``root/model.ckpt``; returns (model, datamodule)."""
    import lightning as L

    from wherefrom.datamodules import DigitsDataModule
    from wherefrom.model import DiffusionModel

    L.seed_everything(0)
    model = DiffusionModel(unet=dict(TINY_UNET), lr=3e-3, warmup=0.0)
    dm = DigitsDataModule(batch_size=8, subset=SUBSET)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, dm)
    trainer.save_checkpoint(root / "model.ckpt")
    return model, dm
