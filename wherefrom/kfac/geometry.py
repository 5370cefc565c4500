"""Convolution geometry for K-FAC's activation factor: padding, output sizes, window sums and the
patch Gram matrix of unfolded inputs without materialising the patches (Grosse & Martens 2016, Sec. 3.1)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wherefrom.errors import WherefromError


def conv_out_size(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
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


def window_sums(x: Tensor, conv: nn.Conv2d, ho: int, wo: int) -> Tensor:
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


def unfolded(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """im2col columns ``B x C k_h k_w x R`` (the conv's input at each output position, channel-major)."""
    return F.unfold(_padded(x, conv), conv.kernel_size, conv.dilation, 0, conv.stride)


def example_weight_grads(x: Tensor, g: Tensor, conv: nn.Conv2d, batch: int, draws: int) -> Tensor:
    """Per-example weight gradients ``sum_{draw, pos} g_pos a_pos^T`` (``batch x out x C k_h k_w``,
    channel-major like ``unfolded``) of a conv's inputs ``x`` and output gradients ``g``, whose
    rows are ordered (example, draw). One grouped weight-gradient convolution, the examples as
    its groups and the draws as its batch, does the sum without forming im2col columns."""
    if conv.groups != 1:
        raise WherefromError(f"per-example gradients need groups=1 convolutions, got groups={conv.groups}")
    out, *kernel = conv.weight.shape
    x, g = (t.unflatten(0, (batch, draws)).transpose(0, 1).flatten(1, 2) for t in (_padded(x, conv), g))  # draws x (batch C) x H x W
    return torch.nn.grad.conv2d_weight(x, (batch * out, *kernel), g, conv.stride, 0, conv.dilation, batch).reshape(batch, out, -1)


def patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """im2col patches ``B x R x C k_h k_w`` (the conv's input at each output position)."""
    return unfolded(x, conv).transpose(1, 2)


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


def conv_patch_gram(x: Tensor, conv: nn.Conv2d) -> Tensor:
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
    ho, wo = conv_out_size(conv, h, w)
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


def toeplitz_gram(conv: nn.Conv2d, x: Tensor, positions: int) -> bool:
    """Whether :func:`conv_patch_gram` beats forming the im2col patches for this layer."""
    if not _fast_conv(conv) or conv.kernel_size == (1, 1):
        return False
    return x.device.type == "cpu" or 2 * positions * (conv.weight[0].numel()) ** 2 > GPU_IM2COL_FLOPS
