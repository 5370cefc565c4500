"""Synthetic ablation: attribution of every training image from one Jacobian
(Dai, Yew & Gifford, "Where did you learn that?", section "Synthetic ablation").

With the exogenous noise fixed (:mod:`wherefrom.sampling`), the final sample of
query ``q`` is a function ``x0(a)`` of the member weights ``a`` (every step uses
``eps = sum_i a_i eps_i``). Exact ablation of training image ``x`` reruns the
chain at ``a'(x)``, the weights with the members in ``S(x)`` zeroed and the rest
renormalised. Synthetic ablation linearises instead::

    x0(a'(x)) ~ x0(a) + J (a'(x) - a),      J = d x0 / d a   (D x n per query)

``J`` takes ``n`` forward-mode Jacobian-vector products through the whole chain
(one per member weight), after which every training image costs ``O(n^2)``:
with ``d(x) = a'(x) - a`` and the Gram matrix ``G = J^T J`` (n x n),

    score(x) = ||J d(x)||_2 = sqrt(d(x)^T G d(x)),

for all N images at once as ``sqrt(rowsum((D G) * D))`` with ``D`` the N x n
matrix of the ``d(x)`` (larger = more influential). No loop over N, and the
cost does not depend on the image size once ``G`` is formed.

Forward mode keeps only the current ``x_t`` and its tangents, so memory does not
grow with the number of steps. Fused SDPA kernels have no forward-AD (or vmap)
rule, so the chain runs under ``sdpa_kernel(SDPBackend.MATH)`` (:func:`forward_ad_mode`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.module import register_module_forward_pre_hook

from wherefrom.ensemble.codes import Codes
from wherefrom.ensemble.controls import image_scores
from wherefrom.ensemble.sampler import EnsembleSampler
from wherefrom.errors import WherefromError
from wherefrom.progress import progress_bar
from wherefrom.sampling import EpsFn, guided, sample
from wherefrom.task import chunk_rows, predict

# The JVP primal of the CLI's queries is recomputed with the MATH attention kernel, whose
# rounding differs from the fused one; beyond this (images in [-1, 1]) they are other samples.
QUERY_TOLERANCE = 1e-2


class JacobianStrategy(str, enum.Enum):
    """How the ``n`` tangents ``e_1..e_n`` of the member weights are pushed through the chain.

    ``vmap``: ``torch.func.vmap`` over ``torch.func.jvp`` tangents; the primal is computed once
    and every op applies to the n tangents as one batch. ``rows``: the tangents in the batch
    dimension (each query repeated n times, row block j carrying ``e_j``); every row recomputes
    the primal. ``sequential``: one JVP per tangent, the primal recomputed each time.
    ``benchmarks/bench_synthetic.py`` times all three; ``vmap`` was fastest at realistic sizes.
    """

    VMAP = "vmap"
    ROWS = "rows"
    SEQUENTIAL = "sequential"


def _contiguous_group_norm_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    # diffusers' attention blocks hand a permuted tensor to the next GroupNorm, and F.group_norm's
    # forward AD / vmap rejected non-contiguous input before pytorch PR #186414 (DESIGN.md pitfalls)
    if isinstance(module, nn.GroupNorm) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


@contextmanager
def forward_ad_mode() -> Iterator[None]:
    """No reverse-mode graph, the MATH attention kernel (fused SDPA has no forward-AD/vmap rule)
    and contiguous GroupNorm inputs."""
    handle = register_module_forward_pre_hook(_contiguous_group_norm_input)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        handle.remove()


def row_weighted_eps(members: Sequence[nn.Module], weights: Tensor, guidance: float = 1.0, null: Tensor | None = None) -> EpsFn:
    """``(x_t, t, c) -> sum_i weights[b, i] eps_i(x_t, t, c)[b]``: member weights per row (B x n), each
    member guided (classifier-free guidance is linear in eps, so this is the guided mixture).

    ``weights`` may be a dual tensor (forward AD); every member is evaluated.
    """
    fns = [guided(partial(predict, m), guidance, null) for m in members]

    def eps(x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        w = weights.to(dtype=x.dtype, device=x.device)
        c = () if cond is None else (cond,)
        out = w[:, 0].view(-1, 1, 1, 1) * fns[0](x, t, *c)
        for i in range(1, len(members)):
            out = out + w[:, i].view(-1, 1, 1, 1) * fns[i](x, t, *c)
        return out

    return eps


def sample_rows(sampler: EnsembleSampler, queries: Sequence[int], weights: Tensor) -> Tensor:
    """``x_0`` of query ``queries[b]`` with member weights ``weights[b]`` (B x n), all rows in one
    chain with the sampler's settings and exogenous noise (row b equals ``sampler.sample([q], weights[b])``)."""
    if weights.shape != (len(queries), sampler.n):
        raise WherefromError(f"row weights must have shape ({len(queries)}, {sampler.n}), got {tuple(weights.shape)}")
    s = sampler
    eps = row_weighted_eps(s.members, weights, s.guidance, s.null)
    return sample(eps, s.task, s.image_shape, list(queries), s.seed, s.steps, s.scheduler, s.clip_sample, s.dtype, s.device, cond=s.conditions(queries))


