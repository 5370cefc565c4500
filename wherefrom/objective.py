"""Training objectives: what is drawn, how ``x_t`` is formed, what the network is trained to predict
with which weight, and how its chain samples (the task room; :class:`~wherefrom.task.DiffusionTask`
holds one and every other room goes through it).

Every objective indexes its noise levels by an integer ``t`` in ``[0, num_levels)``, larger meaning
noisier, so a seeded draw is an integer and a noise tensor whatever the objective (the seeded-draws
contract). Built-ins, each read from the diffusers scheduler a model was trained with
(:func:`objective_from_scheduler`):

* :class:`DDPMObjective`: epsilon, v (Salimans & Ho 2022, eq. 5) or x0 ("sample") prediction on any
  DDPM/DDIM-family schedule (named, custom ``trained_betas``, zero-terminal-SNR rescaling, Lin et al. 2024);
* :class:`FlowMatching`: rectified flow, ``x_t = (1 - s) x0 + s eps`` with target ``eps - x0``
  (Liu et al. 2023; Esser et al. 2024, eq. 3), ``FlowMatchEulerDiscreteScheduler``'s shifted sigmas and
  SD3's timestep densities and loss weightings;
* :class:`EDM`: Karras et al. (2022), Table 1: log-normal sigma, ``c_skip``, ``c_out``, ``c_in``, ``c_noise``.

An own objective subclasses :class:`Objective` (in the spirit of kronfluence's ``Task``): it says how
``x_t`` is formed (:meth:`~Objective.noised`), what the network sees as time (:meth:`~Objective.model_time`),
the regression target (:meth:`~Objective.target`) and optionally a per-level weight
(:meth:`~Objective.loss_weight`); every attribution method then works under the library's seeded draws.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from wherefrom.errors import WherefromError

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (network input, network time) -> network output


class SchedulerType(str, enum.Enum):
    """The reverse chain: ``auto`` is the objective's own (DDPM for the DDPM family, Euler otherwise)."""

    AUTO = "auto"
    DDPM = "ddpm"
    DDIM = "ddim"
    EULER = "euler"
    HEUN = "heun"


def _rows(v: Tensor, like: Tensor) -> Tensor:
    """Per-row values broadcast over ``like``'s trailing dimensions, in its dtype and device."""
    return v.to(device=like.device, dtype=like.dtype).view(-1, *[1] * (like.dim() - 1))


