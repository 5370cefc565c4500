"""Dense per-sample gradients of an output function (the D-TRAK recipe).

D-TRAK (Zheng et al., ICLR 2024, Sec. 3-4) featurises a training example ``x``
by the gradient of an output function ``f`` of the denoiser, averaged over K
seeded ``(t, eps)`` draws::

    g(x) = grad_theta (1/K) sum_k f(eps_theta(x_{t_k}, t_k), eps_k, t_k)

with ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps`` (Ho et al. 2020, eq. 4)
and ``f`` a measurement of :data:`wherefrom.task.MEASUREMENTS` (``loss`` gives
TRAK's training-loss gradient, ``square_norm`` D-TRAK's best output function).

Flattening order (the layout of every dense gradient, shared with
:class:`~wherefrom.attribution.projection.Projection` and the K-FAC scorer):
the trainable parameters (``requires_grad``) in ``model.named_parameters()``
order, each flattened row-major; see :func:`trainable_parameters`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from wherefrom.errors import WherefromError
from wherefrom.task import MEASUREMENTS, DiffusionTask, Stream, TimestepStrategy, condition_kwargs, eps_output

Draws = Sequence[tuple[int, int | None]]  # [(draw id, fixed t or None = drawn per example)]


class ProjectionKind(str, enum.Enum):
    """How per-sample gradients are projected (see :mod:`wherefrom.attribution.projection`)."""

    DENSE = "dense"  # trak's JL projector on the full gradient (TRAK / D-TRAK recipe)
    STRUCTURED = "structured"  # per-layer Kronecker projection of activations and output gradients (LoGra)


class Allocation(str, enum.Enum):
    """How the structured projection splits its dimension D over the L layers."""

    UNIFORM = "uniform"  # D / L per layer (LoGra)
    PROPORTIONAL = "proportional"  # D P_l / P per layer: each layer's share of the parameters, as in a dense projection


class Projector(str, enum.Enum):
    """The dense mode's trak projector. Each draws a different matrix (torch's CPU and
    CUDA generators differ), so the config records which one made the features."""

    BASIC = "basic"  # trak.projectors.BasicProjector, matrix generated on the CPU
    BASIC_CUDA = "basic-cuda"  # BasicProjector, matrix generated on the GPU
    CUDA = "cuda"  # trak.projectors.CudaProjector (needs the fast_jl CUDA extension)


# TRAK / D-TRAK method name -> output function (Park et al. 2023 use the training loss;
# Zheng et al. 2024, Table 1, find the squared norm of eps_theta best).
METHOD_OUTPUTS: dict[str, str] = {"trak": "loss", "dtrak": "square_norm"}


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that determines a feature vector; stored verbatim in the store's manifest.

    Args:
        output: the output function, a key of :data:`~wherefrom.task.MEASUREMENTS`.
        timesteps: K, the number of seeded ``(t, eps)`` draws averaged per example.
        strategy: ``uniform`` (``t_k = k T / K``, D-TRAK's choice) or ``random``.
        proj_dim: projection dimension D (structured: an upper bound, see ``Projection.dim``).
        projection: ``structured`` (fast, per-layer) or ``dense`` (trak projector).
        projector: the dense mode's trak projector, ``basic``, ``basic-cuda`` or ``cuda``
            (structured mode uses none and records ``basic``).
        allocation: how the structured mode splits D over layers, ``uniform`` or
            ``proportional`` (dense mode records ``uniform``).
        seed: projection seed, mixed with the model id.
    """

    # Defaults chosen on the LDS benchmark's tuning queries (benchmarks/tune_defaults.py): K = 100
    # draws beat K = 10 by +0.2 LDS for D-TRAK and TRAK; ``proportional`` allocation brings the
    # structured projection within 0.02 of the dense and unprojected gradients at D = 2048.
    output: str = "square_norm"
    timesteps: int = 100
    strategy: str = TimestepStrategy.UNIFORM.value
    proj_dim: int = 2048
    projection: str = ProjectionKind.STRUCTURED.value
    projector: str = Projector.BASIC.value
    allocation: str = Allocation.PROPORTIONAL.value
    seed: int = 0

    def __post_init__(self) -> None:
        choices = {"strategy": TimestepStrategy, "projection": ProjectionKind, "projector": Projector, "allocation": Allocation}
        for name, kind in choices.items():
            value = getattr(self, name)
            if value not in {k.value for k in kind}:
                raise WherefromError(f"{name} must be one of {[k.value for k in kind]}, got {value!r}")
            object.__setattr__(self, name, kind(value).value)
        if self.output not in MEASUREMENTS:
            raise WherefromError(f"unknown output function {self.output!r}; choose one of {sorted(MEASUREMENTS)}")
        if self.timesteps < 1:
            raise WherefromError(f"the number of timesteps K must be >= 1, got {self.timesteps}")
        if self.proj_dim < 1:
            raise WherefromError(f"the projection dimension must be >= 1, got {self.proj_dim}")
        if self.projection == ProjectionKind.STRUCTURED.value:  # no trak projector involved: one config on every device
            object.__setattr__(self, "projector", Projector.BASIC.value)
        else:  # no per-layer split
            object.__setattr__(self, "allocation", Allocation.UNIFORM.value)

    def draws(self, task: DiffusionTask) -> list[tuple[int, int | None]]:
        """The K ``(draw id, t)`` pairs averaged per example."""
        return list(enumerate(task.timesteps(self.strategy, self.timesteps)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> FeatureConfig:
        """The config from a manifest entry (extra keys, e.g. the weights hash, are ignored)."""
        if config.get("projection") == ProjectionKind.STRUCTURED.value and "allocation" not in config:
            raise WherefromError("these structured features were made by an older wherefrom (other projection matrices); featurise again with --overwrite")
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters gradients are taken with respect to, in flattening order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def noisy_inputs(
    task: DiffusionTask, x0: Tensor, index: Tensor, output: str, draws: Draws, stream: Stream = Stream.FEATURES
) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded ``(x_t, t, eps)`` of every (example, draw), shaped ``B x K x ...``."""
    per_draw = [task.noisy(x0, index, output, d, t, stream) for d, t in draws]
    x_t, t, eps = (torch.stack(z, 1) for z in zip(*per_draw))
    return x_t, t, eps


def per_sample_grads(
    model: nn.Module,
    task: DiffusionTask,
    x0: Tensor,
    index: Tensor,
    output: str,
    draws: Draws,
    stream: Stream = Stream.FEATURES,
    cond: Tensor | None = None,
) -> Tensor:
    """``B x P`` per-sample gradients of ``output`` averaged over ``draws``, under each example's
    condition ``cond`` (``None``: unconditional).

    One ``vmap(grad)`` over the examples; each example evaluates its K draws as
    one inner batch. The fused SDPA kernels have no vmap rule, hence the MATH backend.
    """
    params = {n: p.detach() for n, p in trainable_parameters(model).items()}
    frozen = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if n not in params}
    fn = task.measurement(output)
    x_t, t, eps = noisy_inputs(task, x0, index, output, draws, stream)

    k = x_t.shape[1]

    def mean_output(p: dict[str, Tensor], x_t: Tensor, t: Tensor, eps: Tensor, c: Tensor | None) -> Tensor:
        c = None if c is None else c.unsqueeze(0).expand(k, *c.shape)  # the example's condition for each of its K draws
        pred = eps_output(functional_call(model, {**p, **frozen}, (x_t, t), condition_kwargs(model, c)))
        return fn(pred, eps, t, task).mean()

    with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
        grads = vmap(grad(mean_output), in_dims=(None, 0, 0, 0, None if cond is None else 0))(params, x_t, t, eps, cond)
    return torch.cat([grads[n].reshape(len(x0), -1) for n in params], 1)


__all__ = ["METHOD_OUTPUTS", "Allocation", "Draws", "FeatureConfig", "ProjectionKind", "Projector", "noisy_inputs", "per_sample_grads", "trainable_parameters"]
