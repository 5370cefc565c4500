"""Ensemble leave-one-out: distances equal explicit exact ablations with the same noise,
and the per-query Spearman grades scores against them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import TINY_UNET
from wherefrom import DiffusionModel
from wherefrom.ensemble import Codes, EncodedEnsemble
from wherefrom.errors import WherefromError
from wherefrom.evaluation.distances import l2_distance
from wherefrom.evaluation.loo import leave_one_out, sample_indices


@pytest.fixture(scope="module")
def ensemble():
    module = EncodedEnsemble(n=4, w=2, unet=TINY_UNET, seed=3).eval()  # untrained members differ by their seeds
    module.codes = Codes.generate(np.arange(10, 16), 4, 2, seed=0)  # C(4, 2) = 6 codes for 6 images
    return module


def test_distances_are_exact_ablations_with_the_same_noise(ensemble):
    indices = np.array([10, 13, 15])
    loo = leave_one_out(ensemble, indices, num_queries=2, seed=1, steps=3, scheduler="ddim")
    sampler = ensemble.sampler(seed=1, steps=3, scheduler="ddim")
    with torch.no_grad():
        full = sampler.sample([0, 1])
        torch.testing.assert_close(loo.samples, full)
        for j, index in enumerate(indices):
            kept = [i for i in range(4) if i not in ensemble.members_of(int(index))]
            weights = torch.zeros(4, dtype=torch.float64)
            weights[kept] = 0.5  # the two members that never saw the index
            expected = l2_distance(full, sampler.sample([0, 1], weights)).double().numpy()
            np.testing.assert_allclose(loo.distances[:, j], expected, rtol=1e-5)
    assert (loo.distances > 0).all()


def test_correlation_grades_scores_against_the_distances(ensemble):
    loo = leave_one_out(ensemble, np.array([10, 11, 12, 14]), num_queries=2, seed=0, steps=2, scheduler="ddim")
    scores = np.zeros((2, 16))
    scores[:, loo.indices] = loo.distances
    assert loo.correlation(scores).mean == pytest.approx(1.0)
    assert loo.correlation(-scores).mean == pytest.approx(-1.0)
    with pytest.raises(WherefromError, match="do not cover"):
        loo.correlation(scores[:, :12])


def test_sample_indices_and_single_models():
    split = np.arange(100, 140)
    a = sample_indices(split, 7, seed=2)
    assert len(a) == 7 and np.isin(a, split).all() and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, sample_indices(split, 7, seed=2))
    np.testing.assert_array_equal(sample_indices(split, 99, seed=2), split)
    with pytest.raises(WherefromError, match="encoded-ensemble"):
        leave_one_out(DiffusionModel(unet=TINY_UNET), np.array([0, 1]), 1)
