"""diffusers interop: an encoded ensemble's pipeline survives save_pretrained / from_pretrained and
samples exactly what the Lightning checkpoint samples, with and without exact ablation."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tests.helpers import TINY_UNET
from wherefrom import EncodedEnsemblePipeline
from wherefrom.checkpoint import load_module
from wherefrom.datamodules import DigitsDataModule
from wherefrom.ensemble import EncodedEnsemble
from wherefrom.errors import WherefromError


def test_pipeline_round_trip_equals_the_checkpoints_samples(tmp_path):
    dm = DigitsDataModule(batch_size=10, subset=list(range(20)))
    module = EncodedEnsemble(n=6, w=3, unet=TINY_UNET, lr=1e-3, warmup=0.0, seed=2)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, dm)
    trainer.save_checkpoint(tmp_path / "ens.ckpt")
    module = load_module(tmp_path / "ens.ckpt")

    EncodedEnsemblePipeline.from_module(module).save_pretrained(tmp_path / "pipe")
    pipe = EncodedEnsemblePipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.ensemble.codes.fingerprint == module.codes.fingerprint
    full = pipe(3, generator=torch.Generator().manual_seed(5), steps=4).images
    torch.testing.assert_close(full, module.generate(3, seed=5, steps=4), rtol=0, atol=0)
    ablated = pipe(3, generator=5, steps=4, scheduler="ddim", ablate=[4, 11]).images
    want = module.sampler(seed=5, steps=4, scheduler="ddim").ablate([4, 11], 3)
    torch.testing.assert_close(ablated, want, rtol=0, atol=0)
    assert not torch.equal(ablated, pipe(3, generator=5, steps=4, scheduler="ddim").images)
    assert len(pipe(2, generator=5, steps=2, output_type="pil").images) == 2
    with pytest.raises(WherefromError, match="ablate .* or weights"):
        pipe(1, ablate=[4], weights=torch.full((6,), 1 / 6))
