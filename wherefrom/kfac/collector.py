"""``FactorCollector``: forward/backward hooks that accumulate K-FAC sums and counts per layer."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from wherefrom.kfac.factors import (
    KFACApprox,
    Layer,
    LayerEigen,
    activation_factor,
    gradient_factor,
    inputs_with_bias,
    kfe_square,
    layer_dims,
    positions,
    tracked_layers,
)
from wherefrom.kfac.geometry import conv_out_size


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

    def row_bytes(self, forward: Callable[[], object]) -> int:
        """Bytes the hooks hold per row of ``forward()`` (the network on one row): with an eigenbasis
        every layer's inputs (im2col patches for a conv) wait for its backward, so they add up; without,
        one layer's patches exist at a time (the largest)."""
        sizes = []

        def probe(layer: Layer, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x = inputs[0]
            if isinstance(layer, nn.Conv2d):
                ho, wo = conv_out_size(layer, x.shape[2], x.shape[3])
                terms = ho * wo * (layer.weight[0].numel() + 1)
            else:
                terms = x[0].numel() // x.shape[-1] * (x.shape[-1] + 1)
            sizes.append(terms * x.element_size())

        handles = [m.register_forward_hook(probe) for m in self.layers.values()]
        try:
            with torch.no_grad():
                forward()
        finally:
            for h in handles:
                h.remove()
        return (sum(sizes) if self.eigen is not None else max(sizes, default=0)) * 2  # and the product formed from them

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
                    saved = inputs_with_bias(layer, x)
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
                self._add(f"{name}/lambda", kfe_square(saved, positions(layer, g), qa, qg))
