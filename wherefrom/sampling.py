"""Sampling chains with fixed exogenous noise: ancestral DDPM and deterministic DDIM for the DDPM
family, Euler for flow matching, Euler and Heun for EDM (the step math is the objective's,
:mod:`wherefrom.objective`).

The step equations are written out (rather than calling ``scheduler.step``) so
that the whole chain is plain differentiable torch code: forward-mode AD
(synthetic ablation) and dual tensors flow through it, and the exogenous noise
of query ``q`` at step ``k`` is a pure function of ``(seed, q, k)`` so runs with
different models or member weights are comparable step by step. The schedule
constants come from the task's diffusers scheduler; tests check each step
against ``DDPMScheduler.step`` / ``DDIMScheduler.step`` / ``FlowMatchEulerDiscreteScheduler.step``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from wherefrom.errors import WherefromError
from wherefrom.objective import SchedulerType
from wherefrom.progress import progress_bar
from wherefrom.task import DiffusionTask, Stream, generator_for

EpsFn = Callable[..., Tensor]  # (x_t, time) -> network output, or (x_t, time, cond) -> output with each row's condition


def guided(eps_fn: EpsFn, guidance: float, null: Tensor | None) -> EpsFn:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6 with ``guidance = 1 + w``):
    ``eps(x, null) + guidance (eps(x, c) - eps(x, null))``, both halves in one batch.
    ``guidance = 1`` (or no condition) is ``eps_fn`` itself."""
    if guidance == 1.0:
        return eps_fn
    if null is None:
        raise WherefromError(f"guidance {guidance} needs a model trained with a null condition (condition dropout)")

    def eps(x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            return eps_fn(x, t)
        none = null.to(cond.device).expand_as(cond)
        both = eps_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, none]))
        c, u = both.chunk(2)
        return u + guidance * (c - u)

    return eps


def exogenous_noise(seed: int, queries: Sequence[int], step: int, shape: Sequence[int]) -> Tensor:
    """Noise of each query at a step (``step = -1`` is the initial ``x_T``)."""
    # float32 draws whatever the default dtype, so float64 runs see the same noise
    return torch.stack(
        [torch.randn(tuple(shape), generator=generator_for(seed, int(Stream.SAMPLE), q, step), dtype=torch.float32) for q in queries]
    )


def sampling_plan(task: DiffusionTask, steps: int, scheduler: SchedulerType | str = SchedulerType.AUTO) -> list[float]:
    """The ``steps + 1`` noise positions the chain visits (the objective's :meth:`~wherefrom.objective.Objective.plan`:
    descending timesteps spaced as diffusers' ``set_timesteps`` for the DDPM family, sigmas otherwise),
    after checking ``steps`` and that the objective samples with ``scheduler``."""
    if not 1 <= steps <= task.num_train_timesteps:
        raise WherefromError(f"steps must be in [1, {task.num_train_timesteps}], got {steps}")
    task.objective.sampler(scheduler)
    return task.objective.plan(steps)


def sample(
    eps_fn: EpsFn,
    task: DiffusionTask,
    shape: Sequence[int],
    queries: Sequence[int],
    seed: int,
    steps: int = 100,
    scheduler: SchedulerType | str = SchedulerType.AUTO,
    clip_sample: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    x_T: Tensor | None = None,
    progress: bool = False,
    cond: Tensor | None = None,
) -> Tensor:
    """Run the reverse chain for the given query ids; returns ``x_0`` (Q x C x H x W).

    Only the current ``x_t`` is kept, so memory does not grow with ``steps``
    (also under forward-mode AD). ``x_T`` overrides the seeded initial noise;
    ``cond`` holds each query's condition (class labels or embeddings, aligned with ``queries``).
    """
    plan = sampling_plan(task, steps, scheduler)
    scheduler = task.objective.sampler(scheduler)
    x = task.objective.initial(exogenous_noise(seed, queries, -1, shape).to(device=device, dtype=dtype)) if x_T is None else x_T
    if cond is not None:
        if len(cond) != len(queries):
            raise WherefromError(f"need one condition per query: {len(queries)} queries, {len(cond)} conditions")
        cond = cond.to(device)
    fn = eps_fn if cond is None else (lambda z, time: eps_fn(z, time, cond))
    for k in progress_bar(range(steps), desc="sampling", disable=not progress, leave=False):
        noise = exogenous_noise(seed, queries, k, shape) if scheduler is SchedulerType.DDPM and k + 1 < steps else None
        x = task.objective.step(fn, x, plan, k, scheduler, noise, clip_sample)
    return x


def generate(
    eps_fn: EpsFn,
    task: DiffusionTask,
    shape: Sequence[int],
    num_samples: int,
    seed: int = 0,
    steps: int = 100,
    scheduler: SchedulerType | str = SchedulerType.AUTO,
    batch_size: int = 256,
    progress: bool = False,
    cond: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """:func:`sample` for queries ``0..num_samples-1`` in batches (results do not depend on ``batch_size``);
    ``cond``: query ``q``'s condition is ``cond[q]``."""
    if batch_size < 1:
        raise WherefromError(f"batch_size must be >= 1, got {batch_size}")
    if cond is not None and len(cond) != num_samples:
        raise WherefromError(f"need one condition per sample: {num_samples} samples, {len(cond)} conditions")
    sampling_plan(task, steps, scheduler)  # validates steps and the scheduler before any work is shown
    out = []
    for start in progress_bar(range(0, num_samples, batch_size), desc="generating", disable=not progress):
        queries = list(range(start, min(start + batch_size, num_samples)))
        part = None if cond is None else cond[queries[0] : queries[-1] + 1]
        out.append(sample(eps_fn, task, shape, queries, seed, steps, scheduler, progress=progress, cond=part, **kwargs))
    return torch.cat(out)
