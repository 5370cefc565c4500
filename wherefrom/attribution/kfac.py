"""Kronecker-factored curvature (K-FAC / EK-FAC) of the diffusion training loss.

For every ``nn.Linear`` and ``nn.Conv2d`` (attention projections included) with
weight ``W`` (``d_out x d_in``, a conv flattened to ``d_out x C k_h k_w``) and the
bias folded in as an extra input column, the block of the curvature ``F`` of the
training objective ``(1/N) sum_n E_(t, eps) l_n`` is approximated as
``F_W ~ A (x) G`` (Martens & Grosse 2015, eq. 1-2), where, for the row-major
vectorisation ``vec(W)`` used throughout, ``F_W = kron(G, A)``.

Weight sharing (conv positions, attention tokens; ``R`` positions per example),
Eschenhagen et al. (2023), eq. 7 and 9:

- ``expand``: ``A = sum_{n,r} a a^T / (N R)``, ``G = sum_{n,r} g g^T / N``
- ``reduce``: ``A = sum_n abar abar^T / N`` with ``abar`` the mean over positions,
  ``G = sum_n ghat ghat^T / N`` with ``ghat`` the sum over positions.

Statistics are kept as sums plus counts and normalised late (kronfluence), so
DDP only ever sums them.

Curvature types. The loss of an example is ``l = ||f - y||^2 / D`` (``D`` output
entries, ``task.py``), whose Hessian in ``f`` is ``(2/D) I = S S^T`` with
``S = sqrt(2/D) I``. The GGN is ``J^T S S^T J``; K-FAC needs vectors ``r`` with
``E[r r^T] = S S^T`` to backpropagate through the network (``g = J^T r`` per layer):

- ``type-2``: the ``D`` columns of ``S`` (exact GGN, ``D`` backward passes).
- ``mc``: ``r = sqrt(2/D) z``, ``z ~ N(0, I)``. Equivalently: ``D l`` is, up to a
  constant, the negative log-likelihood of ``y ~ N(f, I/2)``; draw one
  pseudo-target ``y' = f + z / sqrt(2)`` per example; the Fisher of that
  likelihood is the GGN of ``D l``, so the GGN of ``l`` is
  ``(1/D) E[grad_f(D l(y')) grad_f(D l(y'))^T]`` and
  ``sqrt(D) grad_f l(y') = (2/sqrt(D)) (f - y') = -sqrt(2/D) z``.
- ``empirical``: the same with the real target: ``r = (2/sqrt(D)) (f - eps)``,
  so all three estimate the same matrix when the model's residuals have the
  variance 1/2 its loss implies (the empirical Fisher, with that scaling).

EK-FAC (George et al. 2018, eq. 10): in the Kronecker eigenbasis
``Q_G (x) Q_A`` of the K-FAC factors, replace the eigenvalues by the second
moments ``E_n[(Q_G^T grad_W l_n Q_A)^2]`` of per-example (pseudo-)gradients,
measured in an extra pass.

Damping (default): per layer, ``lambda_l = 0.1 * mean`` of that layer's
(EK-)FAC eigenvalues (Grosse et al. 2023, "Studying large language model
generalization with influence functions", Sec. 2.2; kronfluence's heuristic).
It is invariant to rescaling the loss and each layer's parametrisation, and
it uses only training-set curvature, never an evaluation set. An absolute
``damping`` overrides it.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from wherefrom.attribution.features import Comm, LocalComm, gather, on_rank_zero, weights_hash
from wherefrom.attribution.store import Store
from wherefrom.errors import ArgumentParser, FingerprintMismatchError, WherefromError
from wherefrom.task import DiffusionTask, Stream, generator_for, predict_eps

_MC_TAG = 1  # extra seed word separating the MC pseudo-target noise from the (t, eps) draws
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
    """Every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` by qualified name."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    for name, m in layers.items():
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise WherefromError(f"K-FAC supports only groups=1 convolutions; layer {name!r} has groups={m.groups}")
    if not layers:
        raise WherefromError("the model has no nn.Linear or nn.Conv2d layers for K-FAC")
    return layers


def layer_dims(layer: Layer) -> tuple[int, int]:
    """``(d_out, d_in)`` of the layer's weight matrix with the bias column folded in."""
    d_out = layer.weight.shape[0]
    return d_out, layer.weight[0].numel() + (layer.bias is not None)


# --- per-layer activations --------------------------------------------------------


def _conv_out_size(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    (ph, pw) = _padding(conv)
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _padding(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):  # "same"/"valid": read the resolved amounts
        p = conv._reversed_padding_repeated_twice
        if p[0] != p[1] or p[2] != p[3]:
            raise WherefromError("K-FAC needs symmetric conv padding; use an explicit padding=(ph, pw)")
        return p[2], p[0]
    return conv.padding


def _padded(x: Tensor, conv: nn.Conv2d) -> Tensor:
    ph, pw = _padding(conv)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, (pw, pw, ph, ph), mode=mode) if ph or pw else x


def _fast_conv(conv: nn.Conv2d) -> bool:
    """Stride 1, dilation 1, zero padding: windows are rectangles and the Gram is Toeplitz."""
    return conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding_mode == "zeros"


def _window_sums(x: Tensor, conv: nn.Conv2d, ho: int, wo: int) -> Tensor:
    """``sum_r x_pad[..., s_r + delta]`` over the output positions ``r``, for each kernel offset
    ``delta``: ``(..., C, H, W) -> (..., C * k_h * k_w)`` in the weight's (channel-major) order."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    if not _fast_conv(conv):
        xp = _padded(x, conv)
        sums = [
            xp[..., i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw].sum((-2, -1))
            for i in range(kh)
            for j in range(kw)
        ]
        return torch.stack(sums, -1).flatten(-2)
    # stride 1, zero padding: each window is a rectangle of x, summed from 2D prefix sums
    (ph, pw), (h, w) = _padding(conv), x.shape[-2:]
    prefix = F.pad(x.cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    r, q = torch.arange(kh, device=x.device), torch.arange(kw, device=x.device)
    r0, r1 = (r - ph).clamp(0, h), (r - ph + ho).clamp(0, h)
    c0, c1 = (q - pw).clamp(0, w), (q - pw + wo).clamp(0, w)
    rect = (
        prefix[..., r1[:, None], c1[None, :]]
        - prefix[..., r0[:, None], c1[None, :]]
        - prefix[..., r1[:, None], c0[None, :]]
        + prefix[..., r0[:, None], c0[None, :]]
    )
    return rect.flatten(-3)


def _patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """im2col patches ``B x R x C k_h k_w`` (the conv's input at each output position)."""
    return F.unfold(_padded(x, conv), conv.kernel_size, conv.dilation, 0, conv.stride).transpose(1, 2)


class _ShiftCorrelator:
    """``sum_{s in rows x cols} x[s] x[s + D]^T`` (over every example) for ranges of offsets ``D``,
    as matmuls over overlapping views of one zero-padded copy of ``x``.

    Layout ``C x rows x W' x B`` (examples innermost) with ``k_w - 1`` zero columns right of
    every row and ``k_h`` zero rows above and below: the sources in a row and a column range
    are one contiguous run, a row range is a batch of such runs, and a shift by ``D`` is a
    shift by ``(D_r W' + D_c) B`` of the flat index; whatever leaves the image lands on zeros.
    """

    def __init__(self, x: Tensor, kh: int, kw: int) -> None:
        self.c, self.b = x.shape[1], x.shape[0]
        self.kh, self.row = kh, (x.shape[3] + kw - 1) * x.shape[0]
        self.flat = F.pad(x.permute(1, 2, 3, 0), (0, 0, 0, kw - 1, kh, kh)).reshape(self.c, -1)

    def __call__(self, rows: range, cols: range, dr: range, dc: range) -> Tensor:
        """``(len(dr), len(dc), C, C)``."""
        start = self.flat.storage_offset() + (self.kh + rows.start) * self.row + cols.start * self.b
        shape, strides = (len(rows), self.c, len(cols) * self.b), (self.row, self.flat.shape[1], 1)
        sources = self.flat.as_strided(shape, strides, start)
        out = self.flat.new_empty(len(dr), len(dc), self.c, self.c)
        for i, d_r in enumerate(dr):
            for j, d_c in enumerate(dc):
                shifted = self.flat.as_strided(shape, strides, start + d_r * self.row + d_c * self.b)
                torch.sum(sources @ shifted.transpose(1, 2), 0, out=out[i, j])
        return out


def _conv_patch_gram(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``sum_{n,r} u u^T`` over the im2col patches ``u`` of a stride-1 zero-padded conv,
    without materialising the ``k^2``-times larger patch matrix.

    Entry ``[(c, d1), (c', d2)]`` is ``sum_{s in W(d1)} x[c, s] x[c', s + D]`` with
    ``D = d2 - d1`` and ``W(d1)`` the input positions kernel offset ``d1`` reads
    (Toeplitz structure). So it is ``T_D = sum_{all s} x[s] x[s + D]^T`` minus the
    sources in the border rows and columns outside ``W(d1)``, plus their corners
    (inclusion-exclusion). ``T`` needs ``(2k-1)^2 / 2`` products (``T_{-D} = T_D^T``)
    instead of the ``k^4 / 2`` blocks of ``U U^T``, and the border terms only the few
    offsets that stay inside the image; see :class:`_ShiftCorrelator`.
    """
    n, c, h, w = x.shape
    (kh, kw), (ph, pw) = conv.kernel_size, _padding(conv)
    ho, wo = _conv_out_size(conv, h, w)
    corr = _ShiftCorrelator(x, kh, kw)
    full = x.new_empty(2 * kh - 1, 2 * kw - 1, c, c)  # T, indexed D + k - 1
    for dr in range(kh):  # D > 0 lexicographically; T_{-D} = T_D^T
        dc = range(0 if dr == 0 else -kw + 1, kw)
        t = corr(range(h), range(w), range(dr, dr + 1), dc)[0]
        full[kh - 1 + dr, kw - 1 + dc.start :] = t
        full[kh - 1 - dr, : kw - dc.start] = t.flip(0).transpose(1, 2)

    def border(p: int, size: int, out: int, k: int) -> dict[int, tuple[list[int], range]]:
        """Border source -> (offsets d that miss it, the D that keep it inside the image)."""
        miss: dict[int, list[int]] = {}
        for d in range(k):  # offset d reads sources [d - p, d - p + out)
            for s in range(size):
                if not d - p <= s < d - p + out:
                    miss.setdefault(s, []).append(d)
        return {s: (ds, range(max(-max(ds), -s), min(k - 1 - min(ds), size - 1 - s) + 1)) for s, ds in miss.items()}

    rows, cols = border(ph, h, ho, kh), border(pw, w, wo, kw)
    every_dr, every_dc = range(-kh + 1, kh), range(-kw + 1, kw)
    r, q = torch.arange(kh, device=x.device), torch.arange(kw, device=x.device)
    dr_of, dc_of = r[None, :] - r[:, None] + kh - 1, q[None, :] - q[:, None] + kw - 1  # [d1, d2] -> D + k - 1
    a = full[dr_of.view(kh, 1, kh, 1), dc_of.view(1, kw, 1, kw)]  # (kh, kw, kh, kw, C, C): [d1r, d1c, d2r, d2c]
    for i, (d1s, dr) in rows.items():  # minus the sources in the rows offset d1 misses
        if dr:
            t = corr(range(i, i + 1), range(w), dr, every_dc)
            for d1, d2 in ((d1, d2) for d1 in d1s for d2 in range(kh) if d2 - d1 in dr):
                a[d1, :, d2] -= t[d2 - d1 - dr.start][dc_of]
    for j, (d1s, dc) in cols.items():  # minus the columns it misses
        if dc:
            t = corr(range(h), range(j, j + 1), every_dr, dc)
            for d1, d2 in ((d1, d2) for d1 in d1s for d2 in range(kw) if d2 - d1 in dc):
                a[:, d1, :, d2] -= t[:, d2 - d1 - dc.start][dr_of]
    for i, (r1s, dr) in rows.items():  # plus the corners, subtracted twice
        for j, (c1s, dc) in cols.items():
            if dr and dc:
                t = corr(range(i, i + 1), range(j, j + 1), dr, dc)
                for d1r, d1c, d2r, d2c in itertools.product(r1s, c1s, range(kh), range(kw)):
                    if d2r - d1r in dr and d2c - d1c in dc:
                        a[d1r, d1c, d2r, d2c] += t[d2r - d1r - dr.start, d2c - d1c - dc.start]
    return a.permute(4, 0, 1, 5, 2, 3).reshape(c * kh * kw, c * kh * kw)


# On a GPU a small layer's statistics are bound by kernel launches, not arithmetic: the
# Toeplitz Gram's ~30 small kernels lose to one im2col product there (digits UNet on an
# H100: 2.17 s vs 1.39 s per expand pass). Below this many flops the GPU uses im2col.
GPU_IM2COL_FLOPS = 1e10


def _toeplitz_gram(conv: nn.Conv2d, x: Tensor, positions: int) -> bool:
    """Whether :func:`_conv_patch_gram` beats forming the im2col patches for this layer."""
    if not _fast_conv(conv) or conv.kernel_size == (1, 1):
        return False
    return x.device.type == "cpu" or 2 * positions * (conv.weight[0].numel()) ** 2 > GPU_IM2COL_FLOPS


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
    ho, wo = _conv_out_size(layer, x.shape[2], x.shape[3])
    if approx is KFACApprox.REDUCE:
        mean = _window_sums(x, layer, ho, wo) / (ho * wo)  # abar_n, (B, C k k)
        return mean.T @ mean, mean.sum(0) if bias else None, n
    count = n * ho * wo
    if _toeplitz_gram(layer, x, count):
        return _conv_patch_gram(x, layer), _window_sums(x.sum(0), layer, ho, wo) if bias else None, count
    u = _patches(x, layer).reshape(count, -1)
    return u.T @ u, u.sum(0) if bias else None, count


def _positions(layer: Layer, t: Tensor) -> Tensor:
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


def _inputs_with_bias(layer: Layer, x: Tensor) -> Tensor:
    """Per-example inputs at every position, ``B x R x d_in`` (bias column included)."""
    a = _patches(x, layer) if isinstance(layer, nn.Conv2d) else x.reshape(x.shape[0], -1, x.shape[-1])
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


# --- hooks ------------------------------------------------------------------------------


@dataclass
class LayerEigen:
    """Eigendecomposition of one layer's normalised factors (float64)."""

    qa: Tensor
    la: Tensor
    qg: Tensor
    lg: Tensor


class FactorCollector:
    """Forward/backward hooks accumulating K-FAC sums and counts for every tracked layer.

    ``A`` is accumulated from each forward, ``G`` from each backward through the
    layer's output (several per forward for ``type-2``). Given ``eigen``, the hooks
    instead accumulate EK-FAC second moments in that eigenbasis (``lambda``).
    Hooks only record while :attr:`active` (see :meth:`recording`).

    Args:
        model: the network whose Linear/Conv2d layers are tracked.
        approx: ``expand`` or ``reduce``.
        eigen: per-layer eigenbases for an EK-FAC correction pass.
        dtype: accumulator dtype (sums are added in float64 by default).
    """

    def __init__(
        self,
        model: nn.Module,
        approx: KFACApprox | str = KFACApprox.EXPAND,
        eigen: dict[str, LayerEigen] | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.approx = KFACApprox(approx)
        self.layers = tracked_layers(model)
        self.eigen = eigen
        self.dtype = dtype
        self.grad_scale: Callable[[int], float] = lambda n: 1.0  # multiplies output gradients
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, float] = {}
        self._handles: list = []
        self.active = False  # hooks record only while True

    # --- state ----------------------------------------------------------------------
    def keys(self) -> list[str]:
        kinds = ("lambda", "lambda_count") if self.eigen is not None else ("A", "A_count", "G", "G_count")
        return [f"{name}/{k}" for name in self.layers for k in kinds]

    def model_device(self) -> torch.device:
        return next(iter(self.layers.values())).weight.device

    def _add(self, key: str, value: Tensor) -> None:
        if key in self.sums:
            self.sums[key] += value
        else:
            self.sums[key] = value.to(self.dtype)

    def _add_activations(self, name: str, gram: Tensor, colsum: Tensor | None, count: int) -> None:
        """``A += [[gram, colsum], [colsum^T, count]]`` in place (the bias folded in, no concatenation)."""
        key, d = f"{name}/A", gram.shape[0]
        if key not in self.sums:
            self.sums[key] = gram.new_zeros(self._shape(key), dtype=self.dtype)
        acc = self.sums[key]
        acc[:d, :d] += gram
        if colsum is not None:
            acc[:d, d] += colsum
            acc[d, :d] += colsum
            acc[d, d] += count

    def _count(self, key: str, n: int) -> None:
        self.counts[key] = self.counts.get(key, 0.0) + n

    def state_dict(self) -> dict[str, Tensor]:
        """Sums and counts (float64 scalars) on the CPU, keyed ``<layer>/<A|A_count|G|G_count|lambda|lambda_count>``."""
        state = {k: v.detach().cpu() for k, v in self.sums.items()}
        state.update({k: torch.tensor(v, dtype=torch.float64) for k, v in self.counts.items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        device = self.model_device()
        self.sums = {k: v.to(device=device, dtype=self.dtype) for k, v in state.items() if not k.endswith("_count")}
        self.counts = {k: float(v) for k, v in state.items() if k.endswith("_count")}

    def reset(self) -> None:
        self.sums, self.counts = {}, {}

    def reduce_(self, reduce_sum: Callable[[Tensor], Tensor]) -> None:
        """Sum the statistics across processes in one collective (every key on every rank;
        a rank that saw no data takes part with zeros)."""
        device = self.model_device()
        keys = self.keys()
        parts = []
        for k in keys:
            if k.endswith("_count"):
                parts.append(torch.tensor([self.counts.get(k, 0.0)], dtype=self.dtype, device=device))
            else:
                parts.append(self.sums.get(k, torch.zeros(self._shape(k), dtype=self.dtype, device=device)).reshape(-1))
        flat = reduce_sum(torch.cat(parts))
        offset = 0
        for k, part in zip(keys, parts):
            value = flat[offset : offset + part.numel()]
            offset += part.numel()
            if k.endswith("_count"):
                self.counts[k] = float(value)
            else:
                self.sums[k] = value.view(self._shape(k)).clone()

    def _shape(self, key: str) -> tuple[int, int]:
        name, kind = key.rsplit("/", 1)
        d_out, d_in = layer_dims(self.layers[name])
        return {"A": (d_in, d_in), "G": (d_out, d_out), "lambda": (d_out, d_in)}[kind]

    # --- hooks ----------------------------------------------------------------------
    def attach(self) -> None:
        """Register the forward hooks (they record only while :attr:`active`)."""
        if not self._handles:
            self._handles = [m.register_forward_hook(self._forward_hook(name)) for name, m in self.layers.items()]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def attached(self) -> Iterator[FactorCollector]:
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def _forward_hook(self, name: str):
        def hook(layer: Layer, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not self.active or not torch.is_grad_enabled():
                return
            x = inputs[0].detach()
            n = x.shape[0]
            with torch.no_grad():
                if self.eigen is None:
                    gram, colsum, count = activation_factor(layer, x, self.approx)
                    self._add_activations(name, gram, colsum, count)
                    self._count(f"{name}/A_count", count)
                    self._count(f"{name}/G_count", n)
                    saved = None
                else:
                    saved = _inputs_with_bias(layer, x)
                    self._count(f"{name}/lambda_count", n)
            if not output.requires_grad:  # parameters frozen for a factor pass: make the path differentiable
                output.requires_grad_(True)
            output.register_hook(lambda g: self._backward(name, layer, g.detach() * self.grad_scale(n), saved))

        return hook

    def _backward(self, name: str, layer: Layer, g: Tensor, saved: Tensor | None) -> None:
        with torch.no_grad():
            if self.eigen is None:
                self._add(f"{name}/G", gradient_factor(layer, g, self.approx))
            else:
                e = self.eigen[name]
                qa, qg = e.qa.to(saved.dtype), e.qg.to(saved.dtype)
                self._add(f"{name}/lambda", kfe_square(saved, _positions(layer, g), qa, qg))


# --- curvature backpropagation ---------------------------------------------------------


def output_vectors(output: Tensor, target: Tensor, curvature: Curvature | str, noise: Tensor | None = None) -> Iterator[Tensor]:
    """The vectors ``r`` to backpropagate from the output for ``l = ||f - y||^2 / D``
    (see the module docstring): one for ``mc``/``empirical``, ``D`` for ``type-2``."""
    curvature = Curvature(curvature)
    d = output[0].numel()
    if curvature is Curvature.MC:
        if noise is None:
            raise ValueError("mc curvature needs the pseudo-target noise")
        yield math.sqrt(2 / d) * noise
    elif curvature is Curvature.EMPIRICAL:
        yield (2 / math.sqrt(d)) * (output.detach() - target)
    else:
        for c in range(d):
            column = output.new_zeros(output.shape[0], d)
            column[:, c] = math.sqrt(2 / d)
            yield column.view_as(output)


def backpropagate(output: Tensor, target: Tensor, curvature: Curvature | str, noise: Tensor | None = None) -> None:
    """Backpropagate every curvature vector through the graph of ``output`` (the hooks record ``G``)."""
    vectors = output_vectors(output, target, curvature, noise)
    v = next(vectors)
    for following in vectors:  # keep the graph for all but the last vector
        torch.autograd.backward(output, v, retain_graph=True)
        v = following
    torch.autograd.backward(output, v)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters without ``requires_grad`` and the model in eval mode: a factor pass needs
    only output gradients, so autograd skips every weight-gradient kernel."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def mc_noise(task: DiffusionTask, index: Tensor, draw: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Seeded pseudo-target noise ``z`` per example, a pure function of (seed, index, draw)."""
    z = [torch.randn(shape, generator=generator_for(task.seed, int(Stream.FACTORS), i, draw, _MC_TAG)) for i in index.tolist()]
    return torch.stack(z).to(device=like.device, dtype=like.dtype)


def factor_pass(
    denoiser: nn.Module,
    task: DiffusionTask,
    batches: Iterable[dict[str, Tensor]],
    collector: FactorCollector,
    curvature: Curvature | str,
    draw: int,
) -> None:
    """One pass over ``batches``: fresh seeded ``(t, eps)`` (stream FACTORS, draw id
    ``draw``), forward, and the curvature backward; ``collector`` records the statistics."""
    device = collector.model_device()
    dtype = next(iter(collector.layers.values())).weight.dtype
    with frozen(denoiser), collector.recording():
        for batch in batches:
            x0 = batch["image"].to(device=device, dtype=dtype)
            index = batch["index"]
            t, eps = task.draw(index, draw, x0.shape[1:], stream=Stream.FACTORS, dtype=dtype, device=device)
            out = predict_eps(denoiser, task.add_noise(x0, t, eps), t)
            noise = mc_noise(task, index, draw, tuple(out.shape[1:]), out) if Curvature(curvature) is Curvature.MC else None
            backpropagate(out, eps, curvature, noise)


# --- normalised factors, eigendecomposition, preconditioning ---------------------------------


def eigendecompose(sums: dict[str, Tensor], layers: Iterable[str]) -> dict[str, LayerEigen]:
    """Eigendecomposition in float64 of ``A = A_sum / A_count`` and ``G = G_sum / G_count``
    (tiny negative eigenvalues from round-off are clipped to 0); layers that never ran are left out."""
    out = {}
    for name in layers:
        if float(sums[f"{name}/A_count"]) == 0:  # the layer never ran: no curvature, no factors
            continue
        a = sums[f"{name}/A"].double() / sums[f"{name}/A_count"].double()
        g = sums[f"{name}/G"].double() / sums[f"{name}/G_count"].double()
        la, qa = torch.linalg.eigh(a)
        lg, qg = torch.linalg.eigh(g)
        out[name] = LayerEigen(qa, la.clamp_min(0), qg, lg.clamp_min(0))
    return out


def eigen_tensors(eigen: dict[str, LayerEigen]) -> dict[str, Tensor]:
    return {f"{n}/{k}": getattr(e, k) for n, e in eigen.items() for k in ("qa", "la", "qg", "lg")}


def eigen_from_tensors(tensors: dict[str, Tensor]) -> dict[str, LayerEigen]:
    names = sorted({k.rsplit("/", 1)[0] for k in tensors})
    return {n: LayerEigen(*(tensors[f"{n}/{k}"] for k in ("qa", "la", "qg", "lg"))) for n in names}


class KFACPreconditioner:
    """``v -> (F_l + lambda_l I)^{-1} v`` per layer in the Kronecker eigenbasis:
    ``Q_G [(Q_G^T V Q_A) / (Lambda + lambda_l)] Q_A^T`` with ``Lambda = l_G l_A^T``
    (K-FAC) or the EK-FAC second moments.

    Args:
        eigen: per-layer eigendecompositions.
        corrected: per-layer EK-FAC eigenvalues ``d_out x d_in`` (``None`` = K-FAC).
        damping: absolute ``lambda`` for every layer; ``None``: ``relative`` x each layer's mean eigenvalue.
        relative: the per-layer damping factor used when ``damping`` is ``None``.
    """

    def __init__(
        self, eigen: dict[str, LayerEigen], corrected: dict[str, Tensor] | None = None, damping: float | None = None, relative: float = HEURISTIC_DAMPING
    ) -> None:
        if (damping is not None and damping < 0) or relative < 0:
            raise WherefromError(f"damping must be >= 0, got {damping if damping is not None else relative}")
        self.eigen = eigen
        self.inverse: dict[str, Tensor] = {}
        self.damping: dict[str, float] = {}
        for name, e in eigen.items():
            lam = corrected[name].double() if corrected is not None else torch.outer(e.lg, e.la)
            d = relative * float(lam.mean()) if damping is None else damping
            if d <= 0 and bool((lam <= 0).any()):
                raise WherefromError(f"layer {name!r} has zero curvature eigenvalues; use a damping > 0")
            self.damping[name] = d
            self.inverse[name] = 1.0 / (lam + d)

    def apply(self, name: str, v: Tensor) -> Tensor:
        """Precondition a batch of layer gradients ``B x d_out x d_in`` (float64 math)."""
        e = self.eigen[name]
        vd = v.double()
        rotated = e.qg.T @ vd @ e.qa
        return (e.qg @ (rotated * self.inverse[name]) @ e.qa.T).to(v.dtype)


def correction_tensors(sums: dict[str, Tensor], layers: Iterable[str]) -> dict[str, Tensor]:
    """EK-FAC eigenvalues ``lambda_sum / lambda_count`` per layer."""
    return {n: sums[f"{n}/lambda"].double() / sums[f"{n}/lambda_count"].double() for n in layers}


# --- fitting factors into the store --------------------------------------------------------


@dataclass(frozen=True)
class FactorConfig:
    """Everything that determines a model id's factors; stored in the manifest.

    Args:
        curvature: ``mc`` (default), ``empirical`` or ``type-2`` (``D`` backward passes per batch).
        kfac: ``expand`` (default) or ``reduce``.
        passes: passes over the training set, each with fresh seeded ``(t, eps)`` (draw id = pass).
        ekfac: also measure EK-FAC eigenvalues (``passes`` more passes, draw ids ``passes..2 passes - 1``).
        mode: ``after`` training (dedicated passes) or ``during`` training (the training steps'
            own forward/backward: empirical curvature only).
    """

    curvature: str = Curvature.MC.value
    kfac: str = KFACApprox.EXPAND.value
    # 8 passes (8 seeded (t, eps) per image) beat 1 by 0.02-0.05 LDS on the benchmark's tuning queries
    passes: int = 8
    ekfac: bool = False
    mode: str = "after"

    def __post_init__(self) -> None:
        for name, kind in (("curvature", Curvature), ("kfac", KFACApprox)):
            value = getattr(self, name)
            if value not in {k.value for k in kind}:
                raise WherefromError(f"{name} must be one of {[k.value for k in kind]}, got {value!r}")
        if self.mode not in ("after", "during"):
            raise WherefromError(f"mode must be 'after' or 'during', got {self.mode!r}")
        if self.mode == "during" and self.curvature != Curvature.EMPIRICAL.value:
            raise WherefromError("mode='during' reuses the training loss's gradients, i.e. curvature='empirical'; pass it explicitly")
        if self.passes < 1:
            raise WherefromError(f"passes must be >= 1, got {self.passes}")

    def to_dict(self) -> dict[str, object]:
        return {"curvature": self.curvature, "kfac": self.kfac, "passes": self.passes, "ekfac": self.ekfac, "mode": self.mode}


def entry_names(model_id: str) -> dict[str, str]:
    """Store entries of a model id: sums and counts, eigendecompositions, EK-FAC eigenvalues."""
    return {k: f"{k}/{model_id}" for k in ("factors", "eigen", "ekfac")}


def training_split(module: nn.Module, model_id: str, indices: Iterable[int]) -> np.ndarray:
    """The indices model id ``model_id`` trained on: all of ``indices``, or for member ``i``
    of an encoded ensemble (model id ``member<i>``) its code split."""
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    codes = getattr(module, "codes", None)
    if codes is None or not model_id.startswith("member"):
        return indices
    return np.intersect1d(indices, codes.split(int(model_id.removeprefix("member"))))


def _loader(datamodule, indices: np.ndarray, batch_size: int) -> DataLoader:
    return DataLoader(datamodule.dataset(indices), batch_size=batch_size, shuffle=False)


def fit_factors(
    net: nn.Module,
    model_id: str,
    task: DiffusionTask,
    datamodule,
    indices: np.ndarray,
    store: Store | None,
    config: FactorConfig,
    batch_size: int = 64,
    comm: Comm | None = None,
    progress: bool = False,
    collector: FactorCollector | None = None,
) -> None:
    """Write ``factors/``, ``eigen/`` (and ``ekfac/``) ``<model_id>`` to ``store``.

    ``after`` mode: ``config.passes`` passes over ``indices`` (each rank a disjoint
    ``indices[rank::world]`` shard, so every index exactly once); ``during`` mode: the
    statistics already in ``collector``. Sums and counts are then summed over ranks,
    eigendecomposed in float64 and, for EK-FAC, corrected by further passes. Every
    rank calls this; only global rank 0 touches ``store``.
    """
    comm = comm or LocalComm()
    names = entry_names(model_id)
    wanted = [names["factors"], names["eigen"]] + ([names["ekfac"]] if config.ekfac else [])
    meta = {**config.to_dict(), "model_id": model_id, "weights": weights_hash(net), "task": task.config}

    def check() -> bool:
        if all(store.has(n, meta) for n in wanted):
            return True
        clash = [n for n in wanted if store.has(n) and not store.has(n, meta)]
        if clash and not store.overwrite:
            raise FingerprintMismatchError(
                f"store {str(store.root)!r} holds {clash[0]} made with config {store.config(clash[0])}, not {meta}; "
                f"use another store or pass {store.names[1]}"
            )
        return False

    if on_rank_zero(comm, check):
        return
    shard = np.asarray(indices, dtype=np.int64)[comm.global_rank :: comm.world_size]
    reduce_sum = lambda t: gather(comm, t).sum(0)  # noqa: E731 - fixed rank order: the same sums everywhere

    def passes(col: FactorCollector, first_draw: int, what: str) -> None:
        with col.attached():
            for p in range(config.passes):
                batches = tqdm(_loader(datamodule, shard, batch_size), desc=f"{what} {model_id} pass {p + 1}/{config.passes}", disable=not progress)
                factor_pass(net, task, batches, col, config.curvature, draw=first_draw + p)
        col.reduce_(reduce_sum)

    with torch.inference_mode(False), torch.enable_grad():
        if collector is None:
            collector = FactorCollector(net, config.kfac)
            passes(collector, 0, "factors")
        else:
            collector.reduce_(reduce_sum)
        sums = collector.state_dict()
        eigen = eigendecompose(sums, collector.layers)
        corrected = None
        if config.ekfac:
            ek = FactorCollector(net, config.kfac, eigen={n: _to(e, collector.model_device()) for n, e in eigen.items()})
            passes(ek, config.passes, "ekfac")
            corrected = ek.state_dict()

    def save() -> None:
        store.save_tensors(names["factors"], sums, meta)
        store.save_tensors(names["eigen"], eigen_tensors(eigen), meta)
        if corrected is not None:
            store.save_tensors(names["ekfac"], corrected, meta)

    on_rank_zero(comm, save)


def _to(e: LayerEigen, device: torch.device) -> LayerEigen:
    return LayerEigen(*(t.to(device) for t in (e.qa, e.la, e.qg, e.lg)))


def load_preconditioner(
    store: Store, model_id: str, net: nn.Module, ekfac: bool, damping: float | None = None, relative: float = HEURISTIC_DAMPING
) -> KFACPreconditioner:
    """The (EK-)FAC preconditioner of ``model_id`` from ``store``, checked against ``net``'s weights."""
    names = entry_names(model_id)
    if not store.has(names["eigen"]):
        raise WherefromError(f"store {str(store.root)!r} has no K-FAC factors for {model_id!r}; run `wherefrom factors --store {store.root}` first")
    config = store.config(names["eigen"])
    if config["weights"] != weights_hash(net):
        raise FingerprintMismatchError(
            f"the factors of {model_id!r} in {str(store.root)!r} were fit on other weights than this checkpoint's; rerun `wherefrom factors --overwrite`"
        )
    if ekfac and not store.has(names["ekfac"]):
        raise WherefromError(f"store {str(store.root)!r} has no EK-FAC eigenvalues for {model_id!r}; run `wherefrom factors --ekfac`")
    device = next(net.parameters()).device
    eigen = {n: _to(e, device) for n, e in eigen_from_tensors(store.load_tensors(names["eigen"])).items()}
    corrected = correction_tensors(store.load_tensors(names["ekfac"]), eigen) if ekfac else None
    return KFACPreconditioner(eigen, {n: c.to(device) for n, c in corrected.items()} if corrected else None, damping, relative)


def factors_main(argv: list[str]) -> None:
    """``wherefrom factors``: K-FAC factors of a finished run into a store."""
    from wherefrom.model import load_datamodule, load_module

    p = ArgumentParser(prog="wherefrom factors", description="Kronecker factors (K-FAC / EK-FAC) of a run's training loss.")
    p.add_argument("--ckpt", required=True, help="checkpoint from `wherefrom fit` (single model or ensemble)")
    p.add_argument("--store", required=True, help="store folder (shared with `wherefrom featurize`)")
    p.add_argument("--curvature", choices=[c.value for c in Curvature], default=FactorConfig.curvature)
    p.add_argument("--kfac", choices=[k.value for k in KFACApprox], default=FactorConfig.kfac)
    p.add_argument("--ekfac", action="store_true", help="also measure EK-FAC eigenvalues (extra passes)")
    p.add_argument("--passes", type=int, default=FactorConfig.passes, help="passes over the data, fresh (t, eps) each")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overwrite", action="store_true", help="replace a store or entries made for other data, config or weights")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        raise WherefromError(f"--batch-size must be >= 1, got {a.batch_size}")
    config = FactorConfig(a.curvature, a.kfac, a.passes, a.ekfac)
    module = load_module(a.ckpt).to(a.device)
    datamodule = load_datamodule(a.ckpt)
    store = Store(a.store, datamodule.fingerprint, module.codes_fingerprint, overwrite=a.overwrite)
    for model_id, net in module.denoisers().items():
        split = training_split(module, model_id, datamodule.indices)
        fit_factors(net, model_id, module.task, datamodule, split, store, config, a.batch_size, progress=True)
    done = ", ".join(n for m in module.denoisers() for k, n in entry_names(m).items() if k != "ekfac" or a.ekfac)
    print(f"wrote {done} to {a.store}")


__all__ = [
    "HEURISTIC_DAMPING",
    "Curvature",
    "FactorCollector",
    "FactorConfig",
    "KFACApprox",
    "KFACPreconditioner",
    "LayerEigen",
    "activation_factor",
    "backpropagate",
    "eigendecompose",
    "entry_names",
    "factor_pass",
    "factors_main",
    "fit_factors",
    "gradient_factor",
    "load_preconditioner",
    "output_vectors",
    "tracked_layers",
    "training_split",
]
