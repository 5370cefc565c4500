"""The diffusion math in one place: the training objective (:mod:`wherefrom.objective`), seeded draws, measurements.

Everything that needs a timestep, a noise draw, the training loss or a
measurement on an example goes through :class:`DiffusionTask`, so training,
featurisation (TRAK/D-TRAK), K-FAC factors and evaluation agree exactly.

Seeded draws: the ``(t, eps)`` of an example is a pure function of
``(seed, stream, global index, draw number)`` (see :func:`mix_seed`), so results
are identical whatever the batch size, order, worker count or DDP rank count.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from wherefrom import memory
from wherefrom.errors import WherefromError
from wherefrom.objective import PREDICTIONS, DDPMObjective, Objective, build_objective, objective_config, objective_from_scheduler

_MASK64 = (1 << 64) - 1


class Stream(enum.IntEnum):
    """Independent random streams, so e.g. featurisation never reuses training noise."""

    TRAIN = 0
    FEATURES = 1
    FACTORS = 2
    MEASURE = 3
    SAMPLE = 4
    AUGMENT = 5
    CONDITION = 6  # classifier-free guidance's condition dropout


def _splitmix64(x: int) -> int:
    # Steele, Lea & Flood (2014), "Fast splittable pseudorandom number generators".
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """Hash integers into one 63-bit seed (order-sensitive, platform-independent)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h & ((1 << 63) - 1)


def generator_for(*values: int) -> torch.Generator:
    """A CPU generator seeded by :func:`mix_seed` of ``values``."""
    return torch.Generator().manual_seed(mix_seed(*values))


class TimestepStrategy(str, enum.Enum):
    """How featurisation picks its K timesteps (D-TRAK, Zheng et al. 2024, Sec. 4)."""

    UNIFORM = "uniform"  # t_k = k * T / K, k = 0..K-1, the same for every example
    RANDOM = "random"  # t drawn per (example, draw) from the seeded stream


# --- measurement / output functions ------------------------------------------
# Each maps (output, target, t, task) -> per-example value of shape (B,): ``output`` is the network's
# output, ``target`` what the task's objective regresses it on at levels ``t``.
Measurement = Callable[[Tensor, Tensor, Tensor, "DiffusionTask"], Tensor]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _weighted(w: Tensor | None, value: Tensor) -> Tensor:
    return value if w is None else w.to(device=value.device, dtype=value.dtype) * value


def _loss(pred: Tensor, target: Tensor, t: Tensor, task: DiffusionTask) -> Tensor:
    # the objective's training loss, w(t) ||target - f_theta(x_t, t)||^2 / D; for epsilon-prediction
    # L_simple of Ho et al. (2020), eq. 14
    return _weighted(task.objective.loss_weight(t), _flat(pred - target).pow(2).mean(1))


def _elbo(pred: Tensor, target: Tensor, t: Tensor, task: DiffusionTask) -> Tensor:
    # Ho et al. (2020), eq. 12 with sigma_t^2 = beta_t, in the objective's own prediction (Objective.elbo_weight)
    return _weighted(task.objective.elbo_weight(t), _flat(pred - target).pow(2).mean(1))


MEASUREMENTS: dict[str, Measurement] = {
    "loss": _loss,
    "loss_at_time": _loss,  # same formula; the task fixes t (DiffusionTask.measure_time)
    "elbo": _elbo,
    # D-TRAK (Zheng et al. 2024, Table 1) output functions of the network output alone:
    "square_norm": lambda p, e, t, task: _flat(p).pow(2).mean(1),
    "l1_norm": lambda p, e, t, task: _flat(p).abs().sum(1),
    "l2_norm": lambda p, e, t, task: _flat(p).norm(dim=1),
    "linf_norm": lambda p, e, t, task: _flat(p).abs().amax(1),
    "mean": lambda p, e, t, task: _flat(p).mean(1),
}


def condition_kwargs(model: Any, cond: Tensor | None) -> dict[str, Tensor]:
    """The conditioning keyword ``model`` takes for one condition per row: caption embeddings (rows x
    tokens x dim) as ``encoder_hidden_states`` for a ``UNet2DConditionModel``, class labels as
    ``class_labels`` for a UNet with class embeddings; none for a network that takes no condition
    (an unconditional diffusers UNet evaluated on labelled data ignores the labels). A network that
    is not a diffusers model gets ``class_labels`` for integers and ``encoder_hidden_states`` for floats,
    when its ``forward`` takes that keyword."""
    config = getattr(model, "config", None)
    if cond is None:
        if config is not None and (getattr(model, "class_embedding", None) is not None or getattr(config, "cross_attention_dim", None) is not None):
            what = "text-conditional (cross-attention) but got no caption embeddings" if getattr(config, "cross_attention_dim", None) is not None else "class-conditional but got no class labels"
            raise WherefromError(f"{type(model).__name__} is {what}; give the queries' conditions (cond=) and train on items that carry a 'label' (or 'cond')")
        return {}
    if config is None:
        key = "encoder_hidden_states" if cond.is_floating_point() else "class_labels"
        params = inspect.signature(model.forward if isinstance(model, nn.Module) else model).parameters.values()
        return {key: cond} if any(p.name == key or p.kind is p.VAR_KEYWORD for p in params) else {}
    if getattr(config, "cross_attention_dim", None) is not None:
        return {"encoder_hidden_states": cond}
    if getattr(model, "class_embedding", None) is not None:
        return {"class_labels": cond}
    return {}


