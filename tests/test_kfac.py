"""K-FAC factors against exact references (float64): the GGN of deep linear networks
(curvlinops), explicit per-position sums for Conv2d and attention layers, the GGN in
the Kronecker eigenbasis for EK-FAC (torch.func), DDP rank invariance and resume."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from curvlinops import GGNLinearOperator
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.func import functional_call, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from tests.helpers import (
    SUBSET,
    TINY_UNET,
    check_unet_factors,
    collect,
    explicit_patches,
    normalised,
)
from wherefrom.callbacks import KFACFactors
from wherefrom.datamodules import DigitsDataModule
from wherefrom.ensemble import EncodedEnsemble
from wherefrom.errors import WherefromError
from wherefrom.kfac import (
    FactorCollector,
    FactorConfig,
    KFACApprox,
    activation_factor,
    backpropagate,
    eigendecompose,
    tracked_layers,
)
from wherefrom.kfac.geometry import example_weight_grads
from wherefrom.model import DiffusionModel, build_unet
from wherefrom.store import Store
from wherefrom.task import DiffusionTask, Stream, predict


def weight_bias_order(d_out: int, d_in: int) -> torch.Tensor:
    """Position of each row-major ``[W, b]`` entry in the parameter layout ``(vec W, b)``."""
    w = torch.arange(d_out * d_in).view(d_out, d_in)
    b = d_out * d_in + torch.arange(d_out).view(d_out, 1)
    return torch.cat([w, b], 1).reshape(-1)


# --- deep linear networks: K-FAC is exact --------------------------------------------------


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("shared", [False, True], ids=["plain", "weight-sharing"])
def test_type2_expand_equals_exact_ggn_on_deep_linear_network(shared):
    """Every diagonal block of the GGN of a deep linear network with MSE loss is
    A (x) G (Bernacchia et al. 2018; with weight sharing in the expand setting,
    Eschenhagen et al. 2023, Sec. 3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3), nn.Linear(3, 2))
    shape = (7, 3) if shared else (7,)
    x, y = torch.randn(*shape, 5), torch.randn(*shape, 2)
    sums = collect(model, "expand", lambda: backpropagate(model(x), y, "type-2"))
    ggn = GGNLinearOperator(model, nn.MSELoss(), list(model.parameters()), [(x, y)], check_deterministic=False)
    exact = ggn @ torch.eye(sum(p.numel() for p in model.parameters()))
    start = 0
    for name, layer in tracked_layers(model).items():
        d_out, d_in = layer.weight.shape
        size = d_out * (d_in + 1)
        a, g = normalised(sums, name)
        block = exact[start : start + size, start : start + size]
        order = weight_bias_order(d_out, d_in)
        torch.testing.assert_close(torch.kron(g, a), block[order][:, order], rtol=1e-10, atol=1e-12)
        start += size


@pytest.mark.usefixtures("float64")
def test_mc_converges_to_type2_as_samples_grow():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    exact = collect(model, "expand", lambda: backpropagate(model(x), y, "type-2"))
    gen = torch.Generator().manual_seed(1)

    def mc(samples: int) -> dict:
        def run():
            for _ in range(samples):
                out = model(x)
                backpropagate(out, y, "mc", torch.randn(out.shape, generator=gen))
        return collect(model, "expand", run)

    errors = []
    for samples in (4, 64, 1024):
        sums = mc(samples)
        err = 0.0
        for name in tracked_layers(model):
            a, g = normalised(sums, name)
            a_ref, g_ref = normalised(exact, name)
            torch.testing.assert_close(a, a_ref)  # A does not depend on the pseudo-targets
            err = max(err, float((g - g_ref).norm() / g_ref.norm()))
        errors.append(err)
    assert errors[2] < 0.05 and errors[2] < errors[1] < errors[0], errors