def budget_rows(sampler: EnsembleSampler) -> int:
    """How many rows a chain of the sampler's members may carry at once within the memory budget
    (:func:`wherefrom.task.chunk_rows` of the first member: the members share one architecture)."""
    x = torch.zeros(1, *sampler.image_shape, dtype=sampler.dtype, device=sampler.device)
    time = sampler.task.model_time(torch.zeros(1, dtype=torch.long, device=sampler.device))
    return chunk_rows(sampler.members[0], x, time, sampler.conditions([0]))


@torch.no_grad()
def sample_rows_batched(sampler: EnsembleSampler, queries: Sequence[int], weights: Tensor, batch_size: int = 64, desc: str | None = None) -> Tensor:
    """:func:`sample_rows` in chains of ``batch_size`` rows, fewer where the memory budget holds fewer (the same
    rows: each row's noise is its query's), with a progress bar labelled ``desc`` when given."""
    batch_size = min(batch_size, budget_rows(sampler))
    starts = progress_bar(range(0, len(queries), batch_size), desc=desc, disable=desc is None)
    return torch.cat([sample_rows(sampler, queries[s : s + batch_size], weights[s : s + batch_size]) for s in starts])


def _weights(sampler: EnsembleSampler, weights: Tensor | None) -> Tensor:
    a = sampler.uniform_weights() if weights is None else weights.detach().to(torch.float64).cpu()
    if a.shape != (sampler.n,):
        raise WherefromError(f"member weights must have shape ({sampler.n},), got {tuple(a.shape)}")
    if not torch.isclose(a.sum(), torch.ones((), dtype=a.dtype)):
        raise WherefromError(f"member weights must sum to 1 (ablation renormalises to that), got sum {float(a.sum()):.6g}")
    return a


def _jacobian_block(sampler: EnsembleSampler, queries: list[int], a: Tensor, strategy: JacobianStrategy) -> tuple[Tensor, Tensor]:
    """``(x0, J)`` for one block of queries: ``Q x C x H x W`` and ``Q x D x n``."""
    n, q = sampler.n, len(queries)
    eye = torch.eye(n, dtype=a.dtype)

    def chain(w: Tensor) -> Tensor:
        return sampler.sample(queries, w, skip_zero=False)  # zero weights still get a derivative

    if strategy is JacobianStrategy.VMAP:
        # randomness="same": the seeded exogenous noise is identical for every tangent
        x0, tangents = torch.func.vmap(lambda v: torch.func.jvp(chain, (a,), (v,)), out_dims=(None, 0), randomness="same")(eye)
    elif strategy is JacobianStrategy.ROWS:
        rows, row_tangents = a.expand(n * q, n).contiguous(), eye.repeat_interleave(q, dim=0)  # row j*q + k carries e_j
        x0, tangents = torch.func.jvp(lambda w: sample_rows(sampler, queries * n, w), (rows,), (row_tangents,))
        x0, tangents = x0[:q], tangents.reshape(n, q, *x0.shape[1:])
    else:
        cols = [torch.func.jvp(chain, (a,), (eye[j],)) for j in range(n)]
        x0, tangents = cols[0][0], torch.stack([c[1] for c in cols])
    return x0, tangents.flatten(2).permute(1, 2, 0)  # n x Q x D -> Q x D x n


