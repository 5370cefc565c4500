"""LDS: hand-computed values (with ties), the torchmetrics Metric, the bootstrap,
reproducible subset files, and the subsets -> train -> measure -> score pipeline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import TINY_UNET
from wherefrom.checkpoint import load_datamodule, load_module
from wherefrom.cli import main as cli_main
from wherefrom.datamodules import DigitsDataModule
from wherefrom.errors import FingerprintMismatchError, WherefromError
from wherefrom.evaluation import lds, stats
from wherefrom.evaluation.benchmark import Benchmark, checkpoint
from wherefrom.io import fingerprint
from wherefrom.task import DiffusionTask, Stream

# N = 4 training images, M = 4 subsets, Q = 3 queries.
MASKS = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]], dtype=bool)
SCORES = np.array([[3.0, 1.0, 2.0, 0.0], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
# targets are M x Q
TARGETS = np.array([[10.0, 1.0, 5.0], [20.0, 2.0, 6.0], [5.0, 3.0, 7.0], [5.0, 4.0, 8.0]])


def test_lds_equals_hand_computed_values_with_ties():
    # q0: predicted sums (4, 3, 2, 3) -> ranks (4, 2.5, 1, 2.5); targets (10, 20, 5, 5) -> (3, 4, 1.5, 1.5).
    #     centred: (1.5, 0, -1.5, 0) . (0.5, 1.5, -1, -1) = 2.25; both squared norms 4.5 -> rho = 0.5
    # q1: predicted (0, 1, 2, 1) -> ranks (1, 2.5, 4, 2.5); targets ranks (1, 2, 3, 4)
    #     centred: (-1.5, 0, 1.5, 0) . (-1.5, -0.5, 0.5, 1.5) = 3; norms^2 4.5 and 5 -> rho = 3 / sqrt(22.5)
    # q2: every subset predicts 2 (no ranking) -> 0 by definition
    per_query = lds.lds_per_query(SCORES, MASKS, TARGETS)
    np.testing.assert_allclose(per_query, [0.5, 3 / math.sqrt(22.5), 0.0], atol=1e-12)
    result = lds.lds(SCORES, MASKS, TARGETS)
    assert result.mean == pytest.approx((0.5 + 3 / math.sqrt(22.5)) / 3, abs=1e-12)
    assert result.ci_low <= result.mean <= result.ci_high


def test_lds_invariances():
    rng = np.random.default_rng(0)
    scores, targets = rng.normal(size=(5, 12)), rng.normal(size=(9, 5))
    masks = rng.random((9, 12)) < 0.5
    base = lds.lds_per_query(scores, masks, targets)
    # Spearman: invariant to positive scaling of scores and monotone maps of targets; odd in the target's sign
    np.testing.assert_allclose(lds.lds_per_query(3.0 * scores, masks, np.exp(targets)), base, atol=1e-12)
    np.testing.assert_allclose(lds.lds_per_query(scores, masks, -targets), -base, atol=1e-12)
    # adding the same constant to every score of a query shifts all equal-size subset sums equally
    equal = np.zeros((9, 12), dtype=bool)
    equal[:, :6] = True
    for row in equal:
        rng.shuffle(row)
    np.testing.assert_allclose(lds.lds_per_query(scores + 7.0, equal, targets), lds.lds_per_query(scores, equal, targets), atol=1e-12)
    # a linear datamodel is predicted perfectly: targets = sum_{i in S_j} tau(q)_i
    np.testing.assert_allclose(lds.lds_per_query(scores, masks, masks @ scores.T), 1.0, atol=1e-12)
    with pytest.raises(WherefromError, match="measurements"):
        lds.lds_per_query(scores, masks, targets.T)


def test_metric_accumulates_batches_like_the_function():
    metric = lds.LinearDatamodelingScore(MASKS)
    metric.update(torch.tensor(SCORES[:2]), torch.tensor(TARGETS[:, :2]))
    metric.update(torch.tensor(SCORES[2:]), torch.tensor(TARGETS[:, 2:]))
    assert float(metric.compute()) == pytest.approx(lds.lds(SCORES, MASKS, TARGETS).mean, abs=1e-12)


def test_bootstrap_interval():
    values = np.array([0.1, 0.5, 0.3, 0.9, 0.2, 0.4])
    cfg = stats.BootstrapConfig(resamples=500, level=0.9, seed=3)
    lo, hi = stats.bootstrap_ci(values, cfg)
    assert lo < values.mean() < hi and values.min() <= lo and hi <= values.max()
    assert stats.bootstrap_ci(values, cfg) == (lo, hi)  # seeded
    assert stats.bootstrap_ci(np.full(4, 0.25), cfg) == (0.25, 0.25)
    assert all(math.isnan(v) for v in stats.bootstrap_ci(np.array([0.3]), cfg))


def test_subsets_are_reproducible_from_the_seed():
    split = np.arange(10, 60)
    a = lds.make_subsets(split, 6, 0.3, seed=4)
    assert a.shape == (6, 15) and np.isin(a, split).all()
    assert all(len(np.unique(row)) == 15 and np.all(np.diff(row) > 0) for row in a)
    np.testing.assert_array_equal(a, lds.make_subsets(split, 6, 0.3, seed=4))
    np.testing.assert_array_equal(a[:3], lds.make_subsets(split, 3, 0.3, seed=4))  # subset j depends on (seed, j) only
    assert not np.array_equal(a, lds.make_subsets(split, 6, 0.3, seed=5))
    with pytest.raises(WherefromError, match="alpha"):
        lds.make_subsets(split, 6, 0.001, seed=4)


def _plain(unet: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in unet.items()}


@pytest.fixture
def bench_config(tmp_path):
    fit = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "logger": False, "enable_model_summary": False,
                    "enable_progress_bar": False},
        "model": {"class_path": "wherefrom.DiffusionModel", "init_args": {"unet": _plain(TINY_UNET), "lr": 1e-3}},
        "data": {"class_path": "wherefrom.DigitsDataModule", "init_args": {"batch_size": 8, "subset": list(range(20, 44))}},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(fit))
    bench = {
        "out": str(tmp_path / "bench"), "fit": "fit.yaml",
        "subsets": {"num": 3, "alpha": 0.5, "seed": 1},
        "measure": {"draws": 3, "seed": 2},
        "bootstrap": {"resamples": 50},
    }
    path = tmp_path / "lds.yaml"
    path.write_text(yaml.safe_dump(bench))
    return path


def test_subset_files_reproducible_and_guarded(bench_config, tmp_path):
    bench = Benchmark.from_file(bench_config)
    cli_main(["lds", "subsets", "--config", str(bench_config)])
    folder = tmp_path / "bench" / "subsets"
    first = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    assert sorted(first) == ["subset_000.npy", "subset_001.npy", "subset_002.npy", "subsets.json"]
    cli_main(["lds", "subsets", "--config", str(bench_config)])
    assert {p.name: p.read_bytes() for p in sorted(folder.iterdir())} == first
    subsets, n = lds.read_subsets(bench)
    assert n == 1797 and subsets.shape == (3, 12) and np.isin(subsets, np.arange(20, 44)).all()
    bench.subsets.seed = 2  # same folder, another draw: refused
    with pytest.raises(FingerprintMismatchError, match="another benchmark"):
        lds.write_subsets(bench)


def test_pipeline_train_measure_score(bench_config, tmp_path, capsys):
    bench = Benchmark.from_file(bench_config)
    cli_main(["lds", "train", "--config", str(bench_config), "--subset-id", "1"])
    assert [lds.model_dir(bench, j, 0).joinpath("done.json").is_file() for j in range(3)] == [False, True, False]
    cli_main(["lds", "train", "--config", str(bench_config)])
    subsets, n = lds.read_subsets(bench)
    for j in range(3):  # each model trained on exactly its subset, through the normal fit path
        dm = load_datamodule(checkpoint(lds.model_dir(bench, j, 0)))
        assert dm.fingerprint == fingerprint(n, (1, 8, 8), subsets[j])

    queries = torch.linspace(-1, 1, 4 * 64).reshape(4, 1, 8, 8)
    np.save(tmp_path / "queries.npy", queries.numpy())
    with pytest.raises(SystemExit):  # scoring before measuring: a clear error
        cli_main(["lds", "score", "--config", str(bench_config), "--scores", str(tmp_path / "none.npy")])
    cli_main(["lds", "measure", "--config", str(bench_config), "--queries", str(tmp_path / "queries.npy")])
    values = np.load(tmp_path / "bench" / "measurements.npy")
    assert values.shape == (3, 1, 4)
    # ground truth = the loss over draws seeded by (measure seed, query id), the same for every model
    model = load_module(checkpoint(lds.model_dir(bench, 2, 0)))
    task = DiffusionTask(**{**model.task.config, "seed": 2})
    with torch.no_grad():
        manual = torch.stack([task.measure(model.unet, queries, torch.arange(4), "loss", [(d, None)], Stream.MEASURE) for d in range(3)]).mean(0)
    np.testing.assert_allclose(values[2, 0], manual.double().numpy(), rtol=1e-5)

    # the CLI's score equals the function on the written files
    scores = np.random.default_rng(0).normal(size=(4, n)).astype(np.float32)
    (tmp_path / "m").mkdir()
    np.save(tmp_path / "m" / "scores.npy", scores)
    (tmp_path / "m" / "topk.json").write_text(json.dumps({"method": "mine"}))
    cli_main(["lds", "score", "--config", str(bench_config), "--scores", str(tmp_path / "m" / "scores.npy")])
    out = json.loads((tmp_path / "bench" / "lds.json").read_text())
    expected = lds.lds(scores, lds.subset_masks(subsets, n), -values[:, 0], bench.bootstrap)
    assert out["mine"]["mean"] == pytest.approx(expected.mean) and len(out["mine"]["per_query"]) == 4
    assert "mine" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # wrong number of queries
        np.save(tmp_path / "m" / "scores.npy", scores[:3])
        cli_main(["lds", "score", "--config", str(bench_config), "--scores", str(tmp_path / "m" / "scores.npy")])


def test_parallel_workers_train_every_model_and_the_noise_ceiling_seed(bench_config, tmp_path):
    """`lds train --workers 2`: the attributed model, every subset and the ceiling seed of the first
    subsets, each exactly as a sequential in-process run trains it (same weights, one thread each)."""
    cfg = yaml.safe_load(bench_config.read_text())
    cfg["noise_ceiling"] = {"seed": 7, "num": 2}
    bench_config.write_text(yaml.safe_dump(cfg))
    bench = Benchmark.from_file(bench_config)
    assert [lds.subset_seeds(bench, j) for j in range(3)] == [[0, 7], [0, 7], [0]]
    cli_main(["lds", "train", "--config", str(bench_config), "--workers", "2"])
    trained = sorted(str(p.parent.relative_to(bench.out / "models")) for p in (bench.out / "models").rglob("done.json"))
    assert trained == ["full/seed_0", "subset_000/seed_0", "subset_000/seed_7", "subset_001/seed_0", "subset_001/seed_7", "subset_002/seed_0"]
    sequential = Benchmark.from_file(bench_config, out=tmp_path / "sequential")
    lds.train_subsets(sequential, [1])
    for seed in (0, 7):
        a, b = (load_module(checkpoint(lds.model_dir(x, 1, seed))).state_dict() for x in (bench, sequential))
        assert all(torch.equal(a[k], b[k]) for k in a), seed
    for bad, match in (({"seed": 0, "num": 2}, "is one of model_seeds"), ({"num": 9}, "exceeds subsets.num"), ({"num": 1}, ">= 2 subsets")):
        with pytest.raises(WherefromError, match=match):
            Benchmark.from_dict({**cfg, "noise_ceiling": bad}, base=bench_config.parent)
    with pytest.raises(WherefromError, match="not all 0"):
        Benchmark.from_dict({**cfg, "queries": {"real": 0, "generated": 0, "tuning_real": 0, "tuning_generated": 0}}, base=bench_config.parent)


def _split(dm: DigitsDataModule) -> np.ndarray:
    dm.setup()
    return dm.indices


def test_pool_draws_a_random_training_set_and_keeps_the_rest_held_out():
    dm = DigitsDataModule(pool_size=50, pool_seed=3)
    dm.setup()
    assert len(dm.indices) == 50 and len(dm.held_out) == 1797 - 50 and not np.intersect1d(dm.indices, dm.held_out).size
    np.testing.assert_array_equal(dm.indices, _split(DigitsDataModule(pool_size=50, pool_seed=3)))
    assert not np.array_equal(dm.indices, _split(DigitsDataModule(pool_size=50, pool_seed=4)))
    inside = DigitsDataModule(pool_size=50, pool_seed=3, subset=dm.indices[:7].tolist())
    inside.setup()
    np.testing.assert_array_equal(inside.indices, dm.indices[:7])
    with pytest.raises(WherefromError, match="outside the pool_size draw"):
        DigitsDataModule(pool_size=50, pool_seed=3, subset=[int(dm.held_out[0])]).setup()
    with pytest.raises(WherefromError, match="pool_size must be in"):
        DigitsDataModule(pool_size=5000).setup()


def test_calibration_equals_a_hand_computed_regression():
    """Slope and R^2 of measured vs predicted subset losses (each centred per query), against explicit
    loops and numpy's own least squares; losses built from the scores recover their scale exactly."""
    rng = np.random.default_rng(0)
    scores, masks = rng.normal(size=(3, 7)), rng.random((5, 7)) < 0.5
    losses = rng.normal(size=(5, 3))
    pred, meas = [], []
    for q in range(3):
        p = [-0.1 * sum(scores[q, i] for i in range(7) if masks[j, i]) for j in range(5)]
        pred += [v - np.mean(p) for v in p]
        meas += [losses[j, q] - losses[:, q].mean() for j in range(5)]
    got = lds.calibration(scores, masks, losses, 0.1)
    assert got.slope == pytest.approx(np.polyfit(pred, meas, 1)[0], rel=1e-12) and got.r2 == pytest.approx(np.corrcoef(pred, meas)[0, 1] ** 2, rel=1e-12)
    exact = 2.0 * (-0.1 * scores @ masks.T).T + rng.normal(size=3)  # twice the predicted change, plus per-query offsets
    calibrated = lds.calibration(scores, masks, exact, 0.1)
    assert (calibrated.slope, calibrated.r2) == pytest.approx((2.0, 1.0), rel=1e-12)
