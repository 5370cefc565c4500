"""Class-conditional models: each row's label enters training (with the null class of classifier-free
guidance), sampling, featurisation, factors, measurements and the synthetic-ablation chain. The
exact references of the unconditional tests hold with labels, and the labels change the answer."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from torch import Tensor
from diffusers import DDPMScheduler

from tests.helpers import (
    TINY_UNET,
    attribute_every_method,
    check_jvp_columns,
    check_projected_grads,
    check_unet_factors,
    cli,
    tiny_config,
)
from wherefrom import DTRAK, EKFAC, load_module
from wherefrom.attribution.api import ATTRIBUTORS
from wherefrom.datamodules import DigitsDataModule
from wherefrom.errors import WherefromError
from wherefrom.ensemble import Codes, EncodedEnsemble, EnsembleSampler
from wherefrom.features import per_sample_grads
from wherefrom.model import DiffusionModel, build_unet
from wherefrom.sampling import guided
from wherefrom.task import DiffusionTask, Stream

CLASSES = 10
COND_UNET = {**TINY_UNET, "num_class_embeds": CLASSES + 1}  # + the null class
NULL = torch.tensor(CLASSES)


def _model64() -> DiffusionModel:
    return DiffusionModel(unet=dict(TINY_UNET), num_classes=CLASSES, seed=3).double().eval()


@pytest.mark.parametrize("projection", ["dense", "structured"])
def test_conditional_projected_grads_equal_autograd_loop_and_explicit_matrix(projection):
    model, index = _model64(), torch.tensor([4, 0, 17])
    x0 = DigitsDataModule().images[index].double()
    check_projected_grads(model, x0, index, projection, "loss", cond=torch.tensor([4, 0, 7]))
    draws = [(0, 500)]
    a, b = (per_sample_grads(model.unet, model.task, x0, index, "loss", draws, cond=torch.tensor(c)) for c in ([4, 0, 7], [1, 1, 1]))
    assert (a - b).abs().amax(1).min() > 1e-6 * a.abs().max()  # every row depends on its label


def test_conditional_factors_equal_explicit_per_position_computation(float64):
    unet, task = build_unet(COND_UNET, 0).double(), DiffusionTask()
    assert unet.class_embedding is not None
    x0 = DigitsDataModule().images[:3].double()
    t, eps = task.draw(torch.arange(3), 0, x0.shape[1:], stream=Stream.FACTORS, dtype=x0.dtype)
    layers = {"down_blocks.1.attentions.0.to_q", "time_embedding.linear_1"}
    check_unet_factors(unet, task.add_noise(x0, t, eps), t, eps, "expand", layers, cond=torch.tensor([3, 9, NULL]))


def _sampler(guidance: float, n: int = 3, steps: int = 3) -> EnsembleSampler:
    members = [build_unet(COND_UNET, seed=i).double().eval() for i in range(n)]
    codes = Codes.generate(np.arange(10, 13), n, 1, seed=0)
    return EnsembleSampler(members, DiffusionTask(), (1, 8, 8), codes, seed=3, steps=steps, dtype=torch.float64,
                           cond=torch.tensor([2, 7, 7, 1, 0, 4]), guidance=guidance, null=NULL)  # fmt: skip


def test_guidance_is_the_classifier_free_combination():
    net = build_unet(COND_UNET, 0).double().eval()
    eps = lambda x, t, c=None: net(x, t, class_labels=c).sample  # noqa: E731
    x, t, c = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([10, 900]), torch.tensor([1, 5])
    with torch.no_grad():
        u, k = eps(x, t, NULL.expand(2)), eps(x, t, c)
        torch.testing.assert_close(guided(eps, 3.0, NULL)(x, t, c), u + 3.0 * (k - u))
    assert guided(eps, 1.0, None) is eps


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_conditional_guided_ablation_jacobian_equals_finite_differences(guidance):
    s = _sampler(guidance)
    check_jvp_columns(s)
    with torch.no_grad():  # the labels steer the chain
        assert not torch.allclose(s.sample([0]), s.sample([1]))


def test_conditional_measurement_scores_equal_the_exactly_ablated_measurement():
    from wherefrom.ensemble.synthetic import measurement_scores, quadratic_measurement

    s, labels = _sampler(1.0, n=4), torch.tensor([3, 8])
    s.codes = Codes.generate(np.arange(10, 16), 4, 2, seed=0)
    queries = DigitsDataModule().images[[3, 40]].double()
    quad = quadratic_measurement(s, queries, "loss", draws=3, seed=2, cond=labels)
    scores = measurement_scores(quad, s.uniform_weights(), s.codes, num_images=20)
    task = DiffusionTask(seed=2)

    def measured(weights: Tensor) -> Tensor:  # the loss of the weighted ensemble under the queries' labels, draw by draw
        eps_fn, total = s.eps_fn(weights), torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for d in range(3):
                x_t, t, eps = task.noisy(queries, torch.arange(2), "loss", d, None)
                total += (eps_fn(x_t, t, labels) - eps).pow(2).flatten(1).mean(1) / 3
        return total

    base = measured(s.uniform_weights())
    torch.testing.assert_close(quad(s.uniform_weights()), base, rtol=1e-10, atol=0)
    for x in s.codes.indices:
        torch.testing.assert_close(torch.from_numpy(scores[:, x]), measured(s.ablation_weights([int(x)])) - base, rtol=1e-8, atol=1e-12)
    unlabelled = measurement_scores(quadratic_measurement(s, queries, "loss", draws=3, seed=2, cond=labels.flip(0)), s.uniform_weights(), s.codes, 20)
    assert not np.allclose(unlabelled, scores)


def test_condition_dropout_is_seeded_per_index_and_epoch(monkeypatch):
    model = DiffusionModel(unet=dict(TINY_UNET), num_classes=CLASSES, cond_dropout=0.5)
    batch = {"image": torch.zeros(64, 1, 8, 8), "index": torch.arange(64), "label": torch.full((64,), 3)}
    _, _, labels = model.batch(batch)
    again = model.batch(batch)[2]
    dropped = labels == CLASSES
    assert torch.equal(labels, again) and 16 < int(dropped.sum()) < 48 and (labels[~dropped] == 3).all()
    monkeypatch.setattr(DiffusionModel, "current_epoch", property(lambda self: 1))
    assert not torch.equal(model.batch(batch)[2], labels)  # another epoch drops other rows


def test_labels_reach_only_networks_that_take_them(tmp_path, capsys):
    """An unconditional UNet featurised on labelled data ignores the labels (same features); a
    conditional model on unlabelled data, or the reverse, is refused before training."""
    from wherefrom.features import FeatureConfig, featurize
    from wherefrom.store import Store
    from wherefrom.target import DatasetView

    net, config = build_unet(TINY_UNET, 0).double(), FeatureConfig(timesteps=2, proj_dim=32)
    stores = []
    for name, data in [("plain", DigitsDataModule(subset=list(range(6)))), ("labelled", DigitsDataModule(subset=list(range(6)), conditional=True))]:
        items = DatasetView(data.dataset(), "test")  # a user's labelled DataLoader items, and the datamodule itself
        for kind, source in [("view", items), ("dm", data)]:
            store = Store(tmp_path / f"{name}_{kind}", source.fingerprint)
            featurize(net, "model", DiffusionTask(), source, store, config, batch_size=4)
            stores.append(store.read_array("features/square_norm/model"))
    for other in stores[1:]:  # rows of the 6 training images (a view's index space ends at its largest index)
        np.testing.assert_allclose(other[:6], stores[0][:6], rtol=1e-12)
    config_file = tiny_config(tmp_path)
    code, err = cli(capsys, "fit", "--config", str(config_file), "--data.conditional", "true")
    assert code == 2 and "pass --model.num_classes or drop --data.conditional" in err


def test_conditional_export_reloads_and_the_benchmarks_refuse_conditional_models(runs, tmp_path, capsys):
    _, ckpt, ens = runs
    assert cli(capsys, "export", "--ckpt", str(ckpt), "--out", str(tmp_path / "export"))[0] == 0
    for source in (ckpt, tmp_path / "export"):
        code, err = cli(capsys, "sample", "--ckpt", str(source), "--num-samples", "2", "--steps", "3", "--labels", "4,6", "--out", str(tmp_path / source.name))
        assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "export" / "samples.npy"), np.load(tmp_path / ckpt.name / "samples.npy"))
    np.save(tmp_path / "scores.npy", np.zeros((2, 1797), dtype=np.float32))
    code, err = cli(capsys, "loo", "--ckpt", str(ens), "--scores", str(tmp_path / "scores.npy"), "--num-indices", "2", "--out", str(tmp_path / "loo"))
    assert code == 2 and "evaluate unconditional models" in err


# --- end to end from the CLI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A class-conditional model from `wherefrom fit` and a conditional encoded ensemble, on 24 labelled digits."""
    root = tmp_path_factory.mktemp("cond")
    config = tiny_config(root, lr=3e-3)
    from wherefrom.cli import main

    main(["fit", "--config", str(config), "--model.num_classes", str(CLASSES), "--data.conditional", "true"])
    L.seed_everything(0)
    ens = EncodedEnsemble(n=4, w=2, unet=dict(TINY_UNET), num_classes=CLASSES, lr=1e-3, seed=5)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(ens, DigitsDataModule(batch_size=4, subset=list(range(2, 8)), conditional=True))
    trainer.save_checkpoint(root / "ens.ckpt")
    return root, root / "run" / "last.ckpt", root / "ens.ckpt"


