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
    sample_rows,
)
from wherefrom.evaluation.distances import l2_distance
from wherefrom.evaluation.stats import BootstrapConfig, bootstrap_ci


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
) -> Removal:
    """Remove ``sets[q]`` for query ``q``. ``measurement`` holds the Q queries' losses as a quadratic in
    the member weights; with ``samples`` (the ensemble's samples ``query_ids``, same chain as ``sampler``)
    the chain is rerun without the dropped members and the distance reported too."""
    a = sampler.uniform_weights()
    weights, feasible = removal_weights(sampler.codes, sets, a)
    loss = (measurement.per_query(weights) - measurement(a)).numpy()
    loss[~feasible] = np.nan
    if samples is None:
        return Removal(np.asarray(sets), loss)
    ids = list(range(len(sets))) if query_ids is None else list(query_ids)
    ablated = torch.cat([sample_rows(sampler, ids[s : s + batch_size], weights[s : s + batch_size]) for s in range(0, len(ids), batch_size)])
    distance = l2_distance(samples.to(ablated), ablated).double().cpu().numpy()
    distance[~feasible] = np.nan
    return Removal(np.asarray(sets), loss, distance, ablated.cpu())


__all__ = ["Estimate", "Removal", "remove", "removal_weights"]
