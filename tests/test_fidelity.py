"""Fidelity of stored influence (issue 34): the figure equals an explicit computation, it is recorded in
the store, and a budget below the threshold is named with one that meets it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from tests.helpers import TINY_UNET, loop_grads
from wherefrom.datamodules import DigitsDataModule
from wherefrom.features import FeatureConfig
from wherefrom.kfac import FactorConfig, fit_factors, load_preconditioner, precondition
from wherefrom.kfac.fidelity import THRESHOLD, fidelity, record_fidelity
from wherefrom.kfac.stored import InfluenceConfig, featurize_influence, open_stored
from wherefrom.model import DiffusionModel
from wherefrom.store import Entry, Store

TRAIN = list(range(6))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    module = DiffusionModel(unet=dict(TINY_UNET, block_out_channels=(2, 2), norm_num_groups=1, attention_head_dim=2), seed=3).double().eval()
    dm = DigitsDataModule(subset=TRAIN)
    dm.setup()
    store = Store(tmp_path_factory.mktemp("store"), dm.fingerprint)
    fit_factors(module.unet, "model", module.task, dm, np.asarray(TRAIN), store, FactorConfig(passes=1, ekfac=True), batch_size=4)
    config = InfluenceConfig(dim=40, timesteps=2, strategy="random", dtype="float64")
    featurize_influence(module.unet, "model", module.task, dm, np.asarray(TRAIN), store, config, batch_size=4)
    return module, dm, store


def test_fidelity_equals_an_explicit_computation(setup):
    """Every training image a query and a sampled image: stored scores from the store's rows, exact scores
    from explicit per-example gradients, per-query Pearson and Spearman r averaged."""
    module, dm, store = setup
    net, task = module.unet, module.task
    stored, rows = open_stored(store, "model", net)
    pre = load_preconditioner(store, "model", net, ekfac=True)
    got = fidelity(net, task, dm, np.asarray(TRAIN), stored, pre, batch_size=4, queries=len(TRAIN), train=len(TRAIN))

    draws = FeatureConfig(output="loss", timesteps=2, strategy="random").draws(task)
    g = loop_grads(module, dm.images[TRAIN].double(), torch.tensor(TRAIN), "loss", draws).detach()
    exact = (precondition(net, g, pre) @ g.T).numpy()
    approx = (stored.rows(g, pre) @ torch.as_tensor(np.asarray(rows[TRAIN])).T).numpy()
    pearson = np.mean([stats.pearsonr(a, e)[0] for a, e in zip(approx, exact)])
    spearman = np.mean([stats.spearmanr(a, e)[0] for a, e in zip(approx, exact)])
    assert (got.queries, got.train, got.dim) == (len(TRAIN), len(TRAIN), stored.dim)
    np.testing.assert_allclose([got.pearson, got.spearman], [pearson, spearman], rtol=1e-9)
    assert got.pearson < THRESHOLD and got.suggested_dim is not None  # 40 of the micro UNet's coordinates is too few
    bigger = fidelity(net, task, dm, np.asarray(TRAIN), type(stored)(net, stored.eigen, InfluenceConfig(dim=got.suggested_dim, timesteps=2, strategy="random", dtype="float64"), "model"), pre, 4, len(TRAIN), len(TRAIN))
    assert bigger.pearson >= THRESHOLD and bigger.suggested_dim is None
    assert "below" in got.line("--dim") and f"--dim {got.suggested_dim}" in got.line("--dim")


def test_fidelity_is_recorded_in_the_entry_and_reused(setup):
    module, dm, store = setup
    found = record_fidelity(module.unet, "model", module.task, dm, np.asarray(TRAIN), store, batch_size=4)
    record = Store.open(store.root).manifest["entries"][Entry.influence("model")]
    assert record["fidelity"] == found.to_dict() and found.train == len(TRAIN)
    assert record_fidelity(module.unet, "model", module.task, dm, np.asarray(TRAIN), store, batch_size=4) == found
