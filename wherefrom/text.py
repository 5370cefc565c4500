"""Text conditioning: a frozen transformers text encoder (e.g. CLIP's) and its tokenizer.

A datamodule with ``text_encoder=folder`` and ``captions`` embeds every image's caption
once (the encoder's last hidden state over ``max_length`` padded tokens, as Stable
Diffusion's pipelines pass it) and serves it as the item's ``"cond"``, which a
``UNet2DConditionModel`` receives as ``encoder_hidden_states`` everywhere a network is
evaluated (training, sampling, features, factors, measurements, ablation). The empty
caption's embedding is classifier-free guidance's null condition.

The folder holds ``tokenizer/`` and ``text_encoder/`` (the Stable Diffusion layout) or
both in one folder; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from wherefrom.errors import CheckpointError, WherefromError, one_line
from wherefrom.io import weights_hash


class TextEncoder:
    """Captions -> ``B x L x D`` embeddings with a frozen encoder, in batches."""

    def __init__(self, path: str | Path, batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging

        logging.disable_progress_bar()  # a local load; its bars would interleave with the commands' one-line errors
        path = Path(path)
        tok_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else path
        enc_dir = path / "text_encoder" if (path / "text_encoder").is_dir() else path
        if not (enc_dir / "config.json").is_file():
            raise CheckpointError(f"text_encoder {str(path)!r} holds no transformers model (config.json, or text_encoder/config.json)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            self.model = AutoModel.from_pretrained(enc_dir).eval().requires_grad_(False)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot load the tokenizer and text encoder in {str(path)!r} ({one_line(e)})") from None
        self.max_length = min(int(self.tokenizer.model_max_length), int(self.model.config.max_position_embeddings))
        self.batch_size = batch_size
        self.fingerprint = weights_hash(self.model)

    @torch.no_grad()
    def embed(self, captions: list[str]) -> Tensor:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise WherefromError("captions must be a list of strings")
        out = []
        for s in range(0, len(captions), self.batch_size):
            ids = self.tokenizer(list(captions[s : s + self.batch_size]), padding="max_length", max_length=self.max_length,
                                 truncation=True, return_tensors="pt").input_ids  # fmt: skip
            out.append(self.model(input_ids=ids).last_hidden_state.float())
        return torch.cat(out)


def read_captions(spec: str | list[str], num_images: int, labels=None, names: list[str] | None = None) -> list[str]:
    """One caption per image of the index space: a list, a text file (one per line), or
    ``"labels"``: ``names[label]`` of the source's class labels."""
    if spec == "labels":
        if labels is None or names is None:
            raise WherefromError("captions='labels' needs a source with labels and class names; pass a file of captions")
        captions = [names[int(y)] for y in labels]
    elif isinstance(spec, str):
        path = Path(spec)
        if not path.is_file():
            raise WherefromError(f"captions file {spec!r} does not exist; give one caption per line, one line per image")
        captions = path.read_text().splitlines()
    else:
        captions = list(spec)
    if len(captions) != num_images:
        raise WherefromError(f"captions must give one caption per image ({num_images}), got {len(captions)}")
    return captions


__all__ = ["TextEncoder", "read_captions"]
