"""The diffusion math in one place (DDPM epsilon-prediction, Ho et al. 2020).

Everything that needs a timestep, a noise draw, the training loss or a
measurement on an example goes through :class:`DiffusionTask`, so training,
featurisation (TRAK/D-TRAK), K-FAC factors and evaluation agree exactly.

Seeded draws: the ``(t, eps)`` of an example is a pure function of
``(seed, stream, global index, draw number)`` (see :func:`mix_seed`), so results
are identical whatever the batch size, order, worker count or DDP rank count.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from wherefrom.errors import WherefromError

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
# Each maps (eps_pred, eps, t, task) -> per-example value of shape (B,).
Measurement = Callable[[Tensor, Tensor, Tensor, "DiffusionTask"], Tensor]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _loss(eps_pred: Tensor, eps: Tensor, t: Tensor, task: DiffusionTask) -> Tensor:
    # L_simple of Ho et al. (2020), eq. 14: ||eps - eps_theta(x_t, t)||^2 (mean over pixels).
    return _flat(eps_pred - eps).pow(2).mean(1)


def _elbo(eps_pred: Tensor, eps: Tensor, t: Tensor, task: DiffusionTask) -> Tensor:
    # Ho et al. (2020), eq. 12 with sigma_t^2 = beta_t: weight beta_t / (2 alpha_t (1 - alphabar_t)).
    return task.elbo_weight(t).to(eps_pred.dtype) * _loss(eps_pred, eps, t, task)


MEASUREMENTS: dict[str, Measurement] = {
    "loss": _loss,
    "loss_at_time": _loss,  # same formula; the task fixes t (DiffusionTask.measure_time)
    "elbo": _elbo,
    # D-TRAK (Zheng et al. 2024, Table 1) output functions of eps_theta alone:
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
    is not a diffusers model gets ``class_labels`` for integers and ``encoder_hidden_states`` for floats."""
    if cond is None:
        return {}
    config = getattr(model, "config", None)
    if config is None:
        return {"encoder_hidden_states": cond} if cond.is_floating_point() else {"class_labels": cond}
    if getattr(config, "cross_attention_dim", None) is not None:
        return {"encoder_hidden_states": cond}
    if getattr(model, "class_embedding", None) is not None:
        return {"class_labels": cond}
    return {}


def eps_output(out: Any) -> Tensor:
    """The noise prediction in a network's output (diffusers returns it as ``.sample``)."""
    return out.sample if hasattr(out, "sample") else out


