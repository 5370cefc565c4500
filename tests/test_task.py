"""task.py: seeded draws, the DDPM loss and every measurement against its formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wherefrom.errors import WherefromError
from wherefrom.task import MEASUREMENTS, DiffusionTask, Stream, TimestepStrategy


class Linear(nn.Module):
    """eps_theta(x, t) = W x + t-dependent bias: a real module with known outputs."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Linear(d, d)

    def forward(self, x, t):
        return self.w(x.flatten(1)).view_as(x) + t.view(-1, 1, 1, 1) * 1e-3


def test_draws_are_invariant_to_batching_order_and_ranks():
    task = DiffusionTask(seed=3)
    index = torch.arange(10)
    t_all, e_all = task.draw(index, draw=2, shape=(1, 8, 8))
    # batch sizes
    for bs in (1, 3, 7):
        parts = [task.draw(index[i : i + bs], 2, (1, 8, 8)) for i in range(0, 10, bs)]
        assert torch.equal(torch.cat([p[0] for p in parts]), t_all)
        assert torch.equal(torch.cat([p[1] for p in parts]), e_all)
    # shuffled order
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    t_p, e_p = task.draw(index[perm], 2, (1, 8, 8))
    assert torch.equal(t_p, t_all[perm]) and torch.equal(e_p, e_all[perm])
    # a simulated 2-rank split (DistributedSampler-style interleaving)
    for rank in (0, 1):
        t_r, e_r = task.draw(index[rank::2], 2, (1, 8, 8))
        assert torch.equal(t_r, t_all[rank::2]) and torch.equal(e_r, e_all[rank::2])


def test_draws_differ_across_draw_stream_seed_and_index():
    task = DiffusionTask(seed=0)
    idx = torch.tensor([5])
    base = task.draw(idx, 0, (4,))[1]
    assert not torch.equal(base, task.draw(idx, 1, (4,))[1])
    assert not torch.equal(base, task.draw(idx, 0, (4,), stream=Stream.FEATURES)[1])
    assert not torch.equal(base, DiffusionTask(seed=1).draw(idx, 0, (4,))[1])
    assert not torch.equal(base, task.draw(torch.tensor([6]), 0, (4,))[1])
    t, _ = task.draw(torch.arange(200), 0, (1,))
    assert t.min() >= 0 and t.max() < 1000 and len(t.unique()) > 100


def test_schedule_matches_ddpm_defaults():
    task = DiffusionTask()
    assert torch.allclose(task.objective.betas[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))
    expected = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    assert torch.allclose(task.objective.alphas_cumprod, expected, rtol=1e-5)


def test_loss_equals_hand_written_ddpm_loss():
    torch.manual_seed(0)
    task = DiffusionTask(seed=1)
    model = Linear(16).double()
    x0 = torch.rand(5, 1, 4, 4, dtype=torch.float64) * 2 - 1
    index = torch.tensor([3, 1, 4, 1, 5])
    got = task.loss(model, x0, index, draw=7)
    for b in range(5):
        t, eps = task.draw(index[b : b + 1], 7, (1, 4, 4), stream=Stream.TRAIN, dtype=torch.float64)
        ab = task.objective.alphas_cumprod[t]
        x_t = ab.sqrt() * x0[b] + (1 - ab).sqrt() * eps[0]
        ref = ((model(x_t, t) - eps) ** 2).mean()
        assert torch.allclose(got[b], ref, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(MEASUREMENTS))
def test_measurements_equal_their_formulas(name):
    task = DiffusionTask(seed=2, measure_time=250)
    model = Linear(16).double()
    x0 = torch.rand(3, 1, 4, 4, dtype=torch.float64) * 2 - 1
    index = torch.tensor([0, 9, 2])
    draws = [(0, None), (1, 500)]
    got = task.measure(model, x0, index, name, draws=draws)
    ref = torch.zeros(3, dtype=torch.float64)
    for d, t_fixed in draws:
        t_fixed = 250 if name == "loss_at_time" else t_fixed
        t, eps = task.draw(index, d, (1, 4, 4), stream=Stream.MEASURE, t=t_fixed, dtype=torch.float64)
        ab = task.objective.alphas_cumprod[t].view(-1, 1, 1, 1)
        p = model(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t).flatten(1)
        e = eps.flatten(1)
        beta = task.objective.betas[t]
        formulas = {
            "loss": ((p - e) ** 2).mean(1),
            "loss_at_time": ((p - e) ** 2).mean(1),
            "elbo": (beta / (2 * (1 - beta) * (1 - task.objective.alphas_cumprod[t]))) * ((p - e) ** 2).mean(1),
            "square_norm": (p**2).mean(1),
            "l1_norm": p.abs().sum(1),
            "l2_norm": (p**2).sum(1).sqrt(),
            "linf_norm": p.abs().max(1).values,
            "mean": p.mean(1),
        }
        ref += formulas[name]
    assert torch.allclose(got, ref / 2, rtol=1e-6)


def test_timestep_strategies():
    task = DiffusionTask()
    assert task.timesteps(TimestepStrategy.UNIFORM, 10) == list(range(0, 1000, 100))
    assert task.timesteps("random", 3) == [None, None, None]
    with pytest.raises(WherefromError, match="K must be >= 1"):
        task.timesteps("uniform", 0)
    with pytest.raises(ValueError):
        task.timesteps("sometimes", 2)
    with pytest.raises(WherefromError, match="unknown measurement"):
        task.measurement("nope")


def test_draws_do_not_depend_on_the_default_dtype():
    task = DiffusionTask(seed=4)
    idx = torch.arange(3)
    ref = task.draw(idx, 0, (2, 2))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as under Lightning's precision="64-true"
    try:
        t64, e64 = task.draw(idx, 0, (2, 2), dtype=torch.float64)
    finally:
        torch.set_default_dtype(old)
    assert torch.equal(t64, ref[0]) and torch.equal(e64.float(), ref[1])


def test_conditions_reach_a_plain_network_only_through_a_keyword_it_takes():
    """Issue 38: (image, label) tuples now carry labels; a plain network whose forward takes no condition keyword
    is evaluated without it (as before), one that takes class_labels gets them; bool second entries are no label."""
    from wherefrom.target import item_conditions
    from wherefrom.task import condition_kwargs

    class Plain(nn.Module):
        def forward(self, x, t):
            return x

    class Labelled(nn.Module):
        def forward(self, x, t, class_labels=None):
            return x

    labels = torch.tensor([1, 2])
    assert condition_kwargs(Plain(), labels) == {} and condition_kwargs(Plain(), None) == {}
    assert condition_kwargs(Labelled(), labels)["class_labels"] is labels
    assert item_conditions((torch.zeros(1, 8, 8), 3))["label"].item() == 3 and item_conditions((torch.zeros(1, 8, 8), True)) == {}
    assert item_conditions((torch.zeros(1, 8, 8), torch.zeros(4))) == {}  # a vector is no class label
