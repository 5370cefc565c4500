"""Statistics every evaluation shares: Spearman correlations row by row (LDS, leave-one-out,
synthetic-vs-exact agreement) and percentile-bootstrap intervals of a mean over queries."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from wherefrom.errors import WherefromError


@dataclass
class BootstrapConfig:
    """Percentile bootstrap over queries for the LDS confidence interval."""

    resamples: int = 1000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resamples < 1 or not 0 < self.level < 1:
            raise WherefromError(f"bootstrap needs resamples >= 1 and level in (0, 1), got {self.resamples} and {self.level}")


def spearman_rows(predicted: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Spearman correlation (average ranks for ties) of each row pair.

    A constant row carries no ranking, so its correlation is defined as 0
    (scipy would return NaN) rather than being dropped from the mean.
    """
    predicted, targets = np.atleast_2d(predicted), np.atleast_2d(targets)
    out = np.zeros(len(predicted))
    for q, (p, t) in enumerate(zip(predicted, targets, strict=True)):
        if np.ptp(p) > 0 and np.ptp(t) > 0:
            out[q] = stats.spearmanr(p, t).statistic
    return out


def bootstrap_ci(values: np.ndarray, cfg: BootstrapConfig | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (NaN for fewer than 2 values)."""
    cfg = cfg or BootstrapConfig()
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return (float("nan"), float("nan"))
    if np.ptp(values) == 0:
        return (float(values[0]), float(values[0]))
    res = stats.bootstrap(
        (values,), np.mean, n_resamples=cfg.resamples, confidence_level=cfg.level, method="percentile", rng=np.random.default_rng(cfg.seed)
    )
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


@dataclass
class Correlation:
    """A per-query correlation (LDS, leave-one-out), its mean and bootstrap interval over queries."""

    mean: float
    ci_low: float
    ci_high: float
    per_query: list[float]

    @classmethod
    def of(cls, per_query: np.ndarray, bootstrap: BootstrapConfig | None = None) -> Correlation:
        return cls(float(np.mean(per_query)), *bootstrap_ci(per_query, bootstrap), per_query=np.asarray(per_query).tolist())

    def summary(self) -> str:
        return f"{self.mean:+.3f} [{self.ci_low:+.3f}, {self.ci_high:+.3f}]"


__all__ = ["BootstrapConfig", "Correlation", "bootstrap_ci", "spearman_rows"]
