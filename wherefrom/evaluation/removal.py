"""Exact removal counterfactuals on an encoded ensemble (Dai, Yew & Gifford, "Where did you learn that?").

Removing a set ``X`` of training images drops every member in ``S(X) = union of S(x)``; by the
encoded property the remaining members never saw ``X``, so without retraining

* the query's loss under the reduced ensemble is exact: ``m(a'(X)) - m(a)`` from the
  :class:`~wherefrom.ensemble.synthetic.QuadraticMeasurement` of the members' predictions;
* for the ensemble's own samples, rerunning the chain with the same exogenous noise gives the
  exact counterfactual sample, and ``||x_0 - x_0'(X)||`` how far the sample moved.

A method whose top-k images made the query moves it more than k random images do; both are
reported per query with bootstrap intervals over queries. A removal that would drop every
member is infeasible for that query (NaN, counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from wherefrom.ensemble.codes import Codes
from wherefrom.ensemble.sampler import EnsembleSampler
from wherefrom.ensemble.synthetic import (
    QuadraticMeasurement,
    ablated_weights,
    exact_ablation,
    quadratic_measurement,
    sample_rows_batched,
)
from wherefrom.errors import WherefromError
from wherefrom.evaluation.distances import l2_distance
from wherefrom.evaluation.stats import BootstrapConfig, bootstrap_ci, spearman_rows


@dataclass(frozen=True)
class Estimate:
    """A mean over queries with its 95% bootstrap interval (NaN entries, infeasible queries, left out)."""

    mean: float
    ci_low: float
    ci_high: float
    count: int

    @classmethod
    def of(cls, values: np.ndarray, bootstrap: BootstrapConfig | None = None) -> Estimate:
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        return cls(float(v.mean()), *bootstrap_ci(v, bootstrap), count=int(v.size))

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside the interval."""
        return not self.ci_low <= value <= self.ci_high

    def summary(self, fmt: str = "+.3g") -> str:
        return f"{self.mean:{fmt}} [{self.ci_low:{fmt}}, {self.ci_high:{fmt}}]"


def removal_weights(codes: Codes, sets: np.ndarray, weights: Tensor) -> tuple[Tensor, np.ndarray]:
    """Member weights without ``S(X_q)`` for each row ``X_q`` of ``sets`` (Q x k): ``Q x n`` (renormalised,
    :func:`~wherefrom.ensemble.synthetic.ablated_weights` of the union of the set's codes) and the feasibility
    mask (False where every member with weight would be dropped; those rows keep ``weights``)."""
    dropped = codes.bits[codes.rows(np.asarray(sets).ravel())].reshape(*np.shape(sets), codes.n).any(1)
    feasible = (torch.as_tensor(~dropped) & (weights != 0)).any(1).numpy()
    out = weights.to(torch.float64).repeat(len(dropped), 1)
    if feasible.any():
        out[torch.as_tensor(feasible)] = ablated_weights(weights, dropped[feasible])
    return out, feasible


@dataclass
class Removal:
    """Per-query effects of removing one set per query: ``loss`` (the rise of the query's loss),
    ``distance`` (L2 between the sample and its counterfactual; generated queries only) and the
    counterfactual ``samples``; NaN where the removal is infeasible."""

    sets: np.ndarray
    loss: np.ndarray
    distance: np.ndarray | None = None
    samples: Tensor | None = None

    @property
    def feasible(self) -> np.ndarray:
        return np.isfinite(self.loss)


@torch.no_grad()
def remove(
    sampler: EnsembleSampler,
    measurement: QuadraticMeasurement,
    sets: np.ndarray,
    samples: Tensor | None = None,
    query_ids: Sequence[int] | None = None,
    batch_size: int = 64,
    progress: str | None = None,
) -> Removal:
    """Remove ``sets[q]`` for query ``q``. ``measurement`` holds the Q queries' losses as a quadratic in
    the member weights; with ``samples`` (the ensemble's samples ``query_ids``, same chain as ``sampler``)
    the chain is rerun without the dropped members and the distance reported too (``progress``: a
    progress bar with this label)."""
    a = sampler.uniform_weights()
    weights, feasible = removal_weights(sampler.codes, sets, a)
    loss = (measurement.per_query(weights) - measurement(a)).numpy()
    loss[~feasible] = np.nan
    if samples is None:
        return Removal(np.asarray(sets), loss)
    ids = list(range(len(sets))) if query_ids is None else list(query_ids)
    ablated = sample_rows_batched(sampler, ids, weights, batch_size, progress)
    distance = l2_distance(samples.to(ablated), ablated).double().cpu().numpy()
    distance[~feasible] = np.nan
    return Removal(np.asarray(sets), loss, distance, ablated.cpu())


