"""Latent diffusion: a tiny randomly initialised ``AutoencoderKL`` (from a config, no download)
encodes the digits once; the model trains, samples and is attributed on latents keyed by the
same global indices, and grids show decoded images."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import (
    SUBSET,
    TINY_UNET,
    attribute_every_method,
    cli,
    tiny_config,
    tiny_vae,
)
from wherefrom import DTRAK, EKFAC, load_module
from wherefrom.attribution.api import ATTRIBUTORS
from wherefrom.checkpoint import load_datamodule
from wherefrom.datamodules import DigitsDataModule
from wherefrom.ensemble import EncodedEnsemble
from wherefrom.errors import WherefromError
from wherefrom.latent import LatentCodec

LATENT_UNET = {**TINY_UNET, "sample_size": 4, "in_channels": 4}  # 4 x 4 x 4 latents of 1 x 8 x 8 digits


def test_latents_are_the_scaled_posterior_means_cached_and_checked(tmp_path, monkeypatch):
    vae = tiny_vae(tmp_path / "vae")
    dm = DigitsDataModule(subset=SUBSET, vae=str(tmp_path / "vae"), latent_cache=str(tmp_path / "latents.safetensors"))
    assert dm.image_shape == (4, 4, 4) and dm.num_images == 1797
    pixels = DigitsDataModule().images[:5]
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        torch.testing.assert_close(dm.images[:5], expected)
        torch.testing.assert_close(dm.decode(dm.images[:2]), vae.decode(expected[:2] / vae.config.scaling_factor).sample.clamp(-1, 1))
    monkeypatch.setattr(LatentCodec, "encode", lambda self, x: pytest.fail("re-encoded despite a valid cache"))
    again = DigitsDataModule(subset=SUBSET, vae=str(tmp_path / "vae"), latent_cache=str(tmp_path / "latents.safetensors"))
    torch.testing.assert_close(again.images, dm.images, rtol=0, atol=0)
    tiny_vae(tmp_path / "other", seed=1)
    with pytest.raises(WherefromError, match="another VAE"):
        DigitsDataModule(vae=str(tmp_path / "other"), latent_cache=str(tmp_path / "latents.safetensors")).setup()
    with pytest.raises(WherefromError, match="not a diffusers AutoencoderKL folder"):
        DigitsDataModule(vae=str(tmp_path)).setup()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A latent model from `wherefrom fit` and a latent encoded ensemble."""
    from wherefrom.cli import main

    root = tmp_path_factory.mktemp("latent")
    tiny_vae(root / "vae")
    latent = ["--data.vae", str(root / "vae"), "--data.latent_cache", str(root / "latents.safetensors")]
    fit = ["fit", "--config", str(tiny_config(root, lr=3e-3)), "--model.unet", json.dumps(LATENT_UNET), *latent]
    with pytest.raises(SystemExit):  # latents are unbounded: clipping x0 to [-1, 1] is refused before training
        main(fit)
    main([*fit, "--model.clip_sample", "false"])
    L.seed_everything(0)
    ens = EncodedEnsemble(n=4, w=2, unet=dict(LATENT_UNET), lr=1e-3, seed=5, clip_sample=False)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(ens, DigitsDataModule(batch_size=4, subset=list(range(2, 8)), vae=str(root / "vae")))
    trainer.save_checkpoint(root / "ens.ckpt")
    return root, root / "run" / "last.ckpt", root / "ens.ckpt"


def _tile_size(png, columns: int) -> int:
    """The side of a grayscale grid's tiles (wherefrom's grids: 1-pixel padding, then 4x upscaling)."""
    image = Image.open(png)
    assert image.mode == "L"  # one channel: decoded digits, not 4-channel latents
    return (image.width // 4 - 1) // columns - 1


def test_latent_model_is_sampled_and_attributed_on_latents_with_decoded_grids(runs, tmp_path, capsys):
    root, ckpt, ens = runs
    code, err = cli(capsys, "sample", "--ckpt", str(ckpt), "--num-samples", "3", "--steps", "4", "--out", str(tmp_path / "s"))
    assert code == 0, err
    assert np.load(tmp_path / "s" / "samples.npy").shape == (3, 4, 4, 4)  # latents, for attribute --queries
    assert _tile_size(tmp_path / "s" / "samples.png", 3) == 8  # decoded 8 x 8 digits
    queries = ["--queries", str(tmp_path / "s" / "samples.npy"), "--top-k", "3"]
    scores = attribute_every_method(capsys, ckpt, tmp_path, queries, ens, ["--num-samples", "2", "--steps", "3"])
    assert set(scores) == set(ATTRIBUTORS) and (scores["ablation"][:, 2:8] != 0).all()
    module, data = load_module(ckpt), load_datamodule(ckpt)
    latents = torch.from_numpy(np.load(tmp_path / "s" / "samples.npy"))
    for method, attributor in [("dtrak", DTRAK(store=str(tmp_path / "store_dtrak"))), ("ekfac", EKFAC(store=str(tmp_path / "store_trak"), timesteps=2))]:
        api = attributor.attribute(module, data, latents)
        np.testing.assert_allclose(scores[method], api.scores, rtol=1e-5, atol=1e-6 * np.abs(api.scores).max())  # CLI == API
        assert _tile_size(tmp_path / f"scores_{method}" / "topk.png", 4) == 8  # decoded grids
    assert np.load(tmp_path / "scores_ablation" / "counterfactuals.npy").shape == (2, 2, 4, 4, 4)
    assert _tile_size(tmp_path / "scores_ablation" / "counterfactuals.png", 3) == 8