class Objective:
    """What a diffusion model is trained on. Subclasses implement :meth:`noised` and :meth:`target`,
    and may override the rest; :meth:`config` returns the keyword arguments that rebuild it."""

    num_levels: int = 1000
    samplers: tuple[SchedulerType, ...] = ()  # the chains it samples with, the first being its default

    # --- what is drawn -----------------------------------------------------------------
    def draw_level(self, g: torch.Generator) -> Tensor:
        """One seeded noise level (a 1-element long tensor); uniform over the levels by default."""
        return torch.randint(0, self.num_levels, (1,), generator=g)

    def uniform_levels(self, k: int) -> list[int]:
        """``K`` levels spread over the level distribution (D-TRAK's "uniform" timesteps): ``j T / K``."""
        return [j * self.num_levels // k for j in range(k)]

    # --- the forward process and the regression ---------------------------------------
    def noised(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """The network's input at levels ``t`` for clean images ``x0`` and noise ``eps``."""
        raise NotImplementedError

    def model_time(self, t: Tensor) -> Tensor:
        """The time input the network is given at levels ``t`` (the level itself by default)."""
        return t

    def target(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """What the network output regresses on."""
        raise NotImplementedError

    def loss_weight(self, t: Tensor) -> Tensor | None:
        """Per-row weight of the squared error at levels ``t`` (``None``: 1, the usual case)."""
        return None

    def elbo_weight(self, t: Tensor) -> Tensor:
        """Per-row weight that turns the squared error into an ELBO term, where one is modelled."""
        raise WherefromError(f"{type(self).__name__} has no ELBO weighting; measure 'loss', 'loss_at_time' or 'square_norm'")

    def config(self) -> dict[str, Any]:
        return {}

    # --- sampling ---------------------------------------------------------------------
    def sampler(self, scheduler: SchedulerType | str) -> SchedulerType:
        """The checked chain for ``scheduler`` (``auto``: the objective's default)."""
        scheduler = SchedulerType(scheduler)
        if not self.samplers:
            raise WherefromError(f"{type(self).__name__} defines no sampler; generate the queries in your pipeline and pass them")
        if scheduler is SchedulerType.AUTO:
            return self.samplers[0]
        if scheduler not in self.samplers:
            raise WherefromError(f"{type(self).__name__} samples with {[s.value for s in self.samplers]}, not {scheduler.value!r}; pick one of those (or 'auto')")
        return scheduler

    def plan(self, steps: int) -> list[float]:
        """The ``steps + 1`` noise positions of the chain, in the order they are visited, the last the clean image's."""
        raise NotImplementedError

    def initial(self, noise: Tensor) -> Tensor:
        """``x`` at the start of the chain from standard normal ``noise``."""
        return noise

    def step(self, fn: ModelFn, x: Tensor, plan: Sequence[float], k: int, scheduler: SchedulerType, noise: Tensor | None, clip: bool) -> Tensor:
        """One reverse step from ``plan[k]`` to ``plan[k + 1]``."""
        raise NotImplementedError


# --- the DDPM family ----------------------------------------------------------------------

PREDICTIONS = ("epsilon", "v_prediction", "sample")


class DDPMObjective(Objective):
    """Epsilon, v or x0 prediction on a diffusers ``DDPMScheduler`` schedule (Ho et al. 2020).

    Args:
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample`` (x0), as diffusers names them.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr,
        timestep_spacing, steps_offset: the schedule, exactly as ``DDPMScheduler`` takes it.
    """

    samplers = (SchedulerType.DDPM, SchedulerType.DDIM)

    def __init__(
        self,
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        rescale_betas_zero_snr: bool = False,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ) -> None:
        if prediction_type not in PREDICTIONS:
            raise WherefromError(f"prediction_type must be one of {list(PREDICTIONS)}, got {prediction_type!r}")
        if num_train_timesteps < 2:
            raise WherefromError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        if prediction_type == "epsilon" and rescale_betas_zero_snr:
            raise WherefromError("epsilon prediction cannot reach x0 at zero terminal SNR (abar_T = 0); rescale_betas_zero_snr needs v_prediction (Lin et al. 2024, Sec. 3.2)")
        if trained_betas is not None and len(trained_betas) != num_train_timesteps:
            raise WherefromError(f"trained_betas has {len(trained_betas)} values for num_train_timesteps={num_train_timesteps}; give one beta per timestep")
        from diffusers import DDPMScheduler  # on first use: importing wherefrom's math stays light

        self._config = dict(
            prediction_type=prediction_type, num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=None if trained_betas is None else [float(b) for b in trained_betas],
            rescale_betas_zero_snr=rescale_betas_zero_snr, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
        )  # fmt: skip
        try:
            self.scheduler = DDPMScheduler(**self._config)
        except (NotImplementedError, ValueError) as e:
            raise WherefromError(f"cannot build the noise schedule: {e}") from None
        self.prediction_type = prediction_type
        self.num_levels = num_train_timesteps
        self.betas = self.scheduler.betas.double()
        self.alphas_cumprod = self.scheduler.alphas_cumprod.double()

    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def _ab(self, t: Tensor, like: Tensor) -> Tensor:
        return _rows(self.alphas_cumprod[t.cpu()], like)

    def noised(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4)
        ab = self._ab(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def target(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        ab = self._ab(t, x0)  # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, eq. 5)
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0

    def elbo_weight(self, t: Tensor) -> Tensor:
        """Ho et al. (2020), eq. 12 with ``sigma_t^2 = beta_t``: ``beta_t / (2 alpha_t (1 - abar_t))`` on the
        epsilon error, times ``d eps / d prediction`` squared: ``abar_t`` for v, ``abar_t / (1 - abar_t)`` for x0
        (written with ``abar_{t-1}`` so zero-terminal-SNR schedules stay finite)."""
        t = t.cpu()
        beta, ab = self.betas[t], self.alphas_cumprod[t]
        if self.prediction_type == "epsilon":
            return (beta / (2 * (1 - beta) * (1 - ab))).float()
        ab_prev = torch.where(t > 0, self.alphas_cumprod[(t - 1).clamp(min=0)], torch.ones_like(ab))
        w = beta * ab_prev / (2 * (1 - ab))
        return (w if self.prediction_type == "v_prediction" else w / (1 - ab)).float()

    def split(self, out: Tensor, x: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """``(x0, eps)`` predicted by network output ``out`` at ``x = x_t`` (as ``DDIMScheduler.step``)."""
        ab = float(self.alphas_cumprod[t])
        if self.prediction_type == "epsilon":  # Ho et al. (2020), eq. 15
            return (x - (1 - ab) ** 0.5 * out) / ab**0.5, out
        if self.prediction_type == "sample":
            return out, (x - ab**0.5 * out) / (1 - ab) ** 0.5
        return ab**0.5 * x - (1 - ab) ** 0.5 * out, ab**0.5 * out + (1 - ab) ** 0.5 * x

    def plan(self, steps: int) -> list[float]:
        """Descending timesteps, spaced as diffusers' ``set_timesteps`` (``timestep_spacing``), then -1 (``x_0``)."""
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps)
        return [int(t) for t in sched.timesteps] + [-1]

    def step(self, fn: ModelFn, x: Tensor, plan: Sequence[float], k: int, scheduler: SchedulerType, noise: Tensor | None, clip: bool) -> Tensor:
        t, t_prev = int(plan[k]), int(plan[k + 1])
        out = fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        return self.denoise_step(scheduler, x, out, t, t_prev, noise, clip)

    def denoise_step(self, scheduler: SchedulerType, x: Tensor, out: Tensor, t: int, t_prev: int, noise: Tensor | None, clip: bool) -> Tensor:
        """``x_t -> x_{t_prev}`` given the network output ``out`` (``t_prev < 0``: the final step to ``x_0``)."""
        ab_t = float(self.alphas_cumprod[t])
        ab_prev = float(self.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
        x0, eps = self.split(out, x, t)
        if clip:
            x0 = x0.clamp(-1, 1)
        if scheduler is SchedulerType.DDIM:
            # Song et al. (2021), eq. 12 with sigma = 0; eps from the unclipped output (diffusers default)
            return ab_prev**0.5 * x0 + (1 - ab_prev) ** 0.5 * eps
        beta = 1 - ab_t / ab_prev
        # posterior mean of q(x_{t-1} | x_t, x0) (Ho et al. 2020, eq. 7)
        mean = (ab_prev**0.5 * beta / (1 - ab_t)) * x0 + ((1 - beta) ** 0.5 * (1 - ab_prev) / (1 - ab_t)) * x
        if t_prev < 0 or noise is None:
            return mean
        var = max((1 - ab_prev) / (1 - ab_t) * beta, 1e-20)  # "fixed_small" variance
        return mean + var**0.5 * noise.to(mean)


# --- flow matching -----------------------------------------------------------------------

DENSITIES = ("uniform", "logit_normal", "mode")
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def _normal_quantile(q: float) -> float:
    return math.sqrt(2) * torch.erfinv(torch.tensor(2 * q - 1, dtype=torch.float64)).item()


class FlowMatching(Objective):
    """Rectified flow (Liu et al. 2023) on ``FlowMatchEulerDiscreteScheduler``'s sigmas: ``x_t = (1 - s) x0
    + s eps``, target ``eps - x0``, network time ``s T`` (Esser et al. 2024, eq. 3 and Sec. 3.1).

    Args:
        num_train_timesteps, shift: the scheduler's training sigmas, ``s' = shift s / (1 + (shift - 1) s)``.
        density: how a training step draws ``s`` (SD3's ``weighting_scheme``): ``uniform``, ``logit_normal``
            (``logit_mean``, ``logit_std``) or ``mode`` (``mode_scale``); the scheduler does not record it.
        weighting: SD3's loss weighting, ``none``, ``sigma_sqrt`` (``s^-2``) or ``cosmap``.
        precondition_outputs: SD3's DreamBooth default: the loss is taken on ``x0 = x_t - s v``, i.e. the
            velocity loss times ``s^2``.
    """

    samplers = (SchedulerType.EULER,)

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        density: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        weighting: str = "none",
        precondition_outputs: bool = False,
    ) -> None:
        if density not in DENSITIES:
            raise WherefromError(f"density must be one of {list(DENSITIES)}, got {density!r}")
        if weighting not in FLOW_WEIGHTINGS:
            raise WherefromError(f"weighting must be one of {list(FLOW_WEIGHTINGS)}, got {weighting!r}")
        if num_train_timesteps < 2 or shift <= 0 or logit_std <= 0:
            raise WherefromError(f"need num_train_timesteps >= 2, shift > 0 and logit_std > 0 (got {num_train_timesteps}, {shift}, {logit_std})")
        from diffusers import FlowMatchEulerDiscreteScheduler

        self._config = dict(num_train_timesteps=num_train_timesteps, shift=shift, density=density, logit_mean=logit_mean,
                            logit_std=logit_std, mode_scale=mode_scale, weighting=weighting, precondition_outputs=precondition_outputs)  # fmt: skip
        self.density, self.weighting, self.precondition_outputs = density, weighting, precondition_outputs
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
        self.num_levels = num_train_timesteps
        # level t is the scheduler's training index T - 1 - t, so larger t is noisier
        self.sigmas = self.scheduler.sigmas.double().flip(0)
        self.times = self.scheduler.timesteps.double().flip(0)

    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def _level(self, u: float) -> int:
        """The level of SD3's ``u`` in [0, 1]: the training index ``floor(u T)`` (``u = 0`` is the noisiest)."""
        return self.num_levels - 1 - max(0, min(int(u * self.num_levels), self.num_levels - 1))

    def _u(self, q: float, z: float) -> float:
        """SD3's ``compute_density_for_timestep_sampling`` from a uniform ``q`` and a standard normal ``z``."""
        if self.density == "logit_normal":
            return 1 / (1 + math.exp(-(self.logit_mean + self.logit_std * z)))
        if self.density == "mode":
            return 1 - q - self.mode_scale * (math.cos(math.pi * q / 2) ** 2 - 1 + q)
        return q

    def draw_level(self, g: torch.Generator) -> Tensor:
        if self.density == "uniform":
            return super().draw_level(g)
        z = torch.randn(1, generator=g, dtype=torch.float64).item() if self.density == "logit_normal" else 0.0
        q = torch.rand(1, generator=g, dtype=torch.float64).item() if self.density == "mode" else 0.0
        return torch.tensor([self._level(self._u(q, z))])

    def uniform_levels(self, k: int) -> list[int]:
        if self.density == "uniform":
            return super().uniform_levels(k)
        qs = [(j + 0.5) / k for j in range(k)]  # quantiles of the density, as "uniform" is of the uniform one
        return sorted(self._level(self._u(q, _normal_quantile(q))) for q in qs)

    def _s(self, t: Tensor, like: Tensor) -> Tensor:
        return _rows(self.sigmas[t.cpu()], like)

    def noised(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        s = self._s(t, x0)  # FlowMatchEulerDiscreteScheduler.scale_noise
        return (1 - s) * x0 + s * eps

    def model_time(self, t: Tensor) -> Tensor:
        return self.times[t.cpu()].to(device=t.device, dtype=torch.float32)

    def target(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return eps - x0

    def loss_weight(self, t: Tensor) -> Tensor | None:
        """SD3's ``compute_loss_weighting_for_sd3``, times ``s^2`` with ``precondition_outputs``."""
        s = self.sigmas[t.cpu()]
        w = {"sigma_sqrt": s**-2, "cosmap": 2 / (math.pi * (1 - 2 * s + 2 * s**2))}.get(self.weighting)
        if self.precondition_outputs:
            w = s**2 if w is None else w * s**2
        return None if w is None else w.float()

    def plan(self, steps: int) -> list[float]:
        """``FlowMatchEulerDiscreteScheduler.set_timesteps``'s sigmas, ending at 0."""
        sched = type(self.scheduler).from_config(self.scheduler.config)
        sched.set_timesteps(steps)
        return [float(s) for s in sched.sigmas]

    def step(self, fn: ModelFn, x: Tensor, plan: Sequence[float], k: int, scheduler: SchedulerType, noise: Tensor | None, clip: bool) -> Tensor:
        s, s_next = plan[k], plan[k + 1]
        v = fn(x, torch.full((x.shape[0],), s * self.num_levels, device=x.device, dtype=torch.float32))
        x_next = x + (s_next - s) * v  # Euler step of dx/ds = v (FlowMatchEulerDiscreteScheduler.step)
        return x_next.clamp(-1, 1) if clip and s_next == 0 else x_next  # the last step lands on x0: clipped like the DDPM family's


# --- EDM ---------------------------------------------------------------------------------


class EDM(Objective):
    """Karras et al. (2022), Table 1: ``x = x0 + sigma eps``, ``D(x) = c_skip x + c_out F(c_in x, c_noise)``,
    ``ln sigma ~ N(p_mean, p_std^2)``, loss ``lambda(sigma) ||D(x) - x0||^2`` with ``lambda = 1 / c_out^2``,
    i.e. the unit-weight error of ``F`` against ``(x0 - c_skip x) / c_out``. The log-normal draw is taken
    at ``num_levels`` equally likely quantiles, so levels stay integers.

    Args:
        sigma_data, sigma_min, sigma_max, rho, prediction_type: ``EDMEulerScheduler``'s settings
            (``v_prediction`` flips the sign of ``c_out`` as diffusers does).
        p_mean, p_std: the training log-normal (EDM's defaults -1.2, 1.2).
    """

    samplers = (SchedulerType.EULER, SchedulerType.HEUN)

    def __init__(
        self,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        prediction_type: str = "epsilon",
        num_levels: int = 1000,
    ) -> None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise WherefromError(f"EDM's prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        if not 0 < sigma_min < sigma_max or sigma_data <= 0 or p_std <= 0 or num_levels < 2:
            raise WherefromError("EDM needs 0 < sigma_min < sigma_max, sigma_data > 0, p_std > 0 and num_levels >= 2")
        self._config = dict(sigma_data=sigma_data, p_mean=p_mean, p_std=p_std, sigma_min=sigma_min, sigma_max=sigma_max,
                            rho=rho, prediction_type=prediction_type, num_levels=num_levels)  # fmt: skip
        self.sigma_data, self.prediction_type, self.num_levels = sigma_data, prediction_type, num_levels
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        from diffusers import EDMEulerScheduler

        self.scheduler = EDMEulerScheduler(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data, rho=rho,
                                           prediction_type=prediction_type, num_train_timesteps=num_levels)  # fmt: skip
        q = (torch.arange(num_levels, dtype=torch.float64) + 0.5) / num_levels
        self.sigmas = torch.exp(p_mean + p_std * math.sqrt(2) * torch.erfinv(2 * q - 1))  # ascending

    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def precondition(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` of Karras et al. (2022), Table 1."""
        sd2 = self.sigma_data**2
        root = (sigma**2 + sd2).sqrt()
        c_out = sigma * self.sigma_data / root
        return sd2 / (sigma**2 + sd2), (c_out if self.prediction_type == "epsilon" else -c_out), 1 / root, 0.25 * sigma.log()

    def _c(self, t: Tensor, like: Tensor) -> tuple[Tensor, ...]:
        return tuple(_rows(c, like) for c in self.precondition(self.sigmas[t.cpu()]))

    def noised(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        _, _, c_in, _ = self._c(t, x0)
        return c_in * (x0 + _rows(self.sigmas[t.cpu()], x0) * eps)

    def model_time(self, t: Tensor) -> Tensor:
        return self.precondition(self.sigmas[t.cpu()])[3].to(device=t.device, dtype=torch.float32)

    def target(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        c_skip, c_out, _, _ = self._c(t, x0)
        return (x0 - c_skip * (x0 + _rows(self.sigmas[t.cpu()], x0) * eps)) / c_out

    def denoised(self, fn: ModelFn, x: Tensor, sigma: float) -> Tensor:
        """``D(x; sigma)`` (Karras et al. 2022, eq. 7)."""
        c_skip, c_out, c_in, c_noise = (float(c) for c in self.precondition(torch.tensor(sigma, dtype=torch.float64)))
        return c_skip * x + c_out * fn(c_in * x, torch.full((x.shape[0],), c_noise, device=x.device, dtype=torch.float32))

    def plan(self, steps: int) -> list[float]:
        """Karras et al. (2022), eq. 5: ``sigma_max`` to ``sigma_min`` in ``rho``-warped steps, then 0."""
        if steps == 1:
            return [self.sigma_max, 0.0]
        a, b = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        return [(a + i / (steps - 1) * (b - a)) ** self.rho for i in range(steps)] + [0.0]

    def initial(self, noise: Tensor) -> Tensor:
        return self.sigma_max * noise

    def step(self, fn: ModelFn, x: Tensor, plan: Sequence[float], k: int, scheduler: SchedulerType, noise: Tensor | None, clip: bool) -> Tensor:
        # Karras et al. (2022), Algorithm 1: an Euler step of dx/dsigma = (x - D(x)) / sigma, Heun's correction
        s, s_next = plan[k], plan[k + 1]
        clean = lambda z, sigma: self.denoised(fn, z, sigma).clamp(-1, 1) if clip else self.denoised(fn, z, sigma)  # noqa: E731
        d = (x - clean(x, s)) / s
        x_next = x + (s_next - s) * d
        if scheduler is SchedulerType.HEUN and s_next > 0:
            d_next = (x_next - clean(x_next, s_next)) / s_next
            x_next = x + (s_next - s) * (d + d_next) / 2
        return x_next


# --- from a diffusers scheduler --------------------------------------------------------

OBJECTIVES: dict[str, type[Objective]] = {"ddpm": DDPMObjective, "flow_matching": FlowMatching, "edm": EDM}
# settings of a scheduler that change training or sampling in ways no built-in models, and their modelled values
_UNMODELLED = {
    "FlowMatch": {"use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False,
                  "use_exponential_sigmas": False, "use_beta_sigmas": False, "stochastic_sampling": False},
    "EDM": {"sigma_schedule": "karras", "final_sigmas_type": "zero"},
    "DDPM": {"thresholding": False, "variance_type": "fixed_small", "timestep_type": "discrete", "snr_shift_scale": 1.0},
}  # fmt: skip


def objective_from_scheduler(scheduler: Any) -> Objective:
    """The built-in objective of a diffusers scheduler a model was trained with: the DDPM family
    (``DDPMScheduler``, ``DDIMScheduler``, ...: any ``beta_*`` schedule), ``FlowMatchEulerDiscreteScheduler``
    or an ``EDM*Scheduler``. A setting none of them models is refused in one line."""
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", None)
    if config is None or "num_train_timesteps" not in config:
        raise WherefromError(f"{name} is not a diffusers noise scheduler (it has no config.num_train_timesteps)")
    family = "FlowMatch" if name.startswith("FlowMatch") else "EDM" if name.startswith("EDM") else "DDPM" if "beta_schedule" in config else None
    if family is None:
        raise WherefromError(f"{name} is neither a DDPM-family, flow-matching nor EDM scheduler; give the module a DiffusionTask with your own Objective")
    for key, value in _UNMODELLED[family].items():
        if key in config and config[key] != value and not (key == "variance_type" and config[key] is None):
            raise WherefromError(f"{name} has {key}={config[key]!r}; wherefrom models {key}={value!r} only; give the module a DiffusionTask with your own Objective")
    if family == "FlowMatch":
        return FlowMatching(int(config["num_train_timesteps"]), float(config.get("shift", 1.0)))
    if family == "EDM":
        keys = ("sigma_data", "sigma_min", "sigma_max", "rho", "prediction_type")
        return EDM(**{k: config[k] for k in keys if k in config}, num_levels=int(config["num_train_timesteps"]))
    keys = ("prediction_type", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "rescale_betas_zero_snr", "timestep_spacing", "steps_offset")  # fmt: skip
    kwargs = {k: config[k] for k in keys if k in config and config[k] is not None}
    if "trained_betas" in kwargs:
        kwargs["trained_betas"] = [float(b) for b in kwargs["trained_betas"]]
    return DDPMObjective(**kwargs)


def build_objective(spec: str | dict[str, Any] | Objective) -> Objective:
    """An objective from a name (``epsilon``, ``v_prediction``, ``sample``, ``flow_matching``, ``edm``), a
    ``{"type": name, ...}`` config (as :meth:`~wherefrom.task.DiffusionTask.config` records it) or itself."""
    if isinstance(spec, Objective):
        return spec
    if isinstance(spec, str):
        return DDPMObjective(prediction_type=spec) if spec in PREDICTIONS else build_objective({"type": spec})
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind == "own":  # a user's Objective subclass, by its import path, rebuilt from its config()
        import importlib

        module, _, qualname = str(spec.pop("class", "")).partition(":")
        try:
            cls = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
        except (ImportError, AttributeError, ValueError):
            raise WherefromError(f"cannot import the own objective {module}:{qualname}; install the package that defines it") from None
        try:
            return cls(**spec)
        except TypeError as e:
            raise WherefromError(f"own objective {module}:{qualname} cannot be rebuilt from its recorded config ({e}); make config() return its __init__ arguments") from None
    if kind not in OBJECTIVES:
        raise WherefromError(f"unknown objective {kind!r}; choose one of {list(PREDICTIONS) + [k for k in OBJECTIVES if k != 'ddpm']}")
    try:
        return OBJECTIVES[kind](**spec)
    except TypeError as e:
        raise WherefromError(f"objective {kind!r}: {e}") from None


def objective_config(objective: Objective) -> dict[str, Any]:
    """The ``{"type": name, ...}`` record that :func:`build_objective` rebuilds an objective from (an own
    objective: ``{"type": "own", "class": "module:QualName", **config()}``)."""
    cls = type(objective)
    for kind, built_in in OBJECTIVES.items():
        if cls is built_in:
            return {"type": kind, **objective.config()}
    if cls.config in (b.config for b in OBJECTIVES.values()) and cls.__init__ not in (b.__init__ for b in OBJECTIVES.values()):
        raise WherefromError(f"own objective {cls.__name__} takes its own arguments but inherits config(); define config() returning them, so stores and exports record it")
    return {"type": "own", "class": f"{cls.__module__}:{cls.__qualname__}", **objective.config()}


__all__ = ["DDPMObjective", "EDM", "FlowMatching", "Objective", "SchedulerType", "build_objective", "objective_from_scheduler"]