@dataclass(frozen=True)
class Linearization:
    """The final samples ``x0`` (Q x C x H x W) of ``queries`` as a linear function of the member
    weights around ``weights``: ``x0(a') ~ x0 + J (a' - a)``, ``J`` = :attr:`jacobian` (Q x D x n)."""

    queries: list[int]
    x0: Tensor
    jacobian: Tensor
    weights: Tensor

    def gram(self) -> Tensor:
        """``G_q = J_q^T J_q`` (Q x n x n, float64)."""
        j = self.jacobian.double()
        return j.transpose(1, 2) @ j

    def distances(self, deltas: Tensor, gram: Tensor | None = None) -> Tensor:
        """``||J_q d||_2`` for every query q and weight change ``d`` (rows of ``deltas``, N x n): Q x N.

        ``||J d||^2 = d^T G d``, so for all rows at once ``rowsum((D G_q) * D)`` — O(N n^2) per query.
        """
        g = self.gram() if gram is None else gram
        d = deltas.to(torch.float64).to(g.device)
        sq = torch.stack([((d @ g_q) * d).sum(1) for g_q in g])
        return sq.clamp_min(0).sqrt()  # rounding can make d^T G d slightly negative for d in J's null space

    def ablation_distances(self, bits: np.ndarray) -> Tensor:
        """``||J_q (a'(c) - a)||_2`` for each code row ``c`` (N x n bool): how far each query moves, to first order, when a code's members are dropped (Q x N)."""
        return self.distances(ablated_weights(self.weights, bits) - self.weights)

    def counterfactuals(self, deltas: Tensor) -> Tensor:
        """Synthetic counterfactuals ``x0_q + J_q d_{q,k}`` for per-query weight changes ``deltas`` (Q x K x n): Q x K x C x H x W."""
        d = deltas.to(self.jacobian)
        moved = torch.einsum("qpn,qkn->qkp", self.jacobian, d)
        return self.x0.unsqueeze(1) + moved.reshape(*d.shape[:2], *self.x0.shape[1:])


