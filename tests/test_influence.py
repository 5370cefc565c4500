"""(EK-)FAC influence scores against ``g_q^T (F + lambda I)^{-1} g_x`` with the dense
matrix and the gradients built explicitly (float64), projected vs exact mode, and the
``factors`` / ``attribute`` commands end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from tests.helpers import TINY_UNET, MinSNR, tiny_config
from wherefrom import cli
from wherefrom.attribution.influence import (
    EKFAC,
    MEASURES,
    influence_scores,
    projection_scale,
)
from wherefrom.attribution.report import write_attribution
from wherefrom.datamodules import DigitsDataModule
from wherefrom.ensemble import Codes, EncodedEnsemble
from wherefrom.errors import WherefromError
from wherefrom.features import (
    FeatureConfig,
    Projection,
    featurize,
    trainable_parameters,
)
from wherefrom.kfac import (
    HEURISTIC_DAMPING,
    FactorConfig,
    KFACPreconditioner,
    LayerEigen,
    fit_factors,
    layer_dims,
    load_preconditioner,
    tracked_layers,
    training_split,
)
from wherefrom.kfac.stored import (
    InfluenceConfig,
    allocate,
    block_shape,
    featurize_influence,
    open_stored,
)
from wherefrom.model import DiffusionModel
from wherefrom.store import Entry, Store, as_tensor
from wherefrom.task import Stream, predict

# ~1.3k parameters (attention included): the dense (F + lambda I) fits in memory
MICRO_UNET = dict(TINY_UNET, block_out_channels=(2, 2), norm_num_groups=1, attention_head_dim=2)
TRAIN = list(range(6))
CONFIG = FeatureConfig(output="loss", timesteps=2, strategy="random", proj_dim=4096, projection="dense")


def weight_bias_order(d_out: int, d_in: int) -> torch.Tensor:
    """Position of each row-major ``[W, b]`` entry in the parameter layout ``(vec W, b)``."""
    w = torch.arange(d_out * d_in).view(d_out, d_in)
    return torch.cat([w, d_out * d_in + torch.arange(d_out).view(d_out, 1)], 1).reshape(-1)


def random_eigen(d_out: int, d_in: int, gen: torch.Generator) -> LayerEigen:
    a, g = torch.randn(d_in, d_in, generator=gen, dtype=torch.float64), torch.randn(d_out, d_out, generator=gen, dtype=torch.float64)
    la, qa = torch.linalg.eigh(a @ a.T)
    lg, qg = torch.linalg.eigh(g @ g.T)
    return LayerEigen(qa, la, qg, lg)


@pytest.mark.parametrize("ekfac", [False, True], ids=["kfac", "ekfac"])
@pytest.mark.parametrize("damping", [None, 0.3], ids=["heuristic", "absolute"])
def test_preconditioner_equals_dense_damped_solve(ekfac, damping):
    gen = torch.Generator().manual_seed(0)
    e = random_eigen(3, 5, gen)
    corrected = torch.rand(3, 5, generator=gen, dtype=torch.float64) if ekfac else None
    pre = KFACPreconditioner({"layer": e}, {"layer": corrected} if ekfac else None, damping)
    q = torch.kron(e.qg, e.qa)
    lam = corrected if ekfac else torch.outer(e.lg, e.la)
    curvature = q @ torch.diag(lam.reshape(-1)) @ q.T  # = kron(G, A) for K-FAC
    if not ekfac:
        torch.testing.assert_close(curvature, torch.kron(e.qg @ torch.diag(e.lg) @ e.qg.T, e.qa @ torch.diag(e.la) @ e.qa.T))
    lam_d = HEURISTIC_DAMPING * float(lam.mean()) if damping is None else damping
    v = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)
    expected = torch.linalg.solve(curvature + lam_d * torch.eye(15, dtype=torch.float64), v.reshape(4, 15).T).T
    torch.testing.assert_close(pre.apply("layer", v).reshape(4, 15), expected)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A micro UNet (float64, random weights), 6 training digits, factors with EK-FAC in a store."""
    torch.manual_seed(0)
    module = DiffusionModel(unet=MICRO_UNET, seed=3).double().eval()
    dm = DigitsDataModule(subset=TRAIN)
    dm.setup()
    store = Store(tmp_path_factory.mktemp("store"), dm.fingerprint)
    net = module.unet
    fit_factors(net, "model", module.task, dm, np.asarray(TRAIN), store, FactorConfig(passes=2, ekfac=True), batch_size=4)
    queries = (DigitsDataModule().images[100:103]).double()
    return module, dm, store, queries