def top_in_split(scores: np.ndarray, split: np.ndarray, k: int) -> np.ndarray:
    """Each query's ``k`` highest-scoring training indices (ties: the lower index first): Q x k."""
    if not 1 <= k <= len(split):
        raise WherefromError(f"k must be in [1, {len(split)}] (the training images), got {k}")
    return split[np.argsort(-scores[:, split], axis=1, kind="stable")[:, :k]]


@torch.no_grad()
def synthetic_agreement(sampler: EnsembleSampler, scores: np.ndarray, samples: Tensor, top: int = 50, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Per query, the Spearman correlation between synthetic ablation's ``scores`` (Q x N; the queries are the
    sampler's samples ``0..Q-1``, ``samples``) and the exact distance ``||x_0 - x_0'(x)||`` of the sample
    redrawn without x's members, over the query's ``top`` highest-scoring images."""
    codes = sampler.codes
    idx = top_in_split(scores, codes.indices, top)
    pairs = np.repeat(np.arange(len(idx)), idx.shape[1])
    exact = exact_ablation(sampler, pairs.tolist(), idx.ravel().tolist(), batch_size, progress)
    moved = l2_distance(samples[torch.as_tensor(pairs)].to(exact), exact).double().cpu().numpy().reshape(idx.shape)
    return spearman_rows(np.take_along_axis(scores, idx, axis=1), moved)


@dataclass
class RemovalBenchmark:
    """The ensemble's exact ground truth for its own samples: each method's top-k removed (``removals``,
    ``random`` among them: k random images), and for each synthetic method the per-query rank agreement
    of its scores with exact ablation (``agreement``)."""

    k: int
    removals: dict[str, Removal]
    agreement: dict[str, np.ndarray]

    def table(self, bootstrap: BootstrapConfig | None = None, baseline: str = "random") -> str:
        """Markdown: per method, the mean loss rise and sample distance with 95% intervals over queries,
        and the paired difference to ``baseline``'s k images."""
        base = self.removals[baseline]
        lines = [f"| method (top-{self.k} removed) | loss rise | minus {baseline} | sample distance (L2) | minus {baseline} | infeasible |",
                 "|---|---|---|---|---|---|"]  # fmt: skip
        for name, r in self.removals.items():
            cells = [Estimate.of(r.loss, bootstrap).summary(), Estimate.of(r.loss - base.loss, bootstrap).summary()]
            cells += [Estimate.of(r.distance, bootstrap).summary(), Estimate.of(r.distance - base.distance, bootstrap).summary()]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {int((~r.feasible).sum())} |")
        for name, rho in self.agreement.items():
            lines.append(f"\nRank agreement of {name} with exact ablation (Spearman over each query's top images): {Estimate.of(rho, bootstrap).summary('+.3f')}")
        return "\n".join(lines)


def removal_benchmark(
    sampler: EnsembleSampler,
    samples: Tensor,
    scores: dict[str, np.ndarray],
    k: int = 10,
    draws: int = 128,
    seed: int = 1,
    synthetic: Sequence[str] = (),
    agreement_top: int = 50,
    batch_size: int = 64,
    progress: bool = False,
) -> RemovalBenchmark:
    """Remove each method's top-``k`` images (``scores``: Q x N per method) from the ensemble for each of
    its samples ``0..Q-1`` (``samples``, drawn by ``sampler``): the exact loss rise over ``draws``
    seeded draws (seed ``seed``) and the distance of the redrawn sample; for the methods named in
    ``synthetic``, the rank agreement of their scores with exact ablation over the top ``agreement_top``
    (``progress``: a bar per method)."""
    codes = sampler.codes
    if codes is None:
        raise WherefromError("the removal benchmark needs an encoded ensemble with codes")
    measurement = quadratic_measurement(sampler, samples, "loss", draws, seed=seed)
    ids = list(range(len(samples)))
    removals = {name: remove(sampler, measurement, top_in_split(s, codes.indices, k), samples, ids, batch_size, name if progress else None) for name, s in scores.items()}
    agreement = {name: synthetic_agreement(sampler, scores[name], samples, agreement_top, batch_size, progress) for name in synthetic}
    return RemovalBenchmark(k, removals, agreement)


__all__ = ["Estimate", "Removal", "RemovalBenchmark", "remove", "removal_benchmark", "removal_weights", "synthetic_agreement", "top_in_split"]
