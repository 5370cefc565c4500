"""Ensemble sampling with member weights, and exact ablation (Dai, Yew & Gifford, "Where did you learn that?").

Every denoising step uses ``eps(x_t, t) = sum_i a_i eps_i(x_t, t)`` with member
weights ``a`` (uniform by default), inside the shared DDPM/DDIM chain of
:mod:`wherefrom.sampling`, whose exogenous noise is fixed by ``(seed, query,
step)``: runs with different weights are comparable step by step, and the final
sample is a differentiable function of ``a`` (``a`` enters as a plain tensor, so
forward-mode dual tensors flow through it for synthetic ablation).

Exact ablation of training images ``X``: zero the weights of every member in
``S(x)`` for some ``x`` in ``X``, renormalise the rest to sum to 1 and rerun with
the same noise. By the encoded property the remaining members never saw ``X``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from wherefrom.ensemble.codes import Codes
from wherefrom.errors import WherefromError
from wherefrom.sampling import EpsFn, SchedulerType, generate, guided, sample
from wherefrom.task import DiffusionTask, predict


class EnsembleSampler:
    """DDPM/DDIM sampling from weighted ensemble members with fixed exogenous noise.

    Args:
        members: the member denoisers, in code order (member ``i`` has bit ``i``).
        task: the diffusion task (noise schedule) the members were trained with.
        image_shape: ``(C, H, W)`` of a sample.
        codes: the training codes; needed for :meth:`ablate` / :meth:`ablation_weights`.
        seed, steps, scheduler, clip_sample: the sampling chain (see :func:`wherefrom.sampling.sample`).
        dtype, device: of the chain (members must already be on ``device`` in a matching dtype).
        cond: the condition of query ``q`` is ``cond[q]`` (class labels or embeddings; ``None``: unconditional).
        guidance, null: classifier-free guidance scale and the null condition (:func:`wherefrom.sampling.guided`).
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        task: DiffusionTask,
        image_shape: Sequence[int],
        codes: Codes | None = None,
        *,
        seed: int = 0,
        steps: int = 100,
        scheduler: SchedulerType | str = SchedulerType.AUTO,
        clip_sample: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        cond: Tensor | None = None,
        guidance: float = 1.0,
        null: Tensor | None = None,
    ) -> None:
        if not members:
            raise WherefromError("an ensemble sampler needs at least one member")
        if codes is not None and codes.n != len(members):
            raise WherefromError(f"the codes are for {codes.n} members but {len(members)} were given")
        self.members = list(members)
        self.task, self.image_shape, self.codes = task, tuple(image_shape), codes
        self.seed, self.steps, self.scheduler = seed, steps, task.objective.sampler(scheduler)
        self.clip_sample, self.dtype, self.device = clip_sample, dtype, device
        self.cond, self.guidance, self.null = cond, guidance, null

    def conditions(self, queries: Sequence[int]) -> Tensor | None:
        """The conditions of these query ids (``None`` when unconditional)."""
        if self.cond is None:
            return None
        if max(queries, default=-1) >= len(self.cond):
            raise WherefromError(f"query {max(queries)} has no condition: the sampler holds {len(self.cond)}; pass one per query")
        return self.cond[list(queries)]

    @property
    def n(self) -> int:
        return len(self.members)

    def uniform_weights(self) -> Tensor:
        """``a_i = 1 / n``."""
        return torch.full((self.n,), 1.0 / self.n, dtype=torch.float64)

    def ablation_weights(self, indices: Sequence[int]) -> Tensor:
        """Uniform weights over the members that saw none of ``indices``; raises if none remain."""
        if self.codes is None:
            raise WherefromError("ablation needs the ensemble's codes; load an assembled or jointly trained ensemble checkpoint")
        kept = self.codes.kept_members(list(indices))
        weights = torch.zeros(self.n, dtype=torch.float64)
        weights[torch.from_numpy(kept)] = 1.0 / len(kept)
        return weights

    def eps_fn(self, weights: Tensor | None = None, skip_zero: bool = True) -> EpsFn:
        """``(x_t, t, c) -> sum_i a_i eps_i(x_t, t, c)``, with classifier-free ``guidance`` when set.

        Members whose weight is exactly 0 are not evaluated when ``skip_zero``;
        pass ``skip_zero=False`` to differentiate with respect to a zero weight.
        """
        a = self.uniform_weights() if weights is None else weights
        if a.shape != (self.n,):
            raise WherefromError(f"member weights must have shape ({self.n},), got {tuple(a.shape)}")
        active = [i for i, nz in enumerate((a.detach() != 0).tolist()) if nz or not skip_zero]
        if not active:
            raise WherefromError("all member weights are zero; give at least one member a non-zero weight")

        def eps(x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
            aa = a.to(device=x.device, dtype=x.dtype)
            out = aa[active[0]] * predict(self.members[active[0]], x, t, cond)
            for i in active[1:]:
                out = out + aa[i] * predict(self.members[i], x, t, cond)
            return out

        return guided(eps, self.guidance, self.null)

    def _chain(self, **overrides: Any) -> dict[str, Any]:
        return dict(seed=self.seed, steps=self.steps, scheduler=self.scheduler, clip_sample=self.clip_sample, dtype=self.dtype, device=self.device) | overrides

    def sample(self, queries: int | Sequence[int], weights: Tensor | None = None, skip_zero: bool = True, **overrides: Any) -> Tensor:
        """``x_0`` for the query ids (``int`` q means ``0..q-1``); ``overrides`` replace the chain settings."""
        queries = list(range(queries)) if isinstance(queries, int) else list(queries)
        kw = self._chain(**overrides)
        return sample(self.eps_fn(weights, skip_zero), self.task, self.image_shape, queries, kw.pop("seed"), cond=self.conditions(queries), **kw)

    def generate(self, num_samples: int, weights: Tensor | None = None, batch_size: int = 256, progress: bool = False, **overrides: Any) -> Tensor:
        """Queries ``0..num_samples-1`` in batches (same result for any ``batch_size``)."""
        kw = self._chain(**overrides)
        cond = self.conditions(range(num_samples))
        return generate(self.eps_fn(weights), self.task, self.image_shape, num_samples, kw.pop("seed"), batch_size=batch_size, progress=progress, cond=cond, **kw)

    def ablate(self, indices: Sequence[int], queries: int | Sequence[int], **overrides: Any) -> Tensor:
        """Exact ablation: the samples of ``queries`` without the members that saw any of ``indices``,
        with the same exogenous noise as :meth:`sample`."""
        return self.sample(queries, self.ablation_weights(indices), **overrides)
