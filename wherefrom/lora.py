"""LoRA adapters (Hu et al. 2022) on diffusers UNets, through peft.

A LoRA model freezes its base UNet (random, a wherefrom checkpoint's or a diffusers export's
weights) and trains rank-``r`` adapters ``W + (alpha / r) B A`` on the ``target_modules``
(default: the attention projections, as in D-TRAK's LoRA experiments). Only the adapters
have ``requires_grad``, so TRAK / D-TRAK gradients and K-FAC factors cover the adapters alone.
An encoded ensemble's members are adapters on *one* frozen base: the members' base
parameters are the same tensors (:func:`share_frozen`), so memory is base + n adapters.

Adapters export in the diffusers layout: ``pytorch_lora_weights.safetensors`` (peft keys
under the ``unet.`` prefix, as diffusers' LoRA loaders read them) and ``adapter_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from wherefrom.errors import CheckpointError, WherefromError, one_line
from wherefrom.io import atomic_path, write_json

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
WEIGHTS, CONFIG = "pytorch_lora_weights.safetensors", "adapter_config.json"
PREFIX = "unet."


def lora_config(options: dict[str, Any]):
    """A peft ``LoraConfig`` from the module's ``lora`` option: ``r`` (default 4), ``alpha``
    (default ``r``), ``target_modules`` (default :data:`DEFAULT_TARGETS`). Dropout is 0: features
    and factors need a deterministic network."""
    from peft import LoraConfig

    unknown = sorted(set(options) - {"r", "alpha", "target_modules"})
    if unknown:
        raise WherefromError(f"unknown lora option {unknown[0]!r}; the options are r, alpha and target_modules")
    r = int(options.get("r", 4))
    if r < 1:
        raise WherefromError(f"lora rank r must be >= 1, got {r}")
    return LoraConfig(r=r, lora_alpha=float(options.get("alpha", r)), target_modules=list(options.get("target_modules", DEFAULT_TARGETS)), lora_dropout=0.0)


def add_lora(unet: nn.Module, options: dict[str, Any], seed: int) -> nn.Module:
    """Freeze ``unet`` and inject a LoRA adapter initialised from ``seed`` (peft's init: ``B = 0``)."""
    from peft import inject_adapter_in_model

    config = lora_config(options)
    for p in unet.parameters():
        p.requires_grad_(False)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(config, unet)
        except ValueError as e:  # no module matches target_modules
            raise WherefromError(f"lora target_modules {config.target_modules} match no layer of the UNet ({e})") from None
    return unet


def read_base(path: str | Path) -> dict[str, torch.Tensor]:
    """A base UNet's weights: of a single-model wherefrom checkpoint (``.ckpt``) or a diffusers export folder."""
    from wherefrom.checkpoint import load_pretrained, read_checkpoint

    path = Path(path)
    if path.is_dir():
        return load_pretrained(path)[0].state_dict()
    ckpt = read_checkpoint(path)
    state = {k.removeprefix("unet."): v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")}
    if not state:
        raise CheckpointError(f"{str(path)!r} holds no single model's UNet (no 'unet.' weights); pass a `wherefrom fit` single-model checkpoint or an export folder")
    return state


def load_base(unet: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Copy base weights ``state`` (read from ``path``) into ``unet``, adapted or not: an adapted layer's
    weight is peft's ``base_layer.weight``; the adapters themselves are left as they are."""
    own = {k.replace(".base_layer", ""): k for k in unet.state_dict() if "lora_" not in k}
    if own.keys() != state.keys():
        example = sorted(own.keys() ^ state.keys())[0]
        raise CheckpointError(f"the base weights in {str(path)!r} do not fit the UNet config (e.g. {example!r}); use the base's unet config")
    try:
        unet.load_state_dict({own[k]: v for k, v in state.items()}, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"the base weights in {str(path)!r} do not fit the UNet config; use the base's unet config ({one_line(e)})") from None


def share_frozen(net: nn.Module, base: nn.Module) -> None:
    """Make ``net``'s frozen parameters the very tensors of ``base`` (same architecture; peft's
    ``base_layer`` renaming is undone), so ensemble members share one base in memory."""
    shared = dict(base.named_parameters())
    for name, module in net.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is not None and not p.requires_grad:
                key = f"{name}.{pname}".replace(".base_layer", "") if name else pname
                module._parameters[pname] = shared[key]


def adapter_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under peft's names (``...to_q.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def save_adapter(unet: nn.Module, options: dict[str, Any], path: str | Path) -> Path:
    """Write the adapter as diffusers LoRA weights plus its peft config; returns the folder."""
    path, config = Path(path), lora_config(options)
    with atomic_path(path / WEIGHTS) as tmp:
        save_file({PREFIX + k: v.detach().cpu().contiguous() for k, v in adapter_state(unet).items()}, str(tmp))
    write_json(path / CONFIG, {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)})
    return path


def load_adapter(unet: nn.Module, path: str | Path, seed: int = 0) -> nn.Module:
    """Inject and load an adapter written by :func:`save_adapter` into a (base) ``unet``."""
    from peft import set_peft_model_state_dict

    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise CheckpointError(f"{str(path)!r} holds no LoRA adapter ({WEIGHTS} and {CONFIG}); pass a folder written by `wherefrom export`")
    config = json.loads((path / CONFIG).read_text())
    add_lora(unet, {"r": config["r"], "alpha": config["lora_alpha"], "target_modules": config["target_modules"]}, seed)
    state = {k.removeprefix(PREFIX): v for k, v in load_file(str(path / WEIGHTS)).items()}
    result = set_peft_model_state_dict(unet, state)
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"the adapter in {str(path)!r} does not fit this UNet (e.g. {result.unexpected_keys[0]!r})")
    return unet


__all__ = ["DEFAULT_TARGETS", "add_lora", "adapter_state", "load_adapter", "load_base", "lora_config", "read_base", "save_adapter", "share_frozen"]