def predict_eps(model: nn.Module, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
    """Noise prediction of a diffusers UNet or a plain module, given each row's condition (when it takes one)."""
    return eps_output(model(x_t, t, **condition_kwargs(model, cond)))


def condition(batch: dict[str, Tensor]) -> Tensor | None:
    """The condition of a batch's rows: its ``"cond"`` (what the network takes), else its class ``"label"``."""
    return batch.get("cond", batch.get("label"))


class DiffusionTask:
    """DDPM noise schedule, seeded draws, training loss and measurements.

    Args:
        num_train_timesteps: T of the forward process.
        beta_start, beta_end, beta_schedule: the diffusers ``DDPMScheduler`` schedule.
        seed: root of every seeded draw.
        measure_time: the fixed t of the ``loss_at_time`` measurement.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        seed: int = 0,
        measure_time: int = 100,
    ) -> None:
        if num_train_timesteps < 2:
            raise WherefromError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        if not 0 <= measure_time < num_train_timesteps:
            raise WherefromError(
                f"measure_time={measure_time} is outside [0, {num_train_timesteps}); pick a timestep in range"
            )
        # diffusers on first use: importing wherefrom's math stays light
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
        )
        self.num_train_timesteps = num_train_timesteps
        self.seed = seed
        self.measure_time = measure_time
        self.config = dict(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            seed=seed,
            measure_time=measure_time,
        )
        self.betas = self.scheduler.betas.double()
        self.alphas_cumprod = self.scheduler.alphas_cumprod.double()

    # settings of a diffusers scheduler that change the training target or the schedule, and the values honoured
    HONOURED = {"prediction_type": "epsilon", "trained_betas": None, "rescale_betas_zero_snr": False}

    @classmethod
    def from_scheduler(cls, scheduler: Any, seed: int = 0) -> DiffusionTask:
        """The task of a diffusers scheduler (``DDPMScheduler``, ``DDIMScheduler``, ...) a model was trained with.

        Only the noise schedule enters (``num_train_timesteps``, ``beta_start``, ``beta_end``,
        ``beta_schedule``); a setting that would change the training target or the schedule in a way
        this task does not model (``prediction_type`` other than ``epsilon``, custom ``trained_betas``,
        zero-SNR rescaling) is refused rather than silently ignored.
        """
        config = getattr(scheduler, "config", None)
        if config is None or "num_train_timesteps" not in config:
            raise WherefromError(f"{type(scheduler).__name__} is not a diffusers noise scheduler (it has no config.num_train_timesteps)")
        for key, value in cls.HONOURED.items():
            got = config.get(key, value)
            if (got is not None) if value is None else (got != value):
                raise WherefromError(
                    f"{type(scheduler).__name__} has {key}={got!r}; wherefrom's attribution models {key}={value!r} only "
                    "(eps-prediction DDPM with a named beta schedule)"
                )
        steps = int(config["num_train_timesteps"])
        schedule = (float(config["beta_start"]), float(config["beta_end"]), str(config["beta_schedule"]))
        return cls(steps, *schedule, seed=seed, measure_time=min(100, steps // 10))

    # --- schedule ------------------------------------------------------------
    def elbo_weight(self, t: Tensor) -> Tensor:
        """``beta_t / (2 alpha_t (1 - alphabar_t))`` (Ho et al. 2020, eq. 12)."""
        t = t.cpu()
        beta = self.betas[t]
        w = beta / (2 * (1 - beta) * (1 - self.alphas_cumprod[t]))
        return w.float()

    def add_noise(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``x_t = sqrt(alphabar_t) x0 + sqrt(1 - alphabar_t) eps`` (Ho et al. 2020, eq. 4)."""
        ab = self.alphas_cumprod[t.cpu()].to(device=x0.device, dtype=x0.dtype).view(-1, *[1] * (x0.dim() - 1))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

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
        ``(seed, stream, index, draw)``. ``t`` fixes the timestep for all examples."""
        ts, noise = [], []
        for i in index.tolist():
            g = generator_for(self.seed, int(stream), i, draw)
            ti = torch.randint(0, self.num_train_timesteps, (1,), generator=g)
            ts.append(ti if t is None else torch.tensor([t]))
            noise.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))  # fixed dtype: same draws under any default dtype
        return (
            torch.cat(ts).to(device),
            torch.stack(noise).to(device=device, dtype=dtype),
        )

    def timesteps(self, strategy: TimestepStrategy | str, k: int) -> list[int | None]:
        """The K fixed timesteps of a strategy (``None`` = drawn per example)."""
        strategy = TimestepStrategy(strategy)
        if k < 1:
            raise WherefromError(f"the number of timesteps K must be >= 1, got {k}")
        if strategy is TimestepStrategy.UNIFORM:
            return [j * self.num_train_timesteps // k for j in range(k)]
        return [None] * k

    # --- losses and measurements -------------------------------------------------
    def loss(self, model: nn.Module, x0: Tensor, index: Tensor, draw: int = 0, cond: Tensor | None = None) -> Tensor:
        """Per-example training loss ``||eps - eps_theta(x_t, t, c)||^2 / D`` on the TRAIN stream."""
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
        for d, t in draws:
            x_t, tt, eps = self.noisy(x0, index, name, d, t, stream)
            total = total + fn(predict_eps(model, x_t, tt, cond), eps, tt, self)
        return total / len(draws)

    def noisy(
        self, x0: Tensor, index: Tensor, name: str, draw: int, t: int | None, stream: Stream = Stream.MEASURE
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The seeded ``(x_t, t, eps)`` at which measurement ``name`` evaluates ``draw``
        (``loss_at_time`` pins ``t`` to :attr:`measure_time`)."""
        if name == "loss_at_time":
            t = self.measure_time
        tt, eps = self.draw(index, draw, x0.shape[1:], stream=stream, t=t, dtype=x0.dtype, device=x0.device)
        return self.add_noise(x0, tt, eps), tt, eps

    @staticmethod
    def measurement(name: str) -> Measurement:
        if name not in MEASUREMENTS:
            raise WherefromError(f"unknown measurement {name!r}; choose one of {sorted(MEASUREMENTS)}")
        return MEASUREMENTS[name]
