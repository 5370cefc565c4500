"""Attribution averaged over several models (issue 35, item 1): one command over several checkpoints,
each model's entries side by side in one store folder keyed by its weights, the average exactly the mean
of each model's own run, every model's scores kept, and models that cannot be averaged refused in one
line before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import SUBSET, TINY_UNET, cli, tiny_checkpoint
from wherefrom import DTRAK, load_module
from wherefrom.attribution.average import attribute_models, check_models, model_key
from wherefrom.datamodules import DigitsDataModule
from wherefrom.errors import WherefromError

SMALL = ["--timesteps", "2", "--batch-size", "8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny models of one recipe (seeds 0 and 1), one of another architecture, one of another objective."""
    root = tmp_path_factory.mktemp("average")
    for seed, name, extra in ((0, "a.ckpt", {}), (1, "b.ckpt", {}), (2, "wide.ckpt", {"unet": {**TINY_UNET, "layers_per_block": 2}}),
                              (3, "v.ckpt", {"objective": "v_prediction"})):  # fmt: skip
        tiny_checkpoint(root, seed, name, **extra)
    np.save(root / "queries.npy", DigitsDataModule().images[[40, 41, 42]].numpy())
    return root


def test_averaged_scores_are_the_mean_of_each_models_own_run(runs, tmp_path, capsys):
    root, store = runs, tmp_path / "store"
    a, b = str(runs / "a.ckpt"), str(runs / "b.ckpt")
    keys = [model_key(load_module(c)) for c in (a, b)]
    code, err = cli(capsys, "featurize", "--ckpt", a, b, "--store", str(store), "--proj-dim", "64", *SMALL)
    assert code == 0, err
    code, err = cli(capsys, "factors", "--ckpt", a, b, "--store", str(store), "--ekfac", "--passes", "1", "--batch-size", "8")
    assert code == 0, err
    assert sorted(p.name for p in store.iterdir()) == sorted(f"model-{k}" for k in keys)  # side by side, keyed by weights
    queries = ["--queries", str(root / "queries.npy")]
    for method, options in (("dtrak", ["--store", str(store)]), ("ekfac", ["--store", str(store), "--timesteps", "2"]), ("pixel", [])):
        code, err = cli(capsys, "attribute", "--ckpt", a, b, "--method", method, *options, *queries, "--out", str(tmp_path / method))
        assert code == 0, err
        own = []
        for ckpt, key in zip((a, b), keys):  # one model alone reads its own sub-store of the folder
            code, err = cli(capsys, "attribute", "--ckpt", ckpt, "--method", method, *options, *queries, "--out", str(tmp_path / f"{method}_{key}"))
            assert code == 0, err
            own.append(np.load(tmp_path / f"{method}_{key}" / "scores.npy"))
        np.testing.assert_array_equal(np.load(tmp_path / method / "scores.npy"), np.stack(own).mean(0, dtype=np.float64).astype(np.float32))
        np.testing.assert_array_equal(np.load(tmp_path / method / "scores_by_model.npy"), np.stack(own))
        top = json.loads((tmp_path / method / "topk.json").read_text())
        assert top["models"] == [{"name": a, "weights": keys[0]}, {"name": b, "weights": keys[1]}], method
    # the Python API: the same average
    modules = [load_module(c) for c in (a, b)]
    data = DigitsDataModule(subset=SUBSET)
    api = attribute_models(DTRAK(store=str(store)), modules, data, torch.from_numpy(np.load(root / "queries.npy")))
    np.testing.assert_allclose(api.scores, np.load(tmp_path / "dtrak" / "scores.npy"), rtol=1e-5, atol=1e-6 * np.abs(api.scores).max())
    assert api.by_model.shape == (2, 3, 1797) and [m["weights"] for m in api.info["models"]] == keys


def test_models_that_cannot_be_averaged_are_refused_before_any_work(runs, tmp_path, capsys):
    a = str(runs / "a.ckpt")
    for other, why in (("wide.ckpt", "architecture"), ("v.ckpt", "objective"), ("a.ckpt", "same weights")):
        for command in (["featurize", "--store", str(tmp_path / "store"), *SMALL], ["attribute", "--method", "pixel", "--queries", str(runs / "queries.npy"), "--out", str(tmp_path / "out")]):
            code, err = cli(capsys, command[0], "--ckpt", a, str(runs / other), *command[1:])
            assert code == 2 and why in err and err.count("\n") == 1, err
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()  # nothing written
    module = load_module(a)
    with pytest.raises(WherefromError, match=r"^model 1 was trained on other data than model 0 \(fingerprint "):
        check_models([module, load_module(str(runs / "b.ckpt"))], [DigitsDataModule(subset=SUBSET), DigitsDataModule(subset=SUBSET[:-1])], ["model 0", "model 1"])