def test_conditional_model_trained_sampled_and_attributed_from_the_cli(runs, tmp_path, capsys):
    root, ckpt, _ = runs
    module = load_module(ckpt)
    assert module.hparams.num_classes == CLASSES and module.unet.config.num_class_embeds == CLASSES + 1
    code, err = cli(capsys, "sample", "--ckpt", str(ckpt), "--num-samples", "3", "--steps", "4", "--labels", "1,5,5", "--guidance", "2", "--out", str(tmp_path / "s"))
    assert code == 0, err
    samples = torch.from_numpy(np.load(tmp_path / "s" / "samples.npy"))
    torch.testing.assert_close(samples, module.generate(3, steps=4, labels=[1, 5, 5], guidance=2.0))
    assert not torch.allclose(samples, module.generate(3, steps=4, labels=[1, 5, 5]))  # guidance moves the samples
    _, _, ens = runs
    queries = ["--queries", str(tmp_path / "s" / "samples.npy"), "--labels", "1,5,5"]
    scores = attribute_every_method(capsys, ckpt, tmp_path, queries, ens, ["--num-samples", "2", "--steps", "3", "--labels", "4,9", "--guidance", "2"])
    assert set(scores) == set(ATTRIBUTORS)
    # issue 38, item 9: topk.json and the report say what each query was conditioned on
    rows = json.loads((tmp_path / "scores_dtrak" / "topk.json").read_text())["queries"]
    assert [row["condition"] for row in rows] == ["a digit one", "a digit five", "a digit five"]
    data = DigitsDataModule(subset=list(range(24)), conditional=True)
    for method, attributor in [("dtrak", DTRAK(store=str(tmp_path / "store_dtrak"))), ("ekfac", EKFAC(store=str(tmp_path / "store_trak"), timesteps=2))]:
        api = attributor.attribute(module, data, samples, cond=torch.tensor([1, 5, 5]))
        np.testing.assert_allclose(scores[method], api.scores, rtol=1e-5, atol=1e-6 * np.abs(api.scores).max())  # CLI == API
        other = attributor.attribute(module, data, samples, cond=torch.tensor([0, 0, 0]))
        assert not np.allclose(other.scores, api.scores, rtol=1e-3), method  # the query's label enters its gradient
    # issue 38, item 2: the user's own module around the same class-conditional UNet, attributed without cond=
    own = L.LightningModule()
    own.unet, own.noise_scheduler = module.unet, DDPMScheduler()
    with pytest.raises(WherefromError, match=r"^UNet2DModel is class-conditional but got no class labels; give the queries' conditions \(cond=\)") as err:
        DTRAK(store=str(tmp_path / "store_dtrak")).attribute(own, data, samples)
    assert "\n" not in str(err.value)
    # labels are required exactly when the model is conditional: one line, exit 2
    capsys.readouterr()  # the API calls' progress bars
    code, err = cli(capsys, "attribute", "--ckpt", str(ckpt), "--method", "pixel", "--queries", str(tmp_path / "s" / "samples.npy"), "--out", str(tmp_path / "x"))
    assert code == 2 and "pass a label per sample" in err and err.count("\n") == 1
    code, err = cli(capsys, "sample", "--ckpt", str(ckpt), "--num-samples", "2", "--labels", "12", "--out", str(tmp_path / "y"))
    assert code == 2 and "labels in [0, 10)" in err