@pytest.mark.usefixtures("float64")
def test_empirical_backpropagates_the_scaled_loss_gradient():
    """``empirical``: ``r = sqrt(D) grad_f l`` with ``l = ||f - y||^2 / D``, the same scale as ``mc``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4))
    x, y = torch.randn(5, 3), torch.randn(5, 4)
    sums = collect(model, "expand", lambda: backpropagate(model(x), y, "empirical"))
    f = model(x).detach().requires_grad_()
    (grad,) = torch.autograd.grad((f - y).pow(2).mean(1).sum(), f)
    r = math.sqrt(4) * grad
    torch.testing.assert_close(sums["0/G"], r.T @ r)


# --- Conv2d and attention layers: explicit per-position sums --------------------------------


CONVS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, padding=0),
    dict(kernel_size=5, padding=3),
    dict(kernel_size=(3, 1), padding=(1, 0)),
    dict(kernel_size=1),
    dict(kernel_size=3, padding=1, stride=2),
    dict(kernel_size=3, padding=2, dilation=2),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("conv_args", CONVS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_conv_activation_factor_equals_per_position_sum(conv_args):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, **conv_args)
    x = torch.randn(2, 3, 7, 6)
    u = explicit_patches(x, conv)

    def folded(gram, colsum, count):  # [[sum a a^T, sum a], [sum a^T, count]]
        return torch.cat([torch.cat([gram, colsum[:, None]], 1), torch.cat([colsum, colsum.new_tensor([count])])[None]])

    parts = activation_factor(conv, x, KFACApprox.EXPAND)
    assert parts[2] == u.shape[0] * u.shape[1]
    torch.testing.assert_close(folded(*parts), sum(u[n, r, :, None] * u[n, r, None, :] for n in range(u.shape[0]) for r in range(u.shape[1])))
    parts = activation_factor(conv, x, KFACApprox.REDUCE)  # mean over positions, then outer product
    assert parts[2] == len(x)
    torch.testing.assert_close(folded(*parts), sum(torch.outer(m, m) for m in u.mean(1)))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("conv_args", CONVS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_example_weight_grads_equal_autograd_per_example(conv_args):
    """Rows ordered (example, draw): each example's weight gradient sums its draws' and positions'."""
    torch.manual_seed(0)
    conv, (batch, draws) = nn.Conv2d(3, 2, **conv_args), (3, 2)
    x = torch.randn(batch * draws, 3, 7, 6)
    g = torch.randn_like(conv(x))
    expected = torch.stack([torch.autograd.grad((conv(x[b * draws : (b + 1) * draws]) * g[b * draws : (b + 1) * draws]).sum(), conv.weight)[0].flatten(1) for b in range(batch)])
    torch.testing.assert_close(example_weight_grads(x, g, conv, batch, draws), expected)


@pytest.fixture
def unet(float64):
    torch.manual_seed(0)
    return build_unet(TINY_UNET, 0).double()


