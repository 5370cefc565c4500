"""What determines a feature vector: :class:`FeatureConfig` (stored verbatim in the store's
manifest) and its choices, the projection kind, the dense mode's projector and the structured
mode's split of the dimension over layers. Every front end (``wherefrom featurize``, the
``TRAKFeatures`` callback, the attributors) derives its options from these fields."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from wherefrom.errors import WherefromError, check_choices
from wherefrom.task import MEASUREMENTS, DiffusionTask, TimestepStrategy


class ProjectionKind(str, enum.Enum):
    """How per-sample gradients are projected (see :mod:`wherefrom.features.projection`)."""

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
    # (``help`` and ``choices`` in each field's metadata: every front end's options come from here)
    output: str = field(default="square_norm", metadata={"help": "the output function, a measurement (TRAK: loss, D-TRAK: square_norm)"})
    timesteps: int = field(default=100, metadata={"help": "K draws averaged per image"})
    strategy: str = field(default=TimestepStrategy.UNIFORM.value, metadata={"help": "draws of t: uniform (t_k = k T / K) or random", "choices": TimestepStrategy})
    proj_dim: int = field(default=2048, metadata={"help": "projection dimension D"})
    projection: str = field(default=ProjectionKind.STRUCTURED.value, metadata={"help": "structured (per layer, fast) or dense (trak projector)", "choices": ProjectionKind})
    projector: str = field(default=Projector.BASIC.value, metadata={"help": "the dense mode's trak projector", "choices": Projector})
    allocation: str = field(default=Allocation.PROPORTIONAL.value, metadata={"help": "structured: how D is split over layers", "choices": Allocation})
    seed: int = field(default=0, metadata={"help": "projection seed"})

    def __post_init__(self) -> None:
        check_choices(self)
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
            raise WherefromError("these structured features were made by an older wherefrom (other projection matrices); featurise again, replacing them (overwrite)")
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


__all__ = ["Allocation", "FeatureConfig", "METHOD_OUTPUTS", "ProjectionKind", "Projector"]