def test_conditional_ensemble_exact_ablation_is_the_guided_conditional_chain(runs, tmp_path, capsys):
    _, _, ens = runs
    common = ["--ckpt", str(ens), "--num-samples", "2", "--steps", "3", "--labels", "4,9", "--guidance", "2"]
    code, err = cli(capsys, "attribute", "--method", "ablation", *common, "--top-k", "2", "--exact", "--out", str(tmp_path / "a"))
    assert code == 0, err
    scores, top = np.load(tmp_path / "a" / "scores.npy"), json.loads((tmp_path / "a" / "topk.json").read_text())
    module = load_module(ens)
    sampler = module.sampler(steps=3, cond=torch.tensor([4, 9]), guidance=2.0)
    with torch.no_grad():  # the exact re-ranking ablates the guided, conditional chain
        for q, row in enumerate(top["queries"]):
            exact = [float((sampler.ablate([x], [q]) - sampler.sample([q])).norm()) for x in row["indices"]]
            np.testing.assert_allclose(row["exact_l2"], exact, rtol=1e-3)
    assert (scores[:, 2:8] > 0).all()


def test_conditional_model_needs_labelled_data(tmp_path, capsys):
    config = tiny_config(tmp_path)
    code, err = cli(capsys, "fit", "--config", str(config), "--model.num_classes", "10")
    assert code == 2 and "--data.conditional true" in err
    code, err = cli(capsys, "fit", "--config", str(config), "--model.unet.class_embed_type", "timestep")
    assert code == 2 and "class conditioning is set by --model.num_classes" in err
    np.save(tmp_path / "x.npy", np.zeros((30, 1, 8, 8), dtype=np.uint8))
    code, err = cli(capsys, "fit", "--config", str(config), "--model.num_classes", "10", "--data", "wherefrom.ArrayDataModule",
                    "--data.path", str(tmp_path / "x.npy"), "--data.conditional", "true")  # fmt: skip
    assert code == 2 and "needs a source with labels" in err and "Traceback" not in err


def test_the_lds_benchmark_refuses_a_conditional_fit_config_before_training(tmp_path, capsys):
    import yaml

    fit = {"model": {"class_path": "wherefrom.DiffusionModel", "init_args": {"num_classes": 10}},
           "data": {"class_path": "wherefrom.DigitsDataModule", "init_args": {"conditional": True}}}  # fmt: skip
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(fit))
    (tmp_path / "lds.yaml").write_text(yaml.safe_dump({"out": str(tmp_path / "bench"), "fit": "fit.yaml"}))
    code, err = cli(capsys, "lds", "subsets", "--config", str(tmp_path / "lds.yaml"))
    assert code == 2 and "evaluate unconditional models" in err and not (tmp_path / "bench").exists()
