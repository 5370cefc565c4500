"""Retraining without the top-k: exactly those indices are excluded (by fingerprint),
the same seed reproduces the original, and queries are regenerated from the same noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import TINY_UNET
from wherefrom.checkpoint import load_datamodule, load_module
from wherefrom.cli import main as cli_main
from wherefrom.evaluation import counterfactual
from wherefrom.evaluation.benchmark import Benchmark, train
from wherefrom.evaluation.distances import l2_distance
from wherefrom.io import fingerprint

SPLIT = np.arange(10, 34)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cf")
    unet = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_UNET.items()}
    fit = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "logger": False, "enable_model_summary": False,
                    "enable_progress_bar": False},
        "model": {"class_path": "wherefrom.DiffusionModel", "init_args": {"unet": unet, "lr": 2e-3}},
        "data": {"class_path": "wherefrom.DigitsDataModule", "init_args": {"batch_size": 8, "subset": SPLIT.tolist()}},
    }
    cfg = {
        "out": str(root / "bench"), "fit": fit,
        "measure": {"draws": 2}, "sampling": {"seed": 3, "steps": 5, "scheduler": "ddim"},
        "counterfactual": {"top_k": 3, "seed": 1, "distances": ["l2"]},
    }
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    bench = Benchmark.from_file(path)
    ckpt = train(bench, root / "original", seed=0)
    return path, bench, ckpt


def test_retraining_excludes_exactly_the_top_k(setup, tmp_path):
    path, bench, ckpt = setup
    n = 1797
    scores = np.zeros((2, n), dtype=np.float32)
    scores[1, 0] = 100.0  # outside the training split: never "removed"
    scores[1, [12, 30, 21, 15]] = [5.0, 4.0, 3.0, 2.0]
    np.save(tmp_path / "scores.npy", scores)
    cli_main(["counterfactual", "--config", str(path), "--ckpt", str(ckpt), "--scores", str(tmp_path / "scores.npy"), "--queries", "1"])

    result = json.loads((bench.out / "counterfactual" / tmp_path.name / "results.json").read_text())
    row = result["queries"][0]
    assert row["query"] == 1 and row["removed_top"] == [12, 21, 30]
    random_set = np.array(row["removed_random"])
    assert len(random_set) == 3 and np.isin(random_set, SPLIT).all()
    np.testing.assert_array_equal(random_set, counterfactual.removal_sets(scores[1], SPLIT, 3, 1, 1)["random"])
    assert (bench.out / "counterfactual" / tmp_path.name / "counterfactual.png").is_file()

    original = load_module(ckpt)
    x = counterfactual.regenerate(original, 1, bench)
    # the query is regenerated from the same noise it was first generated with
    torch.testing.assert_close(x, original.generate(2, seed=3, steps=5, scheduler="ddim")[1:2])
    for kind in ("top", "random"):
        removed = np.array(row[f"removed_{kind}"])
        model_ckpt = counterfactual.retrain_without(bench, SPLIT, removed, seed=0)  # already trained: reused
        assert load_datamodule(model_ckpt).fingerprint == fingerprint(n, (1, 8, 8), np.setdiff1d(SPLIT, removed))
        x_cf = counterfactual.regenerate(load_module(model_ckpt), 1, bench)
        assert row[f"l2_{kind}"] == pytest.approx(float(l2_distance(x, x_cf)[0]), rel=1e-5)
        assert row[f"l2_{kind}"] > 0
    assert set(result["mean"]) == {"l2_top", "l2_random", "dloss_top", "dloss_random"}


def test_same_seed_and_nothing_removed_reproduces_the_original(setup):
    _, bench, ckpt = setup
    again = counterfactual.retrain_without(bench, SPLIT, np.array([], dtype=np.int64), seed=0)
    a, b = load_module(ckpt), load_module(again)
    assert load_datamodule(again).fingerprint == load_datamodule(ckpt).fingerprint
    torch.testing.assert_close(counterfactual.regenerate(a, 0, bench), counterfactual.regenerate(b, 0, bench))


def test_too_many_removed_is_a_clear_error(setup, tmp_path):
    path, _, ckpt = setup
    np.save(tmp_path / "scores.npy", np.zeros((1, 1797), dtype=np.float32))
    with pytest.raises(SystemExit):
        cli_main(["counterfactual", "--config", str(path), "--ckpt", str(ckpt), "--scores", str(tmp_path / "scores.npy"), "--top-k", "24"])