def diffusion_batch(task: DiffusionTask, n: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x0 = torch.as_tensor(load_digits().images[:n, None] / 8.0 - 1.0)
    t, eps = task.draw(torch.arange(n), 0, x0.shape[1:], stream=Stream.FACTORS, dtype=x0.dtype)
    return task.add_noise(x0, t, eps), t, eps


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_unet_factors_equal_explicit_per_position_computation(unet, approx):
    """Every Conv2d (3x3, strided, 1x1) and Linear (attention projections over tokens,
    time embeddings) of a diffusers UNet: A and G equal explicit sums over positions."""
    layers = {"down_blocks.1.attentions.0.to_q", "mid_block.attentions.0.to_out.0", "down_blocks.0.downsamplers.0.conv"}
    check_unet_factors(unet, *diffusion_batch(DiffusionTask()), approx, layers)


def test_ekfac_eigenvalues_equal_ggn_diagonal_in_kronecker_eigenbasis(unet):
    """George et al. (2018), eq. 10: with type-2 curvature the corrected eigenvalues are
    diag(Q^T GGN Q), Q = Q_G (x) Q_A, for the exact GGN block of each layer (torch.func)."""
    task = DiffusionTask()
    x_t, t, eps = diffusion_batch(task)
    run = lambda: backpropagate(predict(unet, x_t, t), eps, "type-2")  # noqa: E731
    sums = collect(unet, "expand", run)
    layers = tracked_layers(unet)
    eigen = eigendecompose(sums, layers)
    corrected = collect(unet, "expand", run, eigen=eigen)
    names = dict(unet.named_parameters())
    checked = ["conv_in", "time_embedding.linear_2", "down_blocks.1.attentions.0.to_k", "down_blocks.0.downsamplers.0.conv"]
    for name in checked + ["up_blocks.0.resnets.0.conv_shortcut"]:
        w, b = names[f"{name}.weight"], names[f"{name}.bias"]

        def out(wv, bv):
            return predict(lambda x, s: functional_call(unet, {f"{name}.weight": wv, f"{name}.bias": bv}, (x, s)), x_t, t)

        with sdpa_kernel(SDPBackend.MATH):
            jw, jb = jacrev(out, argnums=(0, 1))(w, b)
        n, d = len(x_t), x_t[0].numel()
        jac = torch.cat([jw.reshape(n * d, -1), jb.reshape(n * d, -1)], 1)
        ggn = jac.T @ jac * 2 / (n * d)  # (1/N) sum_n J_n^T (2/D) J_n
        d_out = w.shape[0]
        order = weight_bias_order(d_out, w[0].numel())
        e = eigen[name]
        q = torch.kron(e.qg, e.qa)
        expected = torch.diagonal(q.T @ ggn[order][:, order] @ q).view(d_out, -1)
        got = corrected[f"{name}/lambda"] / corrected[f"{name}/lambda_count"]
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-14, msg=name)
        assert not torch.allclose(got, torch.outer(e.lg, e.la), rtol=1e-3)  # the correction is not a no-op


# --- config, DDP, resume ----------------------------------------------------------------------


def test_factor_config_rejects_bad_input():
    with pytest.raises(WherefromError, match="curvature"):
        FactorConfig(curvature="fisher")
    with pytest.raises(WherefromError, match="empirical"):
        FactorConfig(mode="during")
    with pytest.raises(WherefromError, match="passes"):
        FactorConfig(passes=0)


def store_tensors(root) -> dict[str, dict[str, torch.Tensor]]:
    store = Store.open(root)
    return {name: store.load_tensors(name) for name in store.entries("tensors")}


@pytest.mark.slow
def test_two_ddp_ranks_equal_one_process(ddp_runs):
    """After-mode (mc, 2 passes, EK-FAC) and during-mode factors of the same run (lr = 0, so the
    weights are the same; 2 epochs) fitted in this process and with 2 DDP processes (CPU, gloo)."""
    results = {devices: {kind: store_tensors(root / kind) for kind in ("after", "during")} for devices, root in ddp_runs.items()}
    one, two = results[1], results[2]
    assert set(one["after"]) == {"factors/model", "eigen/model", "ekfac/model"}
    assert set(one["during"]) == {"factors/model", "eigen/model"}
    for kind in ("after", "during"):
        for entry in ("factors/model",) + (("ekfac/model",) if kind == "after" else ()):
            assert one[kind][entry].keys() == two[kind][entry].keys()
            for key, value in one[kind][entry].items():
                torch.testing.assert_close(two[kind][entry][key], value, rtol=1e-10, atol=1e-12, msg=f"{kind} {key}")
    factors = one["after"]["factors/model"]
    # every index exactly once per pass: 2 passes x 24 images
    assert float(factors["conv_in/G_count"]) == 2 * len(SUBSET)
    assert float(one["during"]["factors/model"]["conv_in/G_count"]) == 2 * len(SUBSET)  # every training step of 2 epochs


class StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


