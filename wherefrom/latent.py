"""Latent diffusion: a frozen diffusers ``AutoencoderKL`` between the images and the model.

A datamodule with ``vae=folder`` encodes its images once (the posterior mean times the
VAE's ``scaling_factor``, Rombach et al. 2022, Sec. 3) and serves the latents as its
``"image"``s, keyed by the same global indices; training, sampling, features, factors and
every score then work on latents unchanged. Grids decode them (:meth:`LatentCodec.decode`).
``latent_cache=file`` keeps the latents on disk, checked against the VAE's weights and the
source images before reuse.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from wherefrom.errors import CheckpointError, WherefromError, one_line
from wherefrom.io import atomic_path, tensor_hash, weights_hash


class LatentCodec:
    """A frozen ``AutoencoderKL`` from a diffusers folder: :meth:`encode` images in [-1, 1] to
    scaled latents and :meth:`decode` them back (clamped to [-1, 1]), in batches."""

    def __init__(self, path: str | Path, batch_size: int = 64) -> None:
        from diffusers import AutoencoderKL

        path = Path(path)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"vae {str(path)!r} is not a diffusers AutoencoderKL folder (no config.json); pass the folder of AutoencoderKL.save_pretrained")
        try:
            self.vae = AutoencoderKL.from_pretrained(path).eval().requires_grad_(False)
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"cannot load the AutoencoderKL in {str(path)!r} ({one_line(e)})") from None
        self.batch_size = batch_size
        self.scale = float(self.vae.config.scaling_factor)
        self.fingerprint = weights_hash(self.vae)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        out = [self.vae.encode(images[s : s + self.batch_size]).latent_dist.mean * self.scale for s in range(0, len(images), self.batch_size)]
        return torch.cat(out).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        latents = latents.float().cpu()
        out = [self.vae.decode(latents[s : s + self.batch_size] / self.scale).sample for s in range(0, len(latents), self.batch_size)]
        return torch.cat(out).clamp(-1, 1)

    def encode_cached(self, images: Tensor, cache: str | Path | None) -> Tensor:
        """:meth:`encode`, read from / written to ``cache`` (a ``.safetensors`` file) when given."""
        if cache is None:
            return self.encode(images)
        from safetensors import safe_open
        from safetensors.torch import save_file

        cache, key = Path(cache), {"vae": self.fingerprint, "images": tensor_hash([images])}
        if cache.is_file():
            try:
                with safe_open(str(cache), "pt") as f:
                    meta, stored = f.metadata() or {}, f.get_tensor("latents")
            except Exception as e:  # noqa: BLE001 - any unreadable file is a damaged cache
                raise WherefromError(f"latent cache {str(cache)!r} is unreadable ({type(e).__name__}); delete it to re-encode") from None
            if {k: meta.get(k) for k in key} != key or len(stored) != len(images):
                raise WherefromError(f"latent cache {str(cache)!r} was made from other images or another VAE; delete it or pass another latent_cache")
            return stored
        latents = self.encode(images)
        with atomic_path(cache) as tmp:
            save_file({"latents": latents.contiguous()}, str(tmp), metadata=key)
        return latents


__all__ = ["LatentCodec"]
