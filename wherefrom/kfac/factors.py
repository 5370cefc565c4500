"""Per-layer K-FAC factor math: the tracked layers, their activation and output-gradient factors
(expand / reduce, Eschenhagen et al. 2023, eq. 7 and 9), and EK-FAC's squared Kronecker-eigenbasis gradients."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wherefrom.errors import WherefromError
from wherefrom.kfac.geometry import (
    conv_out_size,
    conv_patch_gram,
    patches,
    toeplitz_gram,
    window_sums,
)

MC_TAG = 1  # extra seed word separating the MC pseudo-target noise from the (t, eps) draws
# Grosse et al. (2023): lambda = 0.1 x mean eigenvalue; on the LDS benchmark's tuning queries with K = 100
# gradient draws LDS is flat from 0.01 to 0.1 (within 0.01) and falls above (benchmarks/tune_defaults.py)
HEURISTIC_DAMPING = 0.1


class Curvature(str, enum.Enum):
    """Which GGN estimate K-FAC's output-gradient factor ``G`` uses (see module docstring)."""

    MC = "mc"
    EMPIRICAL = "empirical"
    TYPE2 = "type-2"


class KFACApprox(str, enum.Enum):
    """K-FAC for weight sharing (Eschenhagen et al. 2023)."""

    EXPAND = "expand"
    REDUCE = "reduce"


Layer = nn.Linear | nn.Conv2d


def tracked_layers(model: nn.Module) -> dict[str, Layer]:
    """Every trained ``nn.Linear`` and ``nn.Conv2d`` of ``model`` (weight with ``requires_grad``; with LoRA
    adapters, the adapters' layers only) by qualified name."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad}
    for name, m in layers.items():
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise WherefromError(f"K-FAC supports only groups=1 convolutions; layer {name!r} has groups={m.groups}")
    if not layers:
        raise WherefromError("the model has no trained nn.Linear or nn.Conv2d layers for K-FAC")
    return layers


def layer_dims(layer: Layer) -> tuple[int, int]:
    """``(d_out, d_in)`` of the layer's weight matrix with the bias column folded in."""
    d_out = layer.weight.shape[0]
    return d_out, layer.weight[0].numel() + (layer.bias is not None)


def activation_factor(layer: Layer, x: Tensor, approx: KFACApprox) -> tuple[Tensor, Tensor | None, int]:
    """This batch's ``sum a a^T``, ``sum a`` (``None`` without a bias) and number of terms:
    with the bias folded in, ``A += [[a a^T, a], [a^T, 1]]`` summed over the terms."""
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        rows = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, R, d_in)
        if approx is KFACApprox.REDUCE:
            rows = rows.mean(1, keepdim=True)
        flat = rows.reshape(-1, rows.shape[-1])
        return flat.T @ flat, flat.sum(0) if bias else None, flat.shape[0]
    n = x.shape[0]
    ho, wo = conv_out_size(layer, x.shape[2], x.shape[3])
    if approx is KFACApprox.REDUCE:
        mean = window_sums(x, layer, ho, wo) / (ho * wo)  # abar_n, (B, C k k)
        return mean.T @ mean, mean.sum(0) if bias else None, n
    count = n * ho * wo
    if toeplitz_gram(layer, x, count):
        return conv_patch_gram(x, layer), window_sums(x.sum(0), layer, ho, wo) if bias else None, count
    u = patches(x, layer).reshape(count, -1)
    return u.T @ u, u.sum(0) if bias else None, count


def positions(layer: Layer, t: Tensor) -> Tensor:
    """A layer's output (or output gradient) as ``B x R x d_out``."""
    if isinstance(layer, nn.Conv2d):
        return t.flatten(2).transpose(1, 2)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def gradient_factor(layer: Layer, g: Tensor, approx: KFACApprox) -> Tensor:
    """This batch's contribution to ``G`` from output gradients ``g``."""
    conv = isinstance(layer, nn.Conv2d)
    if approx is KFACApprox.REDUCE:  # ghat_n = sum over positions
        rows = g.sum((2, 3)) if conv else g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
        return rows.T @ rows
    cols = g.transpose(0, 1).reshape(g.shape[1], -1) if conv else g.reshape(-1, g.shape[-1]).T
    return cols @ cols.T


def inputs_with_bias(layer: Layer, x: Tensor) -> Tensor:
    """Per-example inputs at every position, ``B x R x d_in`` (bias column included)."""
    a = patches(x, layer) if isinstance(layer, nn.Conv2d) else x.reshape(x.shape[0], -1, x.shape[-1])
    return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], -1) if layer.bias is not None else a


def kfe_square(a: Tensor, g: Tensor, qa: Tensor, qg: Tensor) -> Tensor:
    """``sum_n (Q_G^T grad_n Q_A)^2`` with ``grad_n = sum_r g_{n,r} a_{n,r}^T`` (George et al. 2018, eq. 10).

    ``a``: ``B x R x d_in``, ``g``: ``B x R x d_out``. The contraction order is the
    cheaper of rotating every position first or forming per-example gradients first.
    """
    r, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    if r * (d_in * d_in + d_out * d_out) <= d_in * d_out * (d_in + d_out):
        kfe = (g @ qg).transpose(1, 2) @ (a @ qa)
    else:
        kfe = qg.T @ (g.transpose(1, 2) @ a) @ qa
    return kfe.pow(2).sum(0)



@dataclass
class LayerEigen:
    """Eigendecomposition of one layer's normalised factors (float64)."""

    qa: Tensor
    la: Tensor
    qg: Tensor
    lg: Tensor
