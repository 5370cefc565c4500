"""Ensemble leave-one-out: exact counterfactuals as ground truth, no retraining
(Dai, Yew & Gifford, "Where did you learn that?").

For a sample of training indices x, exact ablation drops the members that saw x
(``ablation_weights([x])``), renormalises the rest and reruns the sampler with
the same exogenous noise; the distance between the full and the ablated sample
is x's true leave-one-out effect on that query. Each attribution method is then
graded per query by the Spearman correlation between its scores of the sampled
indices and those distances (mean over queries, bootstrap interval).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from wherefrom.errors import WherefromError
from wherefrom.evaluation.distances import distance_fn
from wherefrom.evaluation.stats import BootstrapConfig, Correlation, spearman_rows
from wherefrom.progress import progress_bar
from wherefrom.task import mix_seed


def sample_indices(split: np.ndarray, num: int, seed: int) -> np.ndarray:
    """``num`` sorted training indices drawn without replacement from ``split`` (all when ``num >= len``)."""
    split = np.sort(np.asarray(split, dtype=np.int64))
    if num >= len(split):
        return split
    return np.sort(np.random.default_rng(mix_seed(seed)).choice(split, size=num, replace=False))


@dataclass
class LeaveOneOut:
    """Exact leave-one-out distances ``distances[q, j]`` of query q when ``indices[j]`` is ablated."""

    indices: np.ndarray
    samples: Tensor
    distances: np.ndarray

    def correlation(self, scores: np.ndarray, bootstrap: BootstrapConfig | None = None) -> Correlation:
        """Per-query Spearman between a method's scores (Q x N) of the sampled indices and the distances."""
        scores = np.asarray(scores)
        if scores.ndim != 2 or scores.shape[0] != len(self.samples) or scores.shape[1] <= self.indices.max():
            raise WherefromError(
                f"scores of shape {scores.shape} do not cover {len(self.samples)} queries and training index {int(self.indices.max())}; "
                "attribute the same generated queries on the same ensemble"
            )
        return Correlation.of(spearman_rows(scores[:, self.indices], self.distances), bootstrap)


@torch.no_grad()
def leave_one_out(
    module,
    indices: np.ndarray,
    num_queries: int,
    seed: int = 0,
    steps: int = 100,
    scheduler: str = "auto",
    distance: str = "l2",
    progress: bool = False,
) -> LeaveOneOut:
    """Exact ablation of each of ``indices`` for queries ``0..num_queries-1``
    generated with ``(seed, steps, scheduler)``, as the attributed samples were."""
    if not hasattr(module, "ablation_weights"):
        raise WherefromError("leave-one-out needs an encoded-ensemble checkpoint (exact ablation); this one is a single model")
    sampler = module.sampler(seed=seed, steps=steps, scheduler=scheduler)
    queries = list(range(num_queries))
    full = sampler.sample(queries)
    fn = distance_fn(distance)
    distances = np.zeros((num_queries, len(indices)))
    for j, index in enumerate(progress_bar(indices, desc="leave-one-out", disable=not progress)):
        ablated = sampler.sample(queries, sampler.ablation_weights([int(index)]))
        distances[:, j] = fn(full, ablated).double().cpu().numpy()
    return LeaveOneOut(np.asarray(indices, dtype=np.int64), full.cpu(), distances)
