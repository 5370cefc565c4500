"""The digit classifier recognises real digits and rejects noise; the Wilson interval matches its formula."""

from __future__ import annotations

import math

import pytest
import torch

from wherefrom.datamodules import DigitsDataModule
from wherefrom.errors import WherefromError
from wherefrom.evaluation.quality import Fraction, digit_labels, recognised, wilson_interval


def test_real_digits_are_recognised_and_noise_is_not():
    dm = DigitsDataModule()
    real = dm.images[:200]
    assert recognised(real).value >= 0.95  # the classifier saw them: a check of the scaling to [0, 1]
    assert (digit_labels(real) == dm.labels[:200]).mean() >= 0.98
    noise = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert recognised(noise).value < 0.2
    with pytest.raises(WherefromError, match="1 x 8 x 8"):
        recognised(torch.zeros(2, 3, 8, 8))


def test_wilson_interval_by_hand():
    # p = 0.75, n = 32: centre (p + z^2/2n) / (1 + z^2/n), half z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
    z, n, p = 1.959964, 32, 0.75
    d = 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    assert wilson_interval(24, 32) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert Fraction(24, 32).summary() == "75% [58, 87] (24/32)"
