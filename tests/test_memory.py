"""Memory budgets (issue 34): every pass gives the same results however its (example, draw) pairs
are chunked (float64, the smallest budget against the default), and the budget helpers."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tests.helpers import TINY_UNET, unet_sampler
from wherefrom import memory
from wherefrom.attribution.influence import influence_scores
from wherefrom.datamodules import DigitsDataModule
from wherefrom.ensemble.synthetic import exact_ablation, linearize
from wherefrom.errors import WherefromError
from wherefrom.features import FeatureConfig, Projection, per_sample_grads
from wherefrom.kfac import FactorCollector, FactorConfig, factor_pass, fit_factors
from wherefrom.kfac.stored import InfluenceConfig, featurize_influence
from wherefrom.model import DiffusionModel
from wherefrom.store import Store
from wherefrom.task import Stream, chunk_rows

TRAIN = list(range(5))


@pytest.fixture(scope="module")
def model() -> DiffusionModel:
    return DiffusionModel(unet=dict(TINY_UNET, block_out_channels=(2, 4), norm_num_groups=1, attention_head_dim=2), seed=3).double().eval()


def both(run):
    """``run()`` at the default budget and at one byte (one (example, draw) pair, one gradient row per chunk)."""
    with memory.budget_limit(None):
        whole = run()
    with memory.budget_limit(1):
        chunked = run()
    return whole, chunked


def close(a, b) -> None:
    a, b = (torch.as_tensor(np.asarray(z)) if not isinstance(z, torch.Tensor) else z for z in (a, b))
    assert a.abs().max() > 0
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12 * float(a.abs().max()))


@pytest.mark.parametrize("output", ["loss", "square_norm"])
def test_per_sample_and_projected_gradients_do_not_depend_on_the_chunking(model, output):
    index = torch.tensor([3, 0, 7])
    x0 = DigitsDataModule().images[index].double()
    draws = FeatureConfig(output=output, timesteps=3, strategy="random").draws(model.task)
    close(*both(lambda: per_sample_grads(model.unet, model.task, x0, index, output, draws)))
    for kind in ("structured", "dense"):
        projection = Projection(FeatureConfig(output=output, timesteps=3, proj_dim=64, projection=kind), model.unet, "model")
        close(*both(lambda projection=projection: projection.projected_grads(model.task, x0, index, output, draws)))


def test_measurements_do_not_depend_on_the_chunking(model):
    index = torch.arange(4)
    x0 = DigitsDataModule().images[:4].double()
    draws = [(d, None) for d in range(3)]
    with torch.no_grad():
        close(*both(lambda: model.task.measure(model.unet, x0, index, "loss", draws, stream=Stream.MEASURE)))


def test_factor_passes_do_not_depend_on_the_chunking(model):
    dm = DigitsDataModule(subset=TRAIN)
    dm.setup()
    batch = {"image": dm.images[TRAIN].double(), "index": torch.tensor(TRAIN)}

    def sums():
        collector = FactorCollector(model.unet)
        with collector.attached():
            factor_pass(model.unet, model.task, [batch], collector, "mc", draw=0)
        return collector.state_dict()

    whole, chunked = both(sums)
    assert whole.keys() == chunked.keys()
    for key in whole:
        close(whole[key], chunked[key])


def test_exact_and_stored_influence_do_not_depend_on_the_chunking(model, tmp_path):
    """Queries in blocks (each passing over the training split), training gradients one at a time,
    stored rows one (example, draw) pair at a time: the same scores from the same factors (factors are
    compared as sums above: their eigenbases are not unique on so few images)."""
    dm = DigitsDataModule(subset=TRAIN)
    dm.setup()
    queries = DigitsDataModule().images[100:103].double()
    config = FeatureConfig(output="loss", timesteps=3, strategy="random")
    fit_factors(model.unet, "model", model.task, dm, np.asarray(TRAIN), Store(tmp_path / "whole", dm.fingerprint), FactorConfig(passes=1, ekfac=True), batch_size=4)
    shutil.copytree(tmp_path / "whole", tmp_path / "chunked")
    stores = {}
    for name, limit in (("whole", None), ("chunked", 1)):
        stores[name] = store = Store(tmp_path / name, dm.fingerprint)
        with memory.budget_limit(limit):
            influence = InfluenceConfig(dim=4096, timesteps=3, strategy="random", dtype="float64")
            featurize_influence(model.unet, "model", model.task, dm, np.asarray(TRAIN), store, influence, batch_size=4)
    for grads in ("exact", "stored"):
        run = lambda store: influence_scores(model, dm, queries, store, "loss", ekfac=True, grads=grads, config=config, batch_size=4)  # noqa: E731
        with memory.budget_limit(None):
            whole = run(stores["whole"])
        with memory.budget_limit(1):
            chunked = run(stores["chunked"])
        close(whole, chunked)


def test_jacobians_and_exact_ablations_do_not_depend_on_the_chunking():
    sampler = unet_sampler(n=3, steps=3)
    whole, chunked = both(lambda: linearize(sampler, [0, 1, 2]))
    close(whole.jacobian, chunked.jacobian)
    close(whole.x0, chunked.x0)
    close(*both(lambda: exact_ablation(sampler, [0, 1, 2], [10, 11, 12])))


def test_pair_chunks_cover_every_pair_once_within_the_limits():
    for examples, draws, pairs, most in [(5, 3, 7, None), (5, 3, 2, None), (4, 10, 100, 3), (1, 1, 1, 1), (3, 4, 4, 1)]:
        seen = []
        for e, d in memory.pair_chunks(examples, draws, pairs, most):
            n_e, n_d = e.stop - e.start, d.stop - d.start
            assert n_e * n_d <= max(pairs, 1) and (most is None or n_e <= most)
            seen += [(i, j) for i in range(e.start, e.stop) for j in range(d.start, d.stop)]
        assert sorted(seen) == [(i, j) for i in range(examples) for j in range(draws)]


def test_budget_sizes_parse_and_bad_ones_are_refused():
    assert memory.parse_bytes("4GiB") == 4 * 2**30
    assert memory.parse_bytes("512MB") == 512 * 10**6
    assert memory.parse_bytes("2e9") == 2 * 10**9
    assert memory.parse_bytes(1024) == 1024
    for bad in ("lots", "-1GB", "0", "4 parsecs"):
        with pytest.raises(WherefromError, match="memory budget"):
            memory.parse_bytes(bad)
    with memory.budget_limit("1MiB"):
        assert memory.budget() == 2**20
    assert memory.budget() == memory.DEFAULT_CPU_BUDGET


def test_rows_per_chunk_are_measured_alike_under_no_grad_and_inference_mode(model):
    """The probe builds its own graph, so a pass under ``no_grad`` or ``inference_mode`` is chunked as one with autograd."""
    x, t = DigitsDataModule().images[:2].double(), torch.zeros(2, dtype=torch.long)
    with memory.budget_limit("64MiB"):
        rows = []
        for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
            memory._row_bytes.clear()
            with mode():
                rows.append(chunk_rows(model.unet, x, model.task.model_time(t)))
    assert rows[0] == rows[1] == rows[2] and 1 < rows[0] < 10**6