def linearize(
    sampler: EnsembleSampler,
    queries: int | Sequence[int],
    weights: Tensor | None = None,
    *,
    strategy: JacobianStrategy | str = JacobianStrategy.VMAP,
    batch_size: int | None = None,
    progress: bool = False,
) -> Linearization:
    """``x0`` and ``J = d x0 / d a`` of the sampler's chain (its seed, steps, scheduler) for ``queries``
    (``int`` q means ``0..q-1``) at member weights ``weights`` (default uniform), by forward-mode AD.

    ``batch_size`` queries go through the chain together (default all, fewer where the memory budget
    holds fewer: each carries ``n`` tangents); memory is ``O(batch_size * n * activations)`` whatever
    the number of steps.
    """
    queries = list(range(queries)) if isinstance(queries, int) else [int(q) for q in queries]
    if not queries:
        raise WherefromError("linearize needs at least one query")
    if batch_size is not None and batch_size < 1:
        raise WherefromError(f"batch_size must be >= 1, got {batch_size}")
    strategy = JacobianStrategy(strategy)
    a = _weights(sampler, weights)
    step = min(batch_size or len(queries), max(1, budget_rows(sampler) // sampler.n))
    x0, jac = [], []
    with forward_ad_mode():
        for start in progress_bar(range(0, len(queries), step), desc="jacobian", disable=not progress):
            x, j = _jacobian_block(sampler, queries[start : start + step], a, strategy)
            x0.append(x)
            jac.append(j)
    return Linearization(queries, torch.cat(x0), torch.cat(jac), a)


def jacobian(sampler: EnsembleSampler, queries: int | Sequence[int], weights: Tensor | None = None, **kwargs: Any) -> Tensor:
    """``J = d x0 / d a`` (Q x D x n) of the sampler's final samples; see :func:`linearize`."""
    return linearize(sampler, queries, weights, **kwargs).jacobian


def ablated_weights(weights: Tensor, bits: np.ndarray | Tensor) -> Tensor:
    """``a'(x)`` for each code row (N x n bool): the members in ``S(x)`` zeroed, the rest rescaled to sum 1.

    For uniform ``weights`` this is :meth:`EnsembleSampler.ablation_weights` (uniform over the kept members).
    """
    keep = ~torch.as_tensor(np.asarray(bits), dtype=torch.bool)
    kept = weights.to(torch.float64).unsqueeze(0) * keep
    total = kept.sum(1, keepdim=True)
    if (total <= 0).any():
        raise WherefromError("ablating a code removes every member with non-zero weight; nothing would remain to sample")
    return kept / total


def synthetic_scores(lin: Linearization, codes: Codes, num_images: int | None = None, controls: np.ndarray | None = None) -> np.ndarray:
    """Q x ``num_images`` scores: the L2 distance between ``x0`` and the synthetic counterfactual
    ``x0 + J (a'(x) - a)`` of every training index x (0 for indices outside the codes' split);
    with ``controls`` (unused codes), minus the member effect fitted on them (:mod:`wherefrom.ensemble.controls`)."""
    return image_scores(lin.ablation_distances, codes, num_images, controls)[0]


# --- signed scores: the change of a query's measurement under each image's ablation -------------------


@dataclass
class QuadraticMeasurement:
    """A loss-like measurement of Q queries as an exact quadratic in the member weights.

    With ``eps = sum_i a_i eps_i`` and the draws fixed, ``m(a) = c - 2 a^T b + a^T G a`` where,
    averaged over draws with weight ``w(t)`` (1 for ``loss``, Ho et al. 2020 eq. 12 for ``elbo``)
    and over pixels, ``G_ij = <eps_i, eps_j>``, ``b_i = <eps, eps_i>``, ``c = <eps, eps>``.
    ``gram``: Q x n x n, ``cross``: Q x n, ``const``: Q (float64).
    """

    gram: Tensor
    cross: Tensor
    const: Tensor

    def __call__(self, weights: Tensor) -> Tensor:
        """``m(a)`` for weights ``... x n`` per query: ``Q x ...`` (weights broadcast over queries)."""
        a = weights.to(torch.float64)
        quad = torch.einsum("...i,qij,...j->q...", a, self.gram, a)
        return self.const.view(-1, *[1] * (a.dim() - 1)) - 2 * torch.einsum("...i,qi->q...", a, self.cross) + quad

    def ablation_change(self, weights: Tensor, bits: np.ndarray) -> Tensor:
        """``m(a'(c)) - m(a)`` for each code row ``c`` (N x n bool) around member weights ``a``: Q x N."""
        return self(ablated_weights(weights, bits)) - self(weights).unsqueeze(1)

    def per_query(self, weights: Tensor) -> Tensor:
        """``m_q(a_q)`` for one weight vector per query (``Q x n``): ``Q``."""
        a = weights.to(torch.float64)
        return self.const - 2 * (a * self.cross).sum(1) + torch.einsum("qi,qij,qj->q", a, self.gram, a)


@torch.no_grad()
def quadratic_measurement(
    sampler: EnsembleSampler, queries: Tensor, measurement: str = "loss", draws: int = 64, seed: int = 0, cond: Tensor | None = None
) -> QuadraticMeasurement:
    """The members' outputs on ``draws`` seeded ``(t, eps)`` per query (MEASURE stream,
    query ``q`` as index ``q``, as in the LDS ground truth) under the queries' conditions ``cond``,
    reduced to :class:`QuadraticMeasurement`."""
    if measurement not in ("loss", "elbo"):
        raise WherefromError(f"signed ensemble scores take a loss-like measurement, loss or elbo; got {measurement!r}")
    if draws < 1:
        raise WherefromError(f"draws must be >= 1, got {draws}")
    task = sampler.task.reseeded(seed)
    x0 = queries.to(device=sampler.device, dtype=sampler.dtype)
    index = torch.arange(len(x0))
    gram = torch.zeros(len(x0), sampler.n, sampler.n, dtype=torch.float64)
    cross = torch.zeros(len(x0), sampler.n, dtype=torch.float64)
    const = torch.zeros(len(x0), dtype=torch.float64)
    cond = None if cond is None else cond.to(sampler.device)
    for d in range(draws):
        x_t, t, target = task.noisy(x0, index, measurement, d, None)
        w = task.weight(measurement, t)
        weight = (torch.ones(len(t)) if w is None else w).double().cpu() / target[0].numel() / draws
        time = task.model_time(t)
        e = torch.stack([predict(m, x_t, time, cond) for m in sampler.members], 1).flatten(2).double().cpu()  # Q x n x D
        target = target.flatten(1).double().cpu()
        gram += weight.view(-1, 1, 1) * (e @ e.transpose(1, 2))
        cross += weight.view(-1, 1) * torch.einsum("qnd,qd->qn", e, target)
        const += weight * target.pow(2).sum(1)
    return QuadraticMeasurement(gram, cross, const)


def measurement_scores(
    quad: QuadraticMeasurement, weights: Tensor, codes: Codes, num_images: int | None = None, controls: np.ndarray | None = None
) -> np.ndarray:
    """Q x ``num_images`` signed scores ``m(a'(x)) - m(a)``: how much ablating training image x raises
    each query's measurement (larger = more helpful; 0 outside the codes' split); with ``controls``
    (unused codes), minus the member effect fitted on them (:mod:`wherefrom.ensemble.controls`).

    Exact for the trained members (``m`` is quadratic in ``a``), for all N images in O(N n^2)."""
    return image_scores(partial(quad.ablation_change, weights), codes, num_images, controls)[0]


def exact_ablation(sampler: EnsembleSampler, queries: Sequence[int], indices: Sequence[int], batch_size: int = 64, progress: bool = False) -> Tensor:
    """Exact ablation of training index ``indices[b]`` for query ``queries[b]`` (B pairs): B x C x H x W,
    each equal to ``sampler.ablate([indices[b]], [queries[b]])``, in batches of ``batch_size`` pairs."""
    if len(queries) != len(indices):
        raise WherefromError(f"need one training index per query, got {len(queries)} queries and {len(indices)} indices")
    codes = sampler_codes(sampler)
    weights = ablated_weights(sampler.uniform_weights(), codes.bits[codes.rows(np.asarray(indices, dtype=np.int64))])
    return sample_rows_batched(sampler, queries, weights, batch_size, "exact ablation" if progress else None)


def sampler_codes(sampler: EnsembleSampler) -> Codes:
    """The codes of an ensemble's sampler (refused when it has none)."""
    if sampler.codes is None:
        raise WherefromError("synthetic ablation needs the ensemble's codes; load an assembled or jointly trained ensemble checkpoint")
    return sampler.codes


__all__ = [
    "JacobianStrategy",
    "Linearization",
    "QuadraticMeasurement",
    "ablated_weights",
    "measurement_scores",
    "quadratic_measurement",
    "exact_ablation",
    "forward_ad_mode",
    "jacobian",
    "linearize",
    "row_weighted_eps",
    "sample_rows",
    "sample_rows_batched",
    "sampler_codes",
    "synthetic_scores",
]
