"""Synthetic ablation: forward-mode Jacobian of the ensemble sampler, scores of every training index, CLI."""

from __future__ import annotations

import json
from collections.abc import Callable

import lightning as L
import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from tests.helpers import SHAPE, TINY_UNET, check_jvp_columns, cli, unet_sampler
from wherefrom.attribution.ablation import SyntheticAblation
from wherefrom.datamodules import DigitsDataModule
from wherefrom.ensemble import Codes, EncodedEnsemble, EnsembleSampler
from wherefrom.ensemble.synthetic import (
    ablated_weights,
    exact_ablation,
    linearize,
    synthetic_scores,
)
from wherefrom.errors import WherefromError
from wherefrom.model import build_unet
from wherefrom.sampling import exogenous_noise, sampling_plan
from wherefrom.task import DiffusionTask

# --- Jacobian -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("objective", "scheduler"), [("epsilon", "ddpm"), ("epsilon", "ddim"), ("v_prediction", "ddim"), ("flow_matching", "euler"), ("edm", "heun")])
def test_jvp_columns_equal_central_finite_differences(objective, scheduler):
    """Float64, attention UNets, at weights with a zero entry, through each objective's own chain: clipped
    x0 predictions for the DDPM family, the flow-matching Euler ODE, EDM's Heun steps."""
    check_jvp_columns(unet_sampler(scheduler=scheduler, objective=objective))


def test_strategies_and_query_batches_agree():
    s = unet_sampler(steps=2)
    ref = linearize(s, 3, strategy="vmap")
    for strategy, batch_size in [("vmap", 2), ("rows", None), ("rows", 2), ("sequential", None)]:
        lin = linearize(s, 3, strategy=strategy, batch_size=batch_size)
        torch.testing.assert_close(lin.x0, ref.x0, rtol=0, atol=1e-12)
        torch.testing.assert_close(lin.jacobian, ref.jacobian, rtol=1e-9, atol=1e-9)
    assert torch.equal(ref.weights, s.uniform_weights())


