"""Exact removal on an encoded ensemble equals ablating by hand: the loss of the reduced ensemble
on the same draws, and the sample redrawn with the same noise (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import unet_sampler
from wherefrom.ensemble.synthetic import quadratic_measurement
from wherefrom.evaluation.distances import l2_distance
from wherefrom.evaluation.removal import Estimate, remove
from wherefrom.task import DiffusionTask, Stream


def test_removal_equals_the_hand_ablated_ensemble():
    s = unet_sampler(n=4)  # the 6 codes of weight 2 over 4 members, for indices 10..15
    queries = s.sample([0, 1, 2])
    quad = quadratic_measurement(s, queries, "loss", draws=3, seed=5)
    bits = {int(i): s.codes.bits[s.codes.rows([int(i)])][0] for i in s.codes.indices}
    complement = next(i for i, b in bits.items() if not (b & bits[10]).any())
    overlapping = next(i for i, b in bits.items() if i != 11 and (b & bits[11]).any())
    sets = np.array([[10, 10], [11, overlapping], [10, complement]])  # query 2 would drop every member: infeasible
    got = remove(s, quad, sets, queries, [0, 1, 2])
    assert got.feasible.tolist() == [True, True, False] and np.isnan(got.distance[2])
    task, draws = DiffusionTask(seed=5), [(d, None) for d in range(3)]

    def loss(weights, q):
        return float(task.measure(s.eps_fn(weights), queries[q : q + 1], torch.tensor([q]), "loss", draws, stream=Stream.MEASURE)[0])

    for q in (0, 1):
        removed = sorted(set(sets[q].tolist()))
        np.testing.assert_allclose(got.loss[q], loss(s.ablation_weights(removed), q) - loss(None, q), rtol=1e-9, atol=1e-12)
        ablated = s.ablate(removed, [q])
        torch.testing.assert_close(got.samples[q : q + 1], ablated, rtol=0, atol=1e-12)
        np.testing.assert_allclose(got.distance[q], float(l2_distance(queries[q : q + 1], ablated)[0]), rtol=1e-12)


def test_estimate_leaves_out_infeasible_queries():
    e = Estimate.of(np.array([1.0, np.nan, 3.0]))
    assert e.count == 2 and e.mean == 2.0 and e.ci_low <= 2.0 <= e.ci_high
    assert e.excludes(10.0) and not e.excludes(2.0)
    assert Estimate.of(np.array([np.nan])).count == 0


def test_scores_aggregate_per_group_over_the_training_split():
    from wherefrom.attribution.protocol import Attribution

    scores = np.arange(12, dtype=np.float32).reshape(2, 6)
    result = Attribution(scores, torch.zeros(2, 1, 8, 8), "m", split=np.array([0, 2, 3, 5]))
    groups, sums = result.by_group(np.array([7, 7, 3, 3, 7, 3]))
    assert groups.tolist() == [3, 7]
    # split {0, 2, 3, 5}: group 7 = {0}, group 3 = {2, 3, 5}
    assert sums.tolist() == [[2 + 3 + 5, 0], [8 + 9 + 11, 6]]


def test_removal_benchmark_equals_directly_sampled_ablated_ensembles():
    """Each method's top-k removal in the benchmark == the ensemble redrawn by hand without those images'
    members (same noise) and its loss on the same draws; the synthetic agreement == Spearman of the
    scores with hand-ablated distances over each query's top images (float64)."""
    from scipy import stats

    from wherefrom.evaluation.removal import removal_benchmark

    s = unet_sampler(n=4, steps=3)  # indices 10..15, codes of weight 2 over 4 members
    samples = s.sample([0, 1, 2])
    rng = np.random.default_rng(0)
    scores = {"a": rng.normal(size=(3, 20)), "b": rng.normal(size=(3, 20))}
    got = removal_benchmark(s, samples, scores, k=2, draws=3, seed=5, synthetic=["a"], agreement_top=4)
    task, draws = DiffusionTask(seed=5), [(d, None) for d in range(3)]

    def loss(weights, q):
        return float(task.measure(s.eps_fn(weights), samples[q : q + 1], torch.tensor([q]), "loss", draws, stream=Stream.MEASURE)[0])

    for name, sc in scores.items():
        r = got.removals[name]
        for q in range(3):
            top = 10 + np.argsort(-sc[q, 10:16], kind="stable")[:2]
            assert r.sets[q].tolist() == top.tolist()
            if s.codes.bits[s.codes.rows(top)].any(0).all():  # both images' codes cover every member
                assert np.isnan(r.loss[q]) and np.isnan(r.distance[q])
                continue
            ablated = s.ablate(sorted(top.tolist()), [q])
            np.testing.assert_allclose(r.distance[q], float((samples[q] - ablated[0]).norm()), rtol=1e-10)
            np.testing.assert_allclose(r.loss[q], loss(s.ablation_weights(sorted(top.tolist())), q) - loss(None, q), rtol=1e-9, atol=1e-12)
    assert np.isfinite(got.removals["a"].loss).any()
    for q in range(3):
        top = 10 + np.argsort(-scores["a"][q, 10:16], kind="stable")[:4]
        moved = [float((samples[q] - s.ablate([int(x)], [q])[0]).norm()) for x in top]
        assert got.agreement["a"][q] == pytest.approx(stats.spearmanr(scores["a"][q, top], moved).statistic, abs=1e-12)
    table = got.table(baseline="b")
    assert "| a |" in table and "minus b" in table and "Rank agreement of a" in table