def network_output(out: Any) -> Tensor:
    """The prediction in a network's output (diffusers returns it as ``.sample``)."""
    return out.sample if hasattr(out, "sample") else out


def predict(model: nn.Module, x_t: Tensor, time: Tensor, cond: Tensor | None = None) -> Tensor:
    """The output of a diffusers UNet or a plain module at network input ``x_t`` and network time ``time``
    (:meth:`DiffusionTask.model_time`), given each row's condition (when it takes one)."""
    return network_output(model(x_t, time, **condition_kwargs(model, cond)))


def chunk_rows(model: nn.Module, x_t: Tensor, time: Tensor, cond: Tensor | None = None, share: int = 2, extra: int = 0) -> int:
    """How many network rows like ``x_t[0]`` (time ``time[0]``, condition ``cond[0]``) fit in ``1 / share``
    of the memory budget (:mod:`wherefrom.memory`): ``ACTIVATION_FACTOR`` x what autograd keeps per row,
    plus ``extra`` bytes per row (e.g. what recording hooks hold). Call it before attaching hooks that
    record forwards: it runs the network on one and two rows."""
    rows = lambda z, n: None if z is None else z[:1].detach().clone().repeat(n, *[1] * (z.dim() - 1))  # noqa: E731 - any rows have the same footprint
    key = (tuple(x_t.shape[1:]), x_t.dtype, x_t.device, None if cond is None else (tuple(cond.shape[1:]), cond.dtype))
    # the input requires grad: a graph even with frozen weights
    per_row = memory.activation_bytes(model, lambda n: predict(model, rows(x_t, n).requires_grad_(), rows(time, n), rows(cond, n)), key)
    return memory.rows_within(memory.budget(x_t.device) // share, memory.ACTIVATION_FACTOR * per_row + extra)


def condition(batch: dict[str, Tensor]) -> Tensor | None:
    """The condition of a batch's rows: its ``"cond"`` (what the network takes), else its class ``"label"``."""
    return batch.get("cond", batch.get("label"))


class DiffusionTask:
    """A training objective (:mod:`wherefrom.objective`), seeded draws and measurements.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule: the ``DDPMScheduler`` schedule of the
            DDPM family (used when ``objective`` is one of its prediction types).
        seed: root of every seeded draw.
        measure_time: the fixed level of the ``loss_at_time`` measurement.
        objective: ``epsilon`` (default), ``v_prediction`` or ``sample`` on that schedule; ``flow_matching`` or
            ``edm`` with their defaults; a ``{"type": ..., **settings}`` record (:attr:`config` writes one);
            or an :class:`~wherefrom.objective.Objective` instance, e.g. a user's own.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        seed: int = 0,
        measure_time: int = 100,
        objective: str | dict[str, Any] | Objective = "epsilon",
    ) -> None:
        schedule = dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule)
        if isinstance(objective, str) and objective in PREDICTIONS:
            self.objective: Objective = DDPMObjective(objective, **schedule)
        else:
            if schedule != _DEFAULT_SCHEDULE:
                raise WherefromError(f"objective {objective!r} carries its own schedule; leave num_train_timesteps and beta_* unset (got {schedule})")
            self.objective = build_objective(objective)
        levels = self.objective.num_levels
        if not 0 <= measure_time < levels:
            raise WherefromError(f"measure_time={measure_time} is outside [0, {levels}); pick a timestep in range")
        self.num_train_timesteps = levels
        self.seed = seed
        self.measure_time = measure_time
        self.config: dict[str, Any] = {"seed": seed, "measure_time": measure_time}
        recorded = objective_config(self.objective)
        named = {k: recorded.get(k) for k in _DEFAULT_SCHEDULE}
        if recorded["type"] == "ddpm" and all(recorded[k] == v for k, v in _PLAIN_DDPM.items()):
            # a named schedule: the flat record every store and export has held (one form for equal objectives)
            self.config = {**named, **self.config} | ({} if recorded["prediction_type"] == "epsilon" else {"objective": recorded["prediction_type"]})
        else:
            self.config["objective"] = recorded

    def reseeded(self, seed: int) -> DiffusionTask:
        """The same objective with another root seed."""
        config = {**self.config, "seed": seed}
        if isinstance(config.get("objective"), dict):
            config["objective"] = self.objective
        return DiffusionTask(**config)

    @classmethod
    def from_scheduler(cls, scheduler: Any, seed: int = 0) -> DiffusionTask:
        """The task of the diffusers scheduler a model was trained with (:func:`~wherefrom.objective.objective_from_scheduler`:
        the DDPM family with any prediction type and schedule, flow matching, EDM); anything else is refused in one line."""
        objective = objective_from_scheduler(scheduler)
        return cls(seed=seed, measure_time=min(100, objective.num_levels // 10), objective=objective)

    # --- seeded draws ----------------------------------------------------------
    def draw(
        self,
        index: Tensor,
        draw: int,
        shape: Sequence[int],
        *,
        stream: Stream = Stream.TRAIN,
        t: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> tuple[Tensor, Tensor]:
        """Seeded ``(t, eps)`` for each global index: a pure function of
        ``(seed, stream, index, draw)``. ``t`` fixes the level for all examples."""
        ts, noise = [], []
        for i in index.tolist():
            g = generator_for(self.seed, int(stream), i, draw)
            ti = self.objective.draw_level(g)
            ts.append(ti if t is None else torch.tensor([t]))
            noise.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))  # fixed dtype: same draws under any default dtype
        return (
            torch.cat(ts).to(device),
            torch.stack(noise).to(device=device, dtype=dtype),
        )

    def timesteps(self, strategy: TimestepStrategy | str, k: int) -> list[int | None]:
        """The K fixed levels of a strategy (``None`` = drawn per example)."""
        strategy = TimestepStrategy(strategy)
        if k < 1:
            raise WherefromError(f"the number of timesteps K must be >= 1, got {k}")
        if strategy is TimestepStrategy.UNIFORM:
            return list(self.objective.uniform_levels(k))
        return [None] * k

    def add_noise(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """The network's input at levels ``t`` (the objective's forward process; diffusers' ``add_noise`` for the DDPM family)."""
        return self.objective.noised(x0, t, eps)

    def model_time(self, t: Tensor) -> Tensor:
        """The network's time input at levels ``t``."""
        return self.objective.model_time(t)

    # --- losses and measurements -------------------------------------------------
    def loss(self, model: nn.Module, x0: Tensor, index: Tensor, draw: int = 0, cond: Tensor | None = None) -> Tensor:
        """Per-example training loss ``w(t) ||target - f_theta(x_t, t, c)||^2 / D`` on the TRAIN stream."""
        return self.measure(model, x0, index, "loss", draws=[(draw, None)], stream=Stream.TRAIN, cond=cond)

    def measure(
        self,
        model: nn.Module,
        x0: Tensor,
        index: Tensor,
        name: str,
        draws: Sequence[tuple[int, int | None]],
        stream: Stream = Stream.MEASURE,
        cond: Tensor | None = None,
    ) -> Tensor:
        """Per-example measurement ``name`` averaged over ``draws`` = [(draw id, t or None)], under
        each example's condition ``cond`` (``None``: unconditional)."""
        fn = self.measurement(name)
        total = x0.new_zeros(x0.shape[0])
        rows = len(x0) if torch.is_grad_enabled() else None  # under autograd every row's graph is kept for the backward anyway
        for d, t in draws:
            x_t, tt, target = self.noisy(x0, index, name, d, t, stream)
            time = self.model_time(tt)
            rows = rows or chunk_rows(model, x_t, time, cond)  # without: the examples of a draw in chunks of the memory budget
            for s in range(0, len(x0), rows):
                c = None if cond is None else cond[s : s + rows]
                total[s : s + rows] += fn(predict(model, x_t[s : s + rows], time[s : s + rows], c), target[s : s + rows], tt[s : s + rows], self)
        return total / len(draws)

    def noisy(
        self, x0: Tensor, index: Tensor, name: str, draw: int, t: int | None, stream: Stream = Stream.MEASURE
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The seeded ``(x_t, t, target)`` at which measurement ``name`` evaluates ``draw``: the network
        input, the levels and the objective's target (``loss_at_time`` pins ``t`` to :attr:`measure_time`)."""
        if name == "loss_at_time":
            t = self.measure_time
        tt, eps = self.draw(index, draw, x0.shape[1:], stream=stream, t=t, dtype=x0.dtype, device=x0.device)
        return self.objective.noised(x0, tt, eps), tt, self.objective.target(x0, tt, eps)

    def weight(self, name: str, t: Tensor) -> Tensor | None:
        """The per-row weight measurement ``name`` puts on the squared error at levels ``t`` (``None``: 1)."""
        return self.objective.elbo_weight(t) if name == "elbo" else self.objective.loss_weight(t)

    @staticmethod
    def measurement(name: str) -> Measurement:
        if name not in MEASUREMENTS:
            raise WherefromError(f"unknown measurement {name!r}; choose one of {sorted(MEASUREMENTS)}")
        return MEASUREMENTS[name]


_DEFAULT_SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
_PLAIN_DDPM = dict(trained_betas=None, rescale_betas_zero_snr=False, timestep_spacing="leading", steps_offset=0)  # settings of a named schedule