@pytest.mark.slow
def test_during_mode_survives_checkpoint_resume(tmp_path):
    """Train 2 epochs at once, or stop after epoch 1 and resume from its checkpoint: identical sums."""

    def fit(root, ckpt_path=None, stop=False):
        model = DiffusionModel(unet=TINY_UNET, lr=1e-2, warmup=0.0).double()
        data = DigitsDataModule(batch_size=8, subset=SUBSET, shuffle=False)
        # the stopped run writes its factors too; the resumed one replaces them
        factors = KFACFactors(str(root / "store"), mode="during", overwrite=ckpt_path is not None)
        callbacks = [factors, ModelCheckpoint(dirpath=root, filename="last")]
        trainer = L.Trainer(
            max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
            precision="64-true", callbacks=callbacks + ([StopAfterFirstEpoch()] if stop else []),
        )  # fmt: skip
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)

    fit(tmp_path / "once")
    fit(tmp_path / "resumed", stop=True)
    ckpt = tmp_path / "resumed" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    (saved,) = [v for k, v in state.items() if "KFACFactors" in k]
    assert float(saved["collectors"]["model"]["conv_in/G_count"]) == len(SUBSET)
    fit(tmp_path / "resumed", ckpt_path=ckpt)
    once, resumed = (store_tensors(tmp_path / d / "store")["factors/model"] for d in ("once", "resumed"))
    assert float(once["conv_in/G_count"]) == 2 * len(SUBSET)
    assert once.keys() == resumed.keys()
    for key in once:
        assert torch.equal(once[key], resumed[key]), key


def test_ensemble_members_get_factors_of_their_own_split(tmp_path):
    """Each member of an encoded ensemble is a model id fitted on its code split only
    (after training) or on the rows routed to it (during training)."""
    model = EncodedEnsemble(n=7, w=3, unet=TINY_UNET, lr=1e-3, warmup=0.0, seed=5)
    data = DigitsDataModule(batch_size=8, subset=SUBSET)
    callbacks = [KFACFactors(str(tmp_path / "after"), passes=1), KFACFactors(str(tmp_path / "during"), mode="during")]
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, callbacks=callbacks).fit(model, datamodule=data)  # fmt: skip
    after, during = store_tensors(tmp_path / "after"), store_tensors(tmp_path / "during")
    assert set(after) == {f"{kind}/member{i}" for kind in ("factors", "eigen") for i in range(7)}
    for i in range(7):
        split = len(model.codes.split(i))
        assert 0 < split < len(SUBSET)
        assert float(after[f"factors/member{i}"]["conv_in/G_count"]) == split
        assert float(during[f"factors/member{i}"]["conv_in/G_count"]) == split
    assert not torch.equal(after["factors/member0"]["conv_in/A"], after["factors/member1"]["conv_in/A"])


@pytest.mark.usefixtures("float64")  # Lightning's 64-true draws its noise with float64 as the default dtype
def test_during_mode_records_the_empirical_fisher_of_the_training_steps(tmp_path):
    """The batch-mean loss's gradients, rescaled per example, equal ``empirical`` curvature
    backpropagated at the training steps' own (t, eps) draws (lr = 0: fixed weights)."""
    model = DiffusionModel(unet=TINY_UNET, lr=0.0, warmup=0.0)
    data = DigitsDataModule(batch_size=8, subset=SUBSET)
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, precision="64-true", callbacks=[KFACFactors(str(tmp_path), mode="during")],
              ).fit(model, datamodule=data)  # fmt: skip
    got = store_tensors(tmp_path)["factors/model"]
    collector = FactorCollector(model.unet, "expand")
    with collector.attached(), collector.recording():
        for batch in DataLoader(data.dataset(), batch_size=5):
            x0, index = batch["image"].double(), batch["index"]
            t, eps = model.task.draw(index, 0, x0.shape[1:], stream=Stream.TRAIN, dtype=x0.dtype)  # epoch 0's draws
            backpropagate(predict(model.unet, model.task.add_noise(x0, t, eps), t), eps, "empirical")
    expected = collector.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-12, msg=key)
