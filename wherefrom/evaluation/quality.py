"""Are the samples digits? A classifier fitted on the real digits says how many it recognises.

The check of the demo (and a cheap sanity figure for any digits model): scikit-learn's
``SVC(probability=True)`` fitted on all 1797 embedded digits scaled to [0, 1]; a sample
is *recognised* when its most probable class has probability >= ``threshold``
(0.7). Calibration (issue 11): real digits 98-100%, a single model
trained 150 epochs on 500 digits 78%, the old demo's grey blobs 38%.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from wherefrom.errors import WherefromError

THRESHOLD = 0.7


@functools.cache
def digit_classifier():
    """The SVC (RBF, scikit-learn defaults, Platt probabilities, seed 0) on the 1797 digits in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    with warnings.catch_warnings():  # scikit-learn 1.9 deprecates `probability` (removed in 1.11, hence the pin)
        warnings.simplefilter("ignore", FutureWarning)
        return SVC(probability=True, random_state=0).fit(digits.data / 16.0, digits.target)


def digit_probabilities(images: Tensor | np.ndarray) -> np.ndarray:
    """``N x 10`` class probabilities of 8x8 one-channel images in [-1, 1] (the model range)."""
    x = np.asarray(images.detach().cpu() if isinstance(images, Tensor) else images, dtype=np.float64)
    if x.ndim != 4 or x.shape[1:] != (1, 8, 8):
        raise WherefromError(f"the digit classifier takes N x 1 x 8 x 8 images, got shape {x.shape}")
    return digit_classifier().predict_proba(((x.reshape(len(x), 64) + 1.0) / 2.0).clip(0.0, 1.0))


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (Wilson 1927)."""
    if total < 1:
        return (math.nan, math.nan)
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Fraction:
    """A proportion ``successes / total`` with its 95% Wilson interval."""

    successes: int
    total: int

    @property
    def value(self) -> float:
        return self.successes / self.total if self.total else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.total)

    def summary(self) -> str:
        lo, hi = self.interval
        return f"{100 * self.value:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}] ({self.successes}/{self.total})"

    def to_dict(self) -> dict[str, float | int]:
        lo, hi = self.interval
        return {"successes": self.successes, "total": self.total, "value": self.value, "ci_low": lo, "ci_high": hi}


def recognised(images: Tensor | np.ndarray, threshold: float = THRESHOLD) -> Fraction:
    """How many images the digit classifier assigns to one class with probability >= ``threshold``."""
    probs = digit_probabilities(images)
    return Fraction(int((probs.max(1) >= threshold).sum()), len(probs))


def digit_labels(images: Tensor | np.ndarray) -> np.ndarray:
    """The classifier's most probable class per image."""
    return digit_probabilities(images).argmax(1)