def peak_cpu_bytes(fn) -> int:
    """Peak growth of torch's CPU allocator total while ``fn`` runs, from the profiler's allocation
    events (each carries the allocator's running total; the public ``prof.events()`` is far slower)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    stack, totals = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            totals.append(event.extra_fields.total_allocated)
        stack.extend(event.children)
    return max(totals) - min(totals)


def test_forward_mode_memory_does_not_grow_with_steps():
    """A 10x longer chain has the same peak memory; reverse mode (a graph through the chain) grows with
    it, which shows that the measurement sees the chain. One attention block keeps it quick."""
    unet = {**TINY_UNET, "block_out_channels": (4,), "down_block_types": ("AttnDownBlock2D",), "up_block_types": ("AttnUpBlock2D",)}
    s = EnsembleSampler([build_unet(unet, 0).eval()], DiffusionTask(), SHAPE, seed=0)
    a = s.uniform_weights().requires_grad_()

    def peaks(steps: int) -> tuple[int, int]:
        s.steps = steps
        return peak_cpu_bytes(lambda: linearize(s, 4)), peak_cpu_bytes(lambda: s.sample(4, a))

    (forward_2, reverse_2), (forward_20, reverse_20) = peaks(2), peaks(20)
    assert forward_2 > 100_000 and reverse_20 > 5 * reverse_2, (forward_2, reverse_2, reverse_20)
    # the same peak (allocations are deterministic): keeping even each step's x and tangents would add ~36 kB
    assert forward_20 - forward_2 < 16_384, (forward_2, forward_20)


# --- scores -----------------------------------------------------------------------------------------------


def test_vectorised_scores_equal_a_loop_over_indices():
    s = unet_sampler(n=4, steps=3)
    lin = linearize(s, 2)
    scores = synthetic_scores(lin, s.codes, num_images=20)
    assert scores.shape == (2, 20) and not scores[:, :10].any() and not scores[:, 16:].any()  # outside the split
    for x in s.codes.indices:
        d = s.ablation_weights([int(x)]) - lin.weights  # a'(x) - a, exact ablation's weights
        for q in range(2):
            counterfactual = lin.x0[q].flatten() + lin.jacobian[q] @ d
            assert scores[q, x] == pytest.approx(float((counterfactual - lin.x0[q].flatten()).norm()), rel=1e-10)
            torch.testing.assert_close(lin.counterfactuals(d.expand(2, 1, 4))[q, 0].flatten(), counterfactual)
    assert np.ptp(scores[:, 10:16]) > 0


def test_ablated_weights_zero_the_code_and_renormalise():
    bits = np.array([[1, 0, 1], [0, 1, 1]], dtype=bool)
    a = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    torch.testing.assert_close(ablated_weights(a, bits), torch.tensor([[0, 1.0, 0], [1.0, 0, 0]], dtype=torch.float64))
    with pytest.raises(WherefromError, match="removes every member"):
        ablated_weights(torch.tensor([0.0, 0.0, 1.0]), bits)


def test_exact_ablation_batches_pairs_like_sampler_ablate():
    s = unet_sampler(n=4, steps=3, dtype=torch.float32)
    queries, indices = [0, 1, 1], [10, 12, 15]
    got = exact_ablation(s, queries, indices, batch_size=2)
    with torch.no_grad():
        ref = torch.cat([s.ablate([x], [q]) for q, x in zip(queries, indices)])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(WherefromError, match="one training index per query"):
        exact_ablation(s, [0], [10, 11])


# --- linear denoisers: closed form ----------------------------------------------------------------------------


class LinearDenoiser(nn.Module):
    """``eps(x, t) = W x + b`` on the flattened image (independent of t)."""

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(0.3 * torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5)
        self.bias = nn.Parameter(0.5 * torch.randn(dim, generator=g, dtype=torch.float64))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return (x.flatten(1) @ self.weight.T + self.bias).reshape(x.shape)


def closed_form_jacobian(s: EnsembleSampler, queries: list[int], a: Tensor) -> tuple[Tensor, Tensor]:
    """``x0`` (Q x D) and ``J`` (Q x D x n) of the linear-denoiser chain without clipping.

    With eps = W(a) x + b(a), W(a) = sum_i a_i W_i, every step is x' = c1 x + c2 eps + sigma z with
    x0_pred = (x - sqrt(1 - ab_t) eps) / sqrt(ab_t) (Ho et al. 2020, eq. 15) and
      DDIM (Song et al. 2021, eq. 12, sigma = 0): x' = sqrt(ab_prev) x0_pred + sqrt(1 - ab_prev) eps,
      DDPM (Ho et al. 2020, eq. 7):               x' = p x0_pred + r x + sigma z,
        p = sqrt(ab_prev) beta / (1 - ab_t), r = sqrt(1 - beta) (1 - ab_prev) / (1 - ab_t), beta = 1 - ab_t / ab_prev.
    The chain is polynomial in a; its derivative follows the exact recursion
      dx'/da_j = (c1 I + c2 W(a)) dx/da_j + c2 (W_j x + b_j),   dx_T/da = 0.
    """
    W = torch.stack([m.weight.detach() for m in s.members])  # n x D x D
    B = torch.stack([m.bias.detach() for m in s.members])  # n x D
    Wa, ba = torch.einsum("i,ipq->pq", a, W), a @ B
    ts, abar = sampling_plan(s.task, s.steps)[:-1], s.task.objective.alphas_cumprod.double()
    x = exogenous_noise(s.seed, queries, -1, SHAPE).double().flatten(1)  # Q x D
    dx = torch.zeros(*x.shape, len(a), dtype=torch.float64)  # Q x D x n
    for k, t in enumerate(ts):
        t_prev = ts[k + 1] if k + 1 < len(ts) else -1
        ab, ab_prev = float(abar[t]), float(abar[t_prev]) if t_prev >= 0 else 1.0
        # x0_pred = x / sqrt(ab) - sqrt(1 - ab) / sqrt(ab) eps
        if s.scheduler.value == "ddim":
            c1, c2 = (ab_prev / ab) ** 0.5, (1 - ab_prev) ** 0.5 - (ab_prev * (1 - ab) / ab) ** 0.5
            sigma = 0.0
        else:
            beta = 1 - ab / ab_prev
            p, r = ab_prev**0.5 * beta / (1 - ab), (1 - beta) ** 0.5 * (1 - ab_prev) / (1 - ab)
            c1, c2 = p / ab**0.5 + r, -p * ((1 - ab) / ab) ** 0.5
            sigma = ((1 - ab_prev) / (1 - ab) * beta) ** 0.5 if t_prev >= 0 else 0.0
        direct = torch.einsum("ipq,bq->bpi", W, x) + B.T  # (W_j x + b_j) for each j: Q x D x n
        dx = c1 * dx + c2 * torch.einsum("pq,bqi->bpi", Wa, dx) + c2 * direct
        x = c1 * x + c2 * (x @ Wa.T + ba)
        if sigma:
            x = x + sigma * exogenous_noise(s.seed, queries, k, SHAPE).double().flatten(1)
    return x, dx


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_linear_denoisers_match_the_closed_form(scheduler):
    n, queries = 4, [0, 3]
    members = [LinearDenoiser(64, seed=i) for i in range(n)]
    codes = Codes.generate(np.arange(6), n, 2, seed=1)
    s = EnsembleSampler(members, DiffusionTask(), SHAPE, codes, seed=2, steps=6, scheduler=scheduler, clip_sample=False, dtype=torch.float64)
    a = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    x0, J = closed_form_jacobian(s, queries, a)
    lin = linearize(s, queries, a)
    torch.testing.assert_close(lin.x0.flatten(1), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lin.jacobian, J, rtol=1e-10, atol=1e-10)
    # scores: ||J (a'(x) - a)|| with a'(x) the weights of the kept members, rescaled to sum 1
    deltas = torch.stack([torch.where(torch.from_numpy(code), 0.0, a) / a[~torch.from_numpy(code)].sum() for code in codes.bits]) - a
    expected = torch.einsum("qpn,xn->qxp", J, deltas).norm(dim=2)
    np.testing.assert_allclose(synthetic_scores(lin, codes), expected.numpy(), rtol=1e-9)


# --- attribute / CLI ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ensemble_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    model = EncodedEnsemble(n=4, w=2, unet=TINY_UNET, lr=1e-3, seed=5)
    fit = L.Trainer(max_epochs=1, default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    fit.fit(model, DigitsDataModule(batch_size=4, subset=list(range(2, 8))))
    fit.save_checkpoint(root / "ens.ckpt")
    return root / "ens.ckpt"


@pytest.mark.parametrize("lpips", [False, True])
def test_attribute_cli_writes_scores_counterfactuals_and_exact_reranking(ensemble_ckpt, alexnet_home, lpips, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(alexnet_home if lpips else tmp_path / "no_hub"))  # LPIPS re-ranking iff its backbone is there
    out = tmp_path / "attr"
    args = ("attribute", "--ckpt", str(ensemble_ckpt), "--method", "ablation", "--num-samples", "2", "--seed", "1", "--steps", "3")
    code, err = cli(capsys, *args, "--top-k", "3", "--exact", "--out", str(out))
    assert code == 0, err[-2000:]
    scores = np.load(out / "scores.npy")
    assert scores.dtype == np.float32 and scores.shape == (2, 1797)
    assert not scores[:, :2].any() and not scores[:, 8:].any() and (scores[:, 2:8] > 0).all()
    top = json.loads((out / "topk.json").read_text())
    assert top["method"] == "ablation" and (out / "topk.png").is_file() and (out / "counterfactuals.png").is_file()
    module = EncodedEnsemble.load_from_checkpoint(ensemble_ckpt, map_location="cpu").eval()
    sampler = module.sampler(seed=1, steps=3)
    for q, row in enumerate(top["queries"]):
        assert row["indices"] == np.argsort(-scores[q], kind="stable")[:3].tolist()
        with torch.no_grad():
            exact = [float((sampler.ablate([x], [q]) - sampler.sample([q])).norm()) for x in row["indices"]]
        np.testing.assert_allclose(row["exact_l2"], exact, rtol=1e-3)
        assert row["l2_order"] == [row["indices"][i] for i in np.argsort(-np.array(exact), kind="stable")]
        assert ("exact_lpips" in row) == lpips
        if lpips:
            assert row["lpips_order"] == [row["indices"][i] for i in np.argsort(-np.array(row["exact_lpips"]), kind="stable")]
    counterfactuals = np.load(out / "counterfactuals.npy")
    assert counterfactuals.shape == (2, 3, 1, 8, 8) and np.load(out / "exact_counterfactuals.npy").shape == (2, 3, 1, 8, 8)


def test_attribute_rejects_external_queries_and_mismatched_samples(ensemble_ckpt, tmp_path, capsys):
    np.save(tmp_path / "q.npy", np.zeros((2, 1, 8, 8), dtype=np.float32))
    args = ("attribute", "--ckpt", str(ensemble_ckpt), "--method", "ablation", "--steps", "2", "--out", str(tmp_path / "o"))
    code, err = cli(capsys, *args, "--queries", str(tmp_path / "q.npy"))
    assert code == 2 and "needs the sampler's exogenous noise" in err and "Traceback" not in err
    module = EncodedEnsemble.load_from_checkpoint(ensemble_ckpt, map_location="cpu")
    with pytest.raises(WherefromError, match="differ from the ensemble's own samples"):
        SyntheticAblation(steps=2, batch_size=8, top_k=2).attribute(module, DigitsDataModule(subset=list(range(2, 8))), torch.zeros(2, *SHAPE))
    with pytest.raises(WherefromError, match="sum to 1"):
        linearize(module.sampler(steps=2), 1, torch.ones(4))


# --- signed scores: the query's measurement under each image's ablation ----------------------------------


@pytest.mark.parametrize("measurement", ["loss", "elbo"])
def test_measurement_scores_equal_the_exactly_ablated_ensembles_measurement(measurement):
    """m(a'(x)) - m(a) from the quadratic form == the measurement of the ensemble with x's members
    dropped (EnsembleSampler.ablation_weights), evaluated directly on the same draws (float64)."""
    from wherefrom.ensemble.synthetic import measurement_scores, quadratic_measurement

    s = unet_sampler(n=4)
    queries = DigitsDataModule().images[[3, 40]].double()
    quad = quadratic_measurement(s, queries, measurement, draws=3, seed=2)
    scores = measurement_scores(quad, s.uniform_weights(), s.codes, num_images=20)
    task = DiffusionTask(seed=2)
    draws = [(d, None) for d in range(3)]

    def measured(weights: Tensor) -> Tensor:
        with torch.no_grad():
            return task.measure(s.eps_fn(weights), queries, torch.arange(2), measurement, draws).double()

    base = measured(s.uniform_weights())
    torch.testing.assert_close(quad(s.uniform_weights()), base, rtol=1e-10, atol=0)
    for x in s.codes.indices:
        torch.testing.assert_close(torch.from_numpy(scores[:, x]), measured(s.ablation_weights([int(x)])) - base, rtol=1e-8, atol=1e-12)
    assert not scores[:, :10].any() and np.abs(scores[:, s.codes.indices]).min() > 0
    with pytest.raises(WherefromError, match="loss-like"):
        quadratic_measurement(s, queries, "square_norm")


# --- unused codes as controls ------------------------------------------------------------------------------


def _explicit_controlled(per_code: Callable[[np.ndarray], float], image_codes: np.ndarray, controls: np.ndarray) -> np.ndarray:
    """``s(c(x)) - beta^T c(x)`` with ``beta`` the least-squares fit of ``s`` on the controls, code by code (numpy)."""
    beta = np.linalg.lstsq(controls.astype(np.float64), np.array([per_code(c) for c in controls]), rcond=None)[0]
    return np.array([per_code(c) - beta @ c for c in image_codes])


def test_controlled_scores_equal_exact_ablation_minus_the_fitted_member_effect():
    """n = 6, w = 3: 6 images use 6 of the 20 codes, 14 are controls. Each controlled score equals the
    exactly ablated ensemble's measurement change (members dropped, evaluated directly on the same
    draws), and the synthetic distance of each code, minus a member effect fitted code by code (float64)."""
    from wherefrom.ensemble.synthetic import measurement_scores, quadratic_measurement

    s = unet_sampler(n=6, steps=3)
    controls = s.codes.controls()
    assert len(controls) == 14
    queries = DigitsDataModule().images[[3, 40]].double()
    quad = quadratic_measurement(s, queries, "loss", draws=3, seed=2)
    scores = measurement_scores(quad, s.uniform_weights(), s.codes, num_images=20, controls=controls)
    task = DiffusionTask(seed=2)

    def measured(q: int, code: np.ndarray) -> float:
        kept = torch.from_numpy(~code).double() / (~code).sum()
        with torch.no_grad():
            return float(task.measure(s.eps_fn(kept), queries[q : q + 1], torch.tensor([q]), "loss", [(d, None) for d in range(3)]).double())

    lin = linearize(s, 2)
    synthetic = synthetic_scores(lin, s.codes, num_images=20, controls=controls)
    for q in range(2):
        base = measured(q, np.zeros(6, dtype=bool))
        loss_rise = _explicit_controlled(lambda c: measured(q, c) - base, s.codes.bits, controls)
        np.testing.assert_allclose(scores[q, s.codes.indices], loss_rise, rtol=1e-7, atol=1e-12)
        moved = _explicit_controlled(lambda c: float((lin.jacobian[q] @ (torch.from_numpy(~c).double() / (~c).sum() - lin.weights)).norm()), s.codes.bits, controls)
        np.testing.assert_allclose(synthetic[q, s.codes.indices], moved, rtol=1e-9, atol=1e-12)
    raw = measurement_scores(quad, s.uniform_weights(), s.codes, num_images=20)
    assert not scores[:, :10].any() and np.abs(scores - raw).max() > 1e-3 * np.abs(raw).max()  # the control changed them


def test_control_needs_unused_codes_and_names_an_n_that_leaves_them(ensemble_ckpt, tmp_path, capsys):
    """n = 4, w = 2 on 6 images uses all C(4, 2) = 6 codes: ``--control`` is refused, before any output,
    naming n >= 6 (C(6, 2) = 15 leaves 9 >= 6 controls); by default the scores are raw and say so."""
    np.save(tmp_path / "q.npy", DigitsDataModule().images[[3, 40]].numpy())
    args = ("attribute", "--ckpt", str(ensemble_ckpt), "--method", "ablation-loss", "--queries", str(tmp_path / "q.npy"), "--timesteps", "2")
    code, err = cli(capsys, *args, "--control", "--out", str(tmp_path / "c"))
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "leave 0; train the ensemble with n >= 6 at w = 2" in err and not (tmp_path / "c").exists()
    code, err = cli(capsys, *args, "--out", str(tmp_path / "auto"))
    assert code == 0, err[-2000:]
    assert json.loads((tmp_path / "auto" / "topk.json").read_text())["control"] == "none"
