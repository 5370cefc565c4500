"""Random projections of per-sample gradients, dense (TRAK) and structured (LoGra).

Both modes are one fixed linear map ``R^P -> R^D`` per (seed, model id), applied
either to a dense gradient (:meth:`Projection.project`, the layout of
:func:`~wherefrom.features.gradients.per_sample_grads`) or, without forming
the gradient, to a batch of examples (:meth:`Projection.projected_grads`). The
two give the same numbers, so a scorer may transform a gradient in parameter
space (e.g. K-FAC preconditioning) and project it with the matrix used for the
stored training features.

* **dense**: trak's JL projector (Park et al. 2023, Sec. 3 / Alg. 1: ``phi(x) = P^T g(x)``
  with i.i.d. normal ``P``), ``BasicProjector`` or ``CudaProjector`` (fast_jl).
* **structured** (LoGra, Choe et al. 2024, Sec. 3.2): for a ``Linear``/``Conv2d``
  layer with weight gradient ``G = sum_pos g_pos a_pos^T`` (``a`` the input,
  unfolded for convolutions, with a trailing 1 for the bias; ``g`` the output
  gradient), the layer's feature is ``P_out^T G P_in = sum_pos (P_out^T g_pos)
  (P_in^T a_pos)^T``, i.e. the Kronecker projection ``(P_in (x) P_out)^T vec(G)``.
  Forward hooks project the inputs (a convolution with kernel ``P_in``), a
  backward w.r.t. the layer outputs gives ``g``; no per-sample gradient is formed.
  Parameters outside ``Linear``/``Conv2d`` layers (e.g. GroupNorm affines) get
  zero weight. ``P_in``, ``P_out`` are scaled orthonormal: ``P = sqrt(n / k) Q``
  with ``Q`` the first k columns of a Haar-random orthogonal n x n matrix, so
  ``E[P P^T] = I`` (inner products are unbiased with scale 1) and at full
  dimensions (``k = n``) ``P P^T = I``: the features' inner products are then the
  exact gradient inner products of those layers.
  The budget D is split by :class:`Allocation`: ``uniform`` gives each of the L
  layers ``D / L``; ``proportional`` gives layer l ``D P_l / P`` (its share of the
  parameters, as a dense projection would). A layer's share ``D_l`` becomes
  ``k_out x k_in`` with ``k_out = min(out, floor(sqrt(D_l)))``,
  ``k_in = min(in, floor(D_l / k_out))``, so ``dim <= D``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from wherefrom.errors import WherefromError
from wherefrom.features.config import (
    Allocation,
    FeatureConfig,
    ProjectionKind,
    Projector,
)
from wherefrom.features.gradients import (
    Draws,
    noisy_inputs,
    num_parameters,
    pair_rows,
    per_sample_grads,
    trainable_parameters,
)
from wherefrom.memory import gradient_rows, pair_chunks
from wherefrom.task import DiffusionTask, Stream, generator_for, mix_seed, predict

BLOCK_SIZE = 100  # trak BasicProjector's block size; part of the definition of its matrix
CUDA_MAX_BATCH = 32  # trak CudaProjector's largest kernel batch


def layer_shape(share: float, fan_in: int, fan_out: int) -> tuple[int, int]:
    """``(k_in, k_out)`` of a layer given ``share`` numbers of the budget (at least 1 x 1)."""
    k_out = max(1, min(fan_out, int(share**0.5)))
    return max(1, min(fan_in, int(share // k_out))), k_out


def scaled_orthonormal(n: int, k: int, generator: torch.Generator) -> Tensor:
    """``sqrt(n / k) Q`` with ``Q`` (n x k) the first k columns of a Haar-random orthogonal
    matrix (QR of a Gaussian with the signs of R's diagonal fixed; Mezzadri 2007), float64."""
    q, r = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    signs = torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    # a fresh row-major tensor: QR's column-major output keeps odd strides on size-1 dims
    return torch.empty(n, k, dtype=torch.float64).copy_(q * signs * (n / k) ** 0.5)


def projection_seed(seed: int, model_id: str) -> int:
    """The seed of a model id's projection (fits trak's and fast_jl's 32-bit seeds)."""
    return mix_seed(seed, zlib.crc32(model_id.encode())) % 2**31


def default_projector(device: torch.device | str) -> str:
    """The dense projector for a device: on a GPU trak's ``CudaProjector`` when its
    ``fast_jl`` kernel is installed, else ``BasicProjector`` generating on the GPU."""
    if torch.device(device).type != "cuda":
        return Projector.BASIC.value
    try:
        import fast_jl  # noqa: F401
    except ImportError:
        return Projector.BASIC_CUDA.value
    return Projector.CUDA.value


@dataclass
class LayerProjection:
    """``P_in`` (``in [+1 bias] x k_in``) and ``P_out`` (``out x k_out``) of one layer,
    and where its weight and bias sit in the dense gradient."""

    name: str
    module: nn.Linear | nn.Conv2d
    p_in: Tensor
    p_out: Tensor
    weight: slice
    bias: slice | None

    @property
    def shape(self) -> tuple[int, int]:
        """``(k_out, k_in)`` of the projected gradient."""
        return self.p_out.shape[1], self.p_in.shape[1]

    @property
    def dim(self) -> int:
        return self.p_in.shape[1] * self.p_out.shape[1]

    def project_input(self, x: Tensor) -> Tensor:
        """``P_in^T [a_pos; 1]`` for every row and position: ``R x k_in x positions``."""
        w, b = (self.p_in[:-1], self.p_in[-1]) if self.bias is not None else (self.p_in, None)
        if isinstance(self.module, nn.Conv2d):
            # P_in^T unfold(x) is the layer's own convolution with kernel P_in (same stride/padding)
            kernel = w.T.reshape(-1, *self.module.weight.shape[1:])
            return self.module._conv_forward(x, kernel, b).flatten(2)
        out = x.reshape(len(x), -1, x.shape[-1]) @ w
        return (out if b is None else out + b).transpose(1, 2)

    def project_output(self, g: Tensor) -> Tensor:
        """``P_out^T g_pos`` for every row and position: ``R x k_out x positions``."""
        if isinstance(self.module, nn.Conv2d):
            return torch.einsum("rop,ok->rkp", g.flatten(2), self.p_out)
        return (g.reshape(len(g), -1, g.shape[-1]) @ self.p_out).transpose(1, 2)

    def reduce_grad(self, x: Tensor, g: Tensor, batch: int, draws: int) -> Tensor:
        """``P_out^T G P_in`` per example (``batch x k_out x k_in``) from the layer's inputs ``x`` and
        output gradients ``g`` of its ``batch x draws`` rows: the sum over draws and positions of
        ``(P_out^T g)(P_in^T a)^T`` (LoGra, Sec. 3.2)."""
        gp = self.project_output(g).unflatten(0, (batch, draws))
        a = self.project_input(x).unflatten(0, (batch, draws))
        return torch.einsum("bkop,bkip->boi", gp, a)

    def project_dense(self, grads: Tensor) -> Tensor:
        """``P_out^T G P_in`` from the dense gradient: ``B x (k_out k_in)``."""
        g = grads[:, self.weight].reshape(len(grads), self.p_out.shape[0], -1)
        if self.bias is not None:
            g = torch.cat([g, grads[:, self.bias].unsqueeze(-1)], -1)
        return torch.einsum("boi,ok,il->bkl", g, self.p_out, self.p_in).flatten(1)


class Projection:
    """The projection of model id ``model_id``'s per-sample gradients.

    Args:
        config: the featurisation config (``proj_dim``, ``projection``, ``projector``, ``seed``).
        model: the network whose trainable parameters define the gradient layout.
        model_id: TRAK model id (e.g. ``"model"``, ``"member3"``); seeds the matrix.
        device, dtype: where and in which precision to project (default: the model's).
    """

    def __init__(
        self,
        config: FeatureConfig,
        model: nn.Module,
        model_id: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        first = next(iter(trainable_parameters(model).values()), None)
        if first is None:
            raise WherefromError(f"model {model_id!r} has no trainable parameters to featurise")
        self.model, self.model_id, self.config = model, model_id, config
        self.kind = ProjectionKind(config.projection)
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype or first.dtype
        self.seed = projection_seed(config.seed, model_id)
        self.num_params = num_parameters(model)
        if self.kind is ProjectionKind.DENSE:
            self.dim = config.proj_dim
            self._projector = self._trak_projector(Projector(config.projector))
        else:
            self.layers = self._layers(config.proj_dim)
            self.dim = sum(layer.dim for layer in self.layers)

    # --- construction ------------------------------------------------------------------
    def _trak_projector(self, projector: Projector):
        from trak.projectors import BasicProjector, CudaProjector, ProjectionType

        if projector is not Projector.BASIC and not torch.cuda.is_available():
            raise WherefromError(f"these features were projected with the {projector.value!r} projector, which needs a CUDA GPU; run on one")
        self._projector_device = torch.device("cpu") if projector is Projector.BASIC else torch.device("cuda")
        if projector is Projector.CUDA:
            if self.dim % 512:
                raise WherefromError(f"the cuda projector needs proj_dim a multiple of 512, got {self.dim}")
            return CudaProjector(self.num_params, self.dim, self.seed, ProjectionType.normal, self._projector_device, CUDA_MAX_BATCH)
        return BasicProjector(
            self.num_params, self.dim, self.seed, ProjectionType.normal, self._projector_device, BLOCK_SIZE, self.dtype
        )

    def _layers(self, proj_dim: int) -> list[LayerProjection]:
        params = trainable_parameters(self.model)
        offsets, start = {}, 0
        for name, p in params.items():
            offsets[name] = slice(start, start + p.numel())
            start += p.numel()
        found = []
        for name, module in self.model.named_modules():
            prefix = f"{name}." if name else ""
            if not isinstance(module, (nn.Linear, nn.Conv2d)) or f"{prefix}weight" not in offsets:
                continue
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise WherefromError(f"structured projection needs groups=1 convolutions ({name or 'the model'} has {module.groups}); use projection='dense'")
            found.append((prefix, module))
        if not found:
            raise WherefromError(f"model {self.model_id!r} has no trainable Linear/Conv2d layer; use projection='dense'")
        fans = [(module.weight[0].numel() + (f"{prefix}bias" in offsets), module.weight.shape[0]) for prefix, module in found]
        total = sum(i * o for i, o in fans)
        uniform = Allocation(self.config.allocation) is Allocation.UNIFORM
        layers = []
        for number, ((prefix, module), (fan_in, fan_out)) in enumerate(zip(found, fans)):
            share = proj_dim / len(found) if uniform else proj_dim * fan_in * fan_out / total
            k_in, k_out = layer_shape(share, fan_in, fan_out)
            p_in, p_out = (
                scaled_orthonormal(n, k, generator_for(self.seed, number, side)) for side, (n, k) in enumerate([(fan_in, k_in), (fan_out, k_out)])
            )
            layers.append(
                LayerProjection(
                    prefix.rstrip("."), module, p_in.to(self.device, self.dtype), p_out.to(self.device, self.dtype), offsets[f"{prefix}weight"], offsets.get(f"{prefix}bias")
                )
            )
        return layers

    # --- projecting ----------------------------------------------------------------------
    def project(self, grads: Tensor) -> Tensor:
        """Project dense gradients (``B x P`` in :func:`trainable_parameters` order) to ``B x dim``."""
        if grads.dim() != 2 or grads.shape[1] != self.num_params:
            raise WherefromError(f"expected B x {self.num_params} gradients of model {self.model_id!r}, got {tuple(grads.shape)}")
        if self.kind is ProjectionKind.DENSE:
            grads = grads.to(self._projector_device, self.dtype)
            # the model id is already mixed into the seed
            return self._projector.project(grads, model_id=0).to(self.device, self.dtype)
        grads = grads.to(self.device, self.dtype)
        return torch.cat([layer.project_dense(grads) for layer in self.layers], 1)

    def projected_grads(
        self, task: DiffusionTask, x0: Tensor, index: Tensor, output: str, draws: Draws, stream: Stream = Stream.FEATURES, cond: Tensor | None = None
    ) -> Tensor:
        """``project(per_sample_grads(...))`` for a batch, computed the fast way (``B x dim``)."""
        if self.kind is ProjectionKind.DENSE:  # dense gradients of as many examples at a time as the memory budget holds
            step = gradient_rows(self.num_params, x0.dtype, x0.device)
            return torch.cat(
                [
                    self.project(per_sample_grads(self.model, task, x0[s : s + step], index[s : s + step], output, draws, stream, None if cond is None else cond[s : s + step]))
                    for s in range(0, len(x0), step)
                ]
            )
        return self._structured(task, x0, index, output, draws, stream, cond)

    def _structured(self, task: DiffusionTask, x0: Tensor, index: Tensor, output: str, draws: Draws, stream: Stream, cond: Tensor | None) -> Tensor:
        feats = structured_grads(self.model, self.layers, task, x0, index, output, draws, stream, cond)
        return torch.cat([f.flatten(1) for f in feats], 1)


class LayerReduction(Protocol):
    """What :func:`structured_grads` needs of a layer: the module it hooks, the ``(k_out, k_in)``
    shape it yields, and the reduction of the layer's inputs and output gradients (e.g.
    :class:`LayerProjection`)."""

    name: str
    module: nn.Module

    @property
    def shape(self) -> tuple[int, int]: ...

    def reduce_grad(self, x: Tensor, g: Tensor, batch: int, draws: int) -> Tensor: ...  # batch x k_out x k_in


def structured_grads(
    model: nn.Module,
    layers: Sequence[LayerReduction],
    task: DiffusionTask,
    x0: Tensor,
    index: Tensor,
    output: str,
    draws: Draws,
    stream: Stream = Stream.FEATURES,
    cond: Tensor | None = None,
) -> list[Tensor]:
    """``P_out^T G P_in`` (``B x k_out x k_in``) of each of ``layers`` for a batch, ``G`` the
    layer's gradient of ``output`` averaged over ``draws``, from forward hooks on the inputs and
    one backward to the layer outputs (LoGra, Sec. 3.2): no per-sample gradient of the whole
    model is formed. Several projections of one module share the forward and backward pass;
    each layer's inputs are projected after the backward, one layer at a time."""
    draws = list(draws)
    pairs = pair_rows(model, task, x0, index, output, draws, stream, cond)  # before the hooks
    feats = [x0.new_zeros(len(x0), *layer.shape) for layer in layers]
    calls: list[tuple[int, Tensor]] = []  # (layer number, layer input) per call
    outputs: list[Tensor] = []
    rows = 0

    def hook(number: int, layer: LayerReduction):
        def capture(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
            if len(out) != rows:
                raise WherefromError(f"layer {layer.name} saw {len(out)} rows, not one per (example, draw); use projection='dense'")
            calls.append((number, inputs[0].detach()))  # autograd keeps this input for the backward anyway
            outputs.append(out)

        return capture

    handles = [layer.module.register_forward_hook(hook(number, layer)) for number, layer in enumerate(layers)]
    try:
        # chunks of (example, draw) pairs within the memory budget; G is linear in the rows, so their sums add up
        for e, d in pair_chunks(len(x0), len(draws), pairs):
            x_t, t, eps = noisy_inputs(task, x0[e], index[e], output, draws[d], stream)
            (b, k), rows = x_t.shape[:2], x_t.shape[0] * x_t.shape[1]
            calls.clear()
            outputs.clear()
            with torch.enable_grad():
                rows_cond = None if cond is None else cond[e].repeat_interleave(k, 0)  # row (b, j): example b's condition
                pred = predict(model, x_t.flatten(0, 1), task.model_time(t.flatten(0, 1)), rows_cond)
                # mean over the K draws of each example, summed over examples (rows are independent)
                value = task.measurement(output)(pred, eps.flatten(0, 1), t.flatten(0, 1), task).sum() / len(draws)
                grads = torch.autograd.grad(value, outputs, allow_unused=True)
            with torch.no_grad():
                for (number, x), g in zip(calls, grads):
                    if g is not None:
                        feats[number][e] += layers[number].reduce_grad(x, g, b, k)
    finally:
        for h in handles:
            h.remove()
    return feats


__all__ = ["BLOCK_SIZE", "LayerProjection", "LayerReduction", "Projection", "default_projector", "projection_seed", "scaled_orthonormal", "structured_grads"]
