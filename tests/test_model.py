"""DiffusionModel: training lowers the loss, sampling is seeded, export round-trips, bad checkpoints fail clearly."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from wherefrom.checkpoint import load_datamodule, load_module, load_pretrained
from wherefrom.datamodules import DigitsDataModule
from wherefrom.errors import CheckpointError, WherefromError
from wherefrom.model import DiffusionModel
from wherefrom.sampling import generate
from wherefrom.task import predict


def _fit(tmp_path, unet, epochs=8, callbacks=(), **model_kwargs):
    L.seed_everything(0)
    model = DiffusionModel(unet=unet, lr=3e-3, warmup=0.0, **model_kwargs)
    dm = DigitsDataModule(batch_size=16, subset=list(range(64)))
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, callbacks=list(callbacks),
    )
    trainer.fit(model, dm)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    return model, dm, ckpt


def _heldout_loss(model, dm):
    with torch.no_grad():
        idx = torch.arange(64)
        return model.task.measure(model.unet, dm.images[idx], idx, "loss", draws=[(d, None) for d in range(4)]).mean()


def test_fit_lowers_loss_and_checkpoint_round_trips(tmp_path, tiny_unet):
    fresh = DiffusionModel(unet=tiny_unet)
    model, dm, ckpt = _fit(tmp_path, tiny_unet)
    before, after = _heldout_loss(fresh, dm), _heldout_loss(model, dm)
    assert after < 0.7 * before, (before, after)

    loaded = load_module(ckpt)
    assert isinstance(loaded, DiffusionModel)
    for a, b in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert load_datamodule(ckpt).fingerprint == dm.fingerprint

    # same seed -> same samples; another seed -> different
    s1 = loaded.generate(4, seed=3, steps=10)
    assert torch.equal(s1, loaded.generate(4, seed=3, steps=10))
    assert not torch.allclose(s1, loaded.generate(4, seed=4, steps=10))

    # diffusers export reloads with UNet2DModel.from_pretrained and gives the same samples
    loaded.save_pretrained(tmp_path / "export")
    unet, task = load_pretrained(tmp_path / "export")
    assert task.config == loaded.task.config
    with torch.no_grad():
        s2 = generate(lambda x, t: predict(unet, x, t), task, (1, 8, 8), 4, seed=3, steps=10)
    assert torch.allclose(s1, s2, atol=1e-6)


def test_ema_through_lightning_weight_averaging(tmp_path, tiny_unet):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    _, _, raw = _fit(tmp_path / "raw", tiny_unet, epochs=2)
    _, _, ema0 = _fit(tmp_path / "ema0", tiny_unet, epochs=2, callbacks=[EMAWeightAveraging(decay=0.0)])
    _, _, ema9 = _fit(tmp_path / "ema9", tiny_unet, epochs=2, callbacks=[EMAWeightAveraging(decay=0.9)])
    raw, ema0, ema9 = (list(load_module(c).unet.parameters()) for c in (raw, ema0, ema9))
    # decay 0 averages nothing: exactly the raw weights; decay 0.9 lags behind them
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(raw, ema0))
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(raw, ema9))


def test_hflip_augmentation_is_seeded(tiny_unet):
    from wherefrom.model import hflip

    x = torch.randn(32, 1, 8, 8)
    idx = torch.arange(32)
    a, b = hflip(x, idx, 0, 0), hflip(x, idx, 0, 0)
    assert torch.equal(a, b)
    flipped = (a != x).flatten(1).any(1)
    assert 5 < int(flipped.sum()) < 27
    assert torch.equal(a[flipped], x[flipped].flip(-1))
    assert not torch.equal(a, hflip(x, idx, 0, 1))


def test_bad_checkpoints(tmp_path, tiny_unet):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_module(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_module(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="does not say which LightningModule wrote it"):
        load_module(tmp_path / "foreign.ckpt")
    # resuming a checkpoint into another architecture
    _, dm, ckpt = _fit(tmp_path, tiny_unet, epochs=1)
    other = DiffusionModel(unet={**tiny_unet, "block_out_channels": (8, 8)})
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(CheckpointError, match="another architecture"):
        trainer.fit(other, dm, ckpt_path=ckpt)


def test_data_that_does_not_fit_the_unet(tiny_unet):
    model = DiffusionModel(unet={**tiny_unet, "in_channels": 3})
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(WherefromError, match="UNet expects"):
        trainer.fit(model, DigitsDataModule(subset=list(range(8))))
    with pytest.raises(WherefromError, match="warmup"):
        DiffusionModel(warmup=1.5)