def explicit_gradient(net, task, x0: torch.Tensor, index: int, name: str) -> torch.Tensor:
    """``grad_theta (1/K) sum_k m(x_t, t, eps)`` of one image, one draw at a time."""
    params = trainable_parameters(net)
    total = 0
    for draw, t in CONFIG.draws(task):
        x_t, tt, eps = task.noisy(x0[None], torch.tensor([index]), name, draw, t, Stream.FEATURES)
        total = total + task.measurement(name)(predict(net, x_t, task.model_time(tt)), eps, tt, task).sum() / CONFIG.timesteps
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, list(params.values()))])


def dense_curvature(net, store: Store, ekfac: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``F + lambda I`` over the parameters of K-FAC's layers, and those parameters' positions."""
    params = trainable_parameters(net)
    offsets, start = {}, 0
    for name, p in params.items():
        offsets[name] = start
        start += p.numel()
    eigen = store.load_tensors("eigen/model")
    lam_ek = store.load_tensors("ekfac/model") if ekfac else None
    blocks, positions = [], []
    for name, layer in tracked_layers(net).items():
        d_out, d_in = layer_dims(layer)
        qa, la, qg, lg = (eigen[f"{name}/{k}"] for k in ("qa", "la", "qg", "lg"))
        if ekfac:
            lam = lam_ek[f"{name}/lambda"] / lam_ek[f"{name}/lambda_count"]
            q = torch.kron(qg, qa)
            block = q @ torch.diag(lam.reshape(-1)) @ q.T
        else:
            a, g = qa @ torch.diag(la) @ qa.T, qg @ torch.diag(lg) @ qg.T
            lam, block = torch.outer(lg, la), torch.kron(g, a)
        order = weight_bias_order(d_out, d_in - 1)
        perm = torch.empty_like(order)
        perm[order] = torch.arange(len(order))  # row-major [W, b] -> parameter layout
        blocks.append(block[perm][:, perm] + HEURISTIC_DAMPING * lam.mean() * torch.eye(len(order), dtype=torch.float64))
        w, b = offsets[f"{name}.weight"], offsets[f"{name}.bias"]
        positions.append(torch.cat([torch.arange(w, w + d_out * (d_in - 1)), torch.arange(b, b + d_out)]))
    return torch.block_diag(*blocks), torch.cat(positions)


def test_ensemble_influence_is_the_mean_of_each_members_own_influence(setup, tmp_path):
    """EK-FAC on an encoded ensemble (n = 4, w = 2 over the 6 images) equals, image by image, the
    mean over the 4 members of each member's EK-FAC as a single model with factors on its own code
    split, 0 for the images it never saw: each image is scored by its w members only."""
    _, dm, _, queries = setup
    torch.manual_seed(1)
    ens = EncodedEnsemble(n=4, w=2, unet=MICRO_UNET, seed=3).double().eval()
    ens.codes = Codes.generate(dm.indices, 4, 2, 3, dm.fingerprint)
    store, config = Store(tmp_path / "ensemble", dm.fingerprint, ens.codes_fingerprint), FactorConfig(passes=2, ekfac=True)
    for model_id, net in ens.denoisers().items():
        fit_factors(net, model_id, ens.task, dm, training_split(ens, model_id, dm.indices), store, config, batch_size=4)
    got = influence_scores(ens, dm, queries, store, "loss", ekfac=True, config=CONFIG, batch_size=4)
    expected = np.zeros_like(got)
    for i in range(4):
        single = DiffusionModel(unet=MICRO_UNET, seed=3).double().eval()
        single.unet.load_state_dict(ens.members[f"member{i}"].state_dict())
        split = ens.codes.split(i)
        assert 0 < len(split) < len(TRAIN)
        member_store = Store(tmp_path / f"member{i}", dm.fingerprint)
        fit_factors(single.unet, "model", single.task, dm, split, member_store, config, batch_size=4)
        own = influence_scores(single, dm, queries, member_store, "loss", ekfac=True, config=CONFIG, batch_size=4)
        expected[:, split] += own[:, split] / 4
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-12 * np.abs(expected).max())
    assert np.abs(got[:, TRAIN]).min() > 0 and not got[:, len(TRAIN) :].any()


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
@pytest.mark.parametrize("measurement", MEASURES)
def test_influence_equals_dense_inverse(setup, method, measurement):
    module, dm, store, queries = setup
    net, task = module.unet, module.task
    got = influence_scores(module, dm, queries, store, measurement, ekfac=method == "ekfac", config=CONFIG, batch_size=4)
    assert got.shape == (len(queries), dm.num_images)
    curvature, tracked = dense_curvature(net, store, method == "ekfac")
    g_q = torch.stack([explicit_gradient(net, task, q, -(i + 1), measurement) for i, q in enumerate(queries)])[:, tracked]
    g_x = torch.stack([explicit_gradient(net, task, dm.images[i].double(), i, "loss") for i in TRAIN])[:, tracked]
    expected = g_q @ torch.linalg.solve(curvature, g_x.T)
    np.testing.assert_allclose(got[:, TRAIN], expected.detach().numpy(), rtol=1e-8, atol=1e-12 * float(expected.abs().max()))
    assert not got[:, len(TRAIN) :].any()  # images outside the split have no influence
    assert np.abs(got[:, TRAIN]).min() > 0


@pytest.mark.parametrize("objective", ["v_prediction", "flow_matching", "edm", "own"])
def test_every_objective_gives_influence_equal_to_its_dense_inverse_and_stored_equal_to_exact(objective, tmp_path):
    """Per-sample gradients (the explicit loop), K-FAC factors fitted under the objective, exact and stored
    influence: the same references as epsilon-prediction's, under each objective (an own one: Min-SNR weights)."""
    torch.manual_seed(0)
    module = DiffusionModel(unet=MICRO_UNET, seed=3, objective=MinSNR(2.0) if objective == "own" else objective).double().eval()
    net, task = module.unet, module.task
    dm = DigitsDataModule(subset=TRAIN)
    dm.setup()
    store = Store(tmp_path / "store", dm.fingerprint)
    fit_factors(net, "model", task, dm, np.asarray(TRAIN), store, FactorConfig(passes=2, ekfac=True), batch_size=4)
    queries = DigitsDataModule().images[100:102].double()
    got = influence_scores(module, dm, queries, store, "loss", ekfac=True, config=CONFIG, batch_size=4)
    curvature, tracked = dense_curvature(net, store, True)
    g_q = torch.stack([explicit_gradient(net, task, q, -(i + 1), "loss") for i, q in enumerate(queries)])[:, tracked]
    g_x = torch.stack([explicit_gradient(net, task, dm.images[i].double(), i, "loss") for i in TRAIN])[:, tracked]
    expected = (g_q @ torch.linalg.solve(curvature, g_x.T)).detach().numpy()
    np.testing.assert_allclose(got[:, TRAIN], expected, rtol=1e-8, atol=1e-12 * np.abs(expected).max())
    config = InfluenceConfig(dim=10**7, timesteps=CONFIG.timesteps, strategy=CONFIG.strategy, dtype="float64")
    featurize_influence(net, "model", task, dm, np.asarray(TRAIN), store, config, batch_size=4)
    stored = influence_scores(module, dm, queries, store, "loss", ekfac=True, grads="stored", batch_size=4)
    np.testing.assert_allclose(stored, got, rtol=1e-9, atol=1e-12 * np.abs(got).max())


def test_projected_mode_projects_the_preconditioned_query(setup):
    """``<P (F + lambda I)^{-1} g_q, P g_x> / D`` with the store's features ``P g_x``."""
    module, dm, store, queries = setup
    net, task = module.unet, module.task
    featurize(net, "model", task, dm, store, CONFIG, batch_size=4)
    got = influence_scores(module, dm, queries, store, "square_norm", ekfac=True, grads="projected", batch_size=4)
    curvature, tracked = dense_curvature(net, store, ekfac=True)
    g_q = torch.stack([explicit_gradient(net, task, q, -(i + 1), "square_norm") for i, q in enumerate(queries)])
    pre = torch.zeros_like(g_q)
    pre[:, tracked] = torch.linalg.solve(curvature, g_q[:, tracked].T).T
    g_x = torch.stack([explicit_gradient(net, task, dm.images[i].double(), i, "loss") for i in TRAIN])
    projection = Projection(CONFIG, net, "model")
    expected = projection.project(pre.detach()) @ projection.project(g_x.detach()).T / CONFIG.proj_dim
    np.testing.assert_allclose(got[:, TRAIN], expected.numpy(), rtol=1e-7, atol=1e-10 * float(expected.abs().max()))
    assert not got[:, len(TRAIN) :].any()


@pytest.mark.parametrize("kind, dim", [("dense", 4096), ("structured", 65536)])
def test_projection_scale_preserves_inner_products(setup, kind, dim):
    """``<P u, P v> / c`` estimates ``<u, v>`` over the parameters a projection covers."""
    net = setup[0].unet
    projection = Projection(FeatureConfig(proj_dim=dim, projection=kind), net, "model")
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(1, projection.num_params, generator=gen, dtype=torch.float64)
    v = u + 0.5 * torch.randn(1, projection.num_params, generator=gen, dtype=torch.float64)
    covered = torch.zeros(projection.num_params, dtype=torch.bool)
    for layer in getattr(projection, "layers", []):
        covered[layer.weight] = True
        covered[layer.bias] = True
    if kind == "dense":
        covered[:] = True
    estimate = float(projection.project(u) @ projection.project(v).T) / projection_scale(projection)
    assert estimate == pytest.approx(float(u[0, covered] @ v[0, covered]), rel=0.1)


def test_factors_and_attribute_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli.main(["fit", "--config", str(tiny_config(tmp_path))])
    ckpt, store = str(tmp_path / "run" / "last.ckpt"), str(tmp_path / "store")
    cli.main(["factors", "--ckpt", ckpt, "--store", store, "--ekfac", "--batch-size", "8"])
    assert set(Store.open(store).entries("tensors")) == set(Entry.kfac("model").values())
    config = Store.open(store).config("factors/model")
    assert config["curvature"] == "mc" and config["kfac"] == "expand" and config["ekfac"]
    cli.main(["factors", "--ckpt", ckpt, "--store", store, "--ekfac", "--batch-size", "8"])  # same config: kept
    with pytest.raises(SystemExit) as exit_:
        cli.main(["factors", "--ckpt", ckpt, "--store", store, "--kfac", "reduce"])
    assert exit_.value.code == 2 and "--overwrite" in capsys.readouterr().err
    out = tmp_path / "attr"
    args = ["attribute", "--ckpt", ckpt, "--method", "ekfac", "--store", store, "--num-samples", "2", "--steps", "5", "--out", str(out)]
    cli.main(args + ["--measurement", "elbo", "--top-k", "3"])
    scores = np.load(out / "scores.npy")
    assert scores.shape == (2, 1797) and np.abs(scores[:, :24]).min() > 0 and (out / "topk.png").is_file()
    assert json.loads((out / "topk.json").read_text())["grads"] == "exact"  # no stored influence yet
    # stored influence beside the factors (kept): attribute reads it by default
    capsys.readouterr()
    cli.main(["factors", "--ckpt", ckpt, "--store", store, "--ekfac", "--batch-size", "8", "--features", "--dim", "10000000", "--timesteps", "3", "--features-dtype", "float32"])
    assert Store.open(store).has(Entry.influence("model"))
    fidelity = Store.open(store).manifest["entries"][Entry.influence("model")]["fidelity"]  # every coordinate kept: stored = exact
    assert fidelity["pearson"] > 0.999 and fidelity["train"] == 24 and f"Pearson r {fidelity['pearson']:.3f}" in capsys.readouterr().out
    results = {}
    for grads in ("auto", "exact"):
        cli.main(args[:-1] + [str(tmp_path / grads), "--measurement", "elbo", "--timesteps", "3", "--grads", grads])
        results[json.loads((tmp_path / grads / "topk.json").read_text())["grads"]] = np.load(tmp_path / grads / "scores.npy")
    stored, exact = results["stored"], results["exact"]
    np.testing.assert_allclose(stored, exact, rtol=1e-3, atol=1e-4 * np.abs(exact).max())  # the whole basis kept; float32
    with pytest.raises(SystemExit) as exit_:
        cli.main(args + ["--measurement", "l1_norm"])
    assert exit_.value.code == 2 and "--measurement" in capsys.readouterr().err


def test_topk_json_states_the_unit_names_and_predicted_change(setup, tmp_path):
    """K-FAC's ``predicted_change`` is score / N (N training images), each top image is named by its
    digit class, and the unit is the method's."""
    module, dm, store, queries = setup
    result = EKFAC(store=str(store.root), measurement="elbo", grads="exact", timesteps=CONFIG.timesteps, batch_size=4).attribute(module, dm, queries)
    write_attribution(tmp_path, result, dm.images, top_k=3)
    top = json.loads((tmp_path / "topk.json").read_text())
    assert top["unit"] == EKFAC.unit and "score / N" in top["unit"] and top["removal_scale"] == 1 / len(TRAIN)
    classes = dm.labels
    for row in top["queries"]:
        np.testing.assert_allclose(row["predicted_change"], [s / len(TRAIN) for s in row["scores"]], rtol=1e-15)
        assert row["names"] == [DigitsDataModule.class_names[classes[i]] for i in row["indices"]]


def test_stored_influence_with_the_whole_basis_equals_exact_mode(setup, tmp_path):
    """Every eigenbasis coordinate kept, no sketch: stored rows reproduce exact mode (float64)."""
    module, dm, store, queries = setup
    config = InfluenceConfig(dim=10**7, timesteps=CONFIG.timesteps, strategy=CONFIG.strategy, dtype="float64")
    featurize_influence(module.unet, "model", module.task, dm, np.asarray(TRAIN), store, config, batch_size=4)
    stored = Store.open(store.root).config(Entry.influence("model"))
    assert stored["row_dim"] == sum(d_out * d_in for d_out, d_in in map(layer_dims, tracked_layers(module.unet).values()))
    for ekfac in (False, True):
        exact = influence_scores(module, dm, queries, store, "elbo", ekfac=ekfac, grads="exact", config=config.features(), batch_size=4)
        got = influence_scores(module, dm, queries, store, "elbo", ekfac=ekfac, grads="stored", batch_size=4)
        np.testing.assert_allclose(got, exact, rtol=1e-9, atol=1e-12 * np.abs(exact).max())
        assert not got[:, len(TRAIN) :].any()


def test_truncated_stored_influence_equals_an_explicit_dense_truncation(setup, tmp_path):
    """Kept block + residual sketch, against the same truncation written with explicit Kronecker
    matrices: ``u = kron(Q_G, Q_A)^T vec(G)``, the block's coordinates, and ``kron(P_out, P_in)^T``
    applied to the rest; the query's ``u`` divided by ``Lambda + lambda`` first."""
    module, dm, _, queries = setup
    net, task = module.unet, module.task
    store = Store(tmp_path / "store", dm.fingerprint)
    fit_factors(net, "model", task, dm, np.asarray(TRAIN), store, FactorConfig(passes=2, ekfac=True), batch_size=4)
    config = InfluenceConfig(dim=300, residual_dim=200, timesteps=CONFIG.timesteps, strategy=CONFIG.strategy, seed=5, dtype="float64")
    featurize_influence(net, "model", task, dm, np.asarray(TRAIN), store, config, batch_size=4)
    stored, rows = open_stored(Store.open(store.root), "model", net)
    assert 0 < sum(s.k_out * s.k_in for s in stored.layers) <= 300 and any(s.p_out is not None for s in stored.layers)
    pre = load_preconditioner(store, "model", net, ekfac=True)
    g_x = torch.stack([explicit_gradient(net, task, dm.images[i].double(), i, "loss") for i in TRAIN])
    g_q = torch.stack([explicit_gradient(net, task, q, -(i + 1), "square_norm") for i, q in enumerate(queries)])
    modules = dict(net.named_modules())
    train_rows, query_rows = [], []
    for s in stored.layers:
        d_out, d_in = layer_dims(modules[s.name])
        order = torch.cat([torch.arange(s.weight.start, s.weight.stop).view(d_out, d_in - 1), torch.arange(s.bias.start, s.bias.stop).view(d_out, 1)], 1)
        rotate = torch.kron(s.qg, s.qa)  # columns: sorted eigen-direction pairs (i, j), row-major
        keep = (torch.arange(d_out)[:, None] < s.k_out) & (torch.arange(d_in)[None, :] < s.k_in)
        inverse = pre.inverse[s.name].flip(0).flip(1).reshape(-1)
        for grads, weight, out in ((g_x, None, train_rows), (g_q, inverse, query_rows)):
            u = grads.detach()[:, order.reshape(-1)] @ rotate
            u = u if weight is None else u / (1 / weight)
            part = [u[:, keep.reshape(-1)]]
            if s.p_out is not None:
                part.append(u * ~keep.reshape(-1) @ torch.kron(s.p_out, s.p_in))
            out.append(torch.cat(part, 1))
    want_rows = torch.cat(train_rows, 1)
    np.testing.assert_allclose(rows[TRAIN], want_rows.numpy(), rtol=1e-9, atol=1e-12 * float(want_rows.abs().max()))
    got = influence_scores(module, dm, queries, store, "square_norm", ekfac=True, grads="stored", batch_size=4)
    want = torch.cat(query_rows, 1) @ want_rows.T
    np.testing.assert_allclose(got[:, TRAIN], want.numpy(), rtol=1e-9, atol=1e-12 * float(want.abs().max()))
    # the truncation approximates the exact score it was cut from
    exact = influence_scores(module, dm, queries, store, "square_norm", ekfac=True, grads="exact", config=config.features(), batch_size=4)
    assert np.corrcoef(got[:, TRAIN].ravel(), exact[:, TRAIN].ravel())[0, 1] > 0.5
    # bfloat16 rows (the default) are these rows rounded to bfloat16 (within half its ulp, 2^-8
    # relative, of the float64 rows), and their scores the query rows against the rounded rows
    store = Store(tmp_path / "store", dm.fingerprint, overwrite=True)
    featurize_influence(net, "model", task, dm, np.asarray(TRAIN), store, dataclasses.replace(config, dtype="bfloat16"), batch_size=4)
    half_stored, half = open_stored(Store.open(store.root), "model", net)
    assert half.dtype == np.uint16 and half_stored.config.dtype == "bfloat16"
    rounded = as_tensor(half, "bfloat16").double()
    np.testing.assert_allclose(rounded[TRAIN].numpy(), want_rows.numpy(), rtol=2**-8, atol=1e-30)
    got = influence_scores(module, dm, queries, store, "square_norm", ekfac=True, grads="stored", batch_size=4)
    want = torch.cat(query_rows, 1).float() @ rounded[TRAIN].float().T
    np.testing.assert_allclose(got[:, TRAIN], want.numpy(), rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_layout_allocates_by_effective_dimension_and_keeps_the_heaviest_block():
    assert allocate(10, [1, 100, 100], [1.0, 1.0, 2.0]) == [1, 3, 6] and allocate(10, [3, 100, 100], [1.0, 1.0, 2.0]) == [2, 2, 5]  # a capped share leaves the rest to the others
    assert allocate(10, [0, 5, 5], [9.0, 1.0, 1.0]) == [0, 5, 5] and allocate(4, [5, 5], [0.0, 1.0]) == [0, 4]
    mass = torch.tensor([[4.0, 3.0, 0.1], [3.0, 0.1, 0.1], [0.1, 0.1, 0.1]])
    assert block_shape(mass, 2) == (1, 2) and block_shape(mass, 4) == (2, 2) and block_shape(mass, 9) == (3, 3) and block_shape(mass, 0) == (0, 0)


def test_a_stored_draw_count_other_than_asked_is_refused(setup, tmp_path):
    """Issue 37: KFAC.timesteps took effect in exact mode only; stored mode replaced it with the store's K without a
    word. Now the store's K is used and said (info), and asking for another is one line."""
    from wherefrom import EKFAC

    module, dm, store, queries = setup
    copy = Store(tmp_path / "store", dm.fingerprint)
    for name in ("factors/model", "eigen/model", "ekfac/model"):
        copy.save_tensors(name, store.load_tensors(name), store.config(name))
    featurize_influence(module.unet, "model", module.task, dm, np.asarray(TRAIN), copy, InfluenceConfig(timesteps=2, dtype="float64"), batch_size=4)
    result = EKFAC(store=str(copy.root), batch_size=4).attribute(module, dm, queries)
    assert result.info["grads"] == "stored" and result.info["draws"] == 2 and result.info["query_draws"] == 2
    with pytest.raises(WherefromError, match=r"^ekfac: the store's stored training gradients took 2 draws, not timesteps=100; drop timesteps \(it is the store's\), or pass grads='exact'"):
        EKFAC(store=str(copy.root), timesteps=100).attribute(module, dm, queries)
    assert EKFAC(store=str(copy.root), timesteps=2, batch_size=4).attribute(module, dm, queries).scores.tolist() == result.scores.tolist()
