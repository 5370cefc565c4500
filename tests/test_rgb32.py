"""32 x 32 RGB models end to end: the exact references of the 8 x 8 tests on a CIFAR-shaped UNet
(tiny), and ``configs/cifar32.yaml`` trained, sampled and attributed by every method from the CLI
on generated RGB data (colourised, upsampled digits in an ``.npy``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from tests.helpers import (
    TINY_UNET_RGB32,
    attribute_every_method,
    check_jvp_columns,
    check_projected_grads,
    check_unet_factors,
    cli,
    unet_sampler,
)
from wherefrom.attribution.api import ATTRIBUTORS
from wherefrom.datamodules import ArrayDataModule
from wherefrom.model import DiffusionModel, build_unet
from wherefrom.task import DiffusionTask, Stream

N = 40
SHAPE = (3, 32, 32)


def rgb_digits(n: int = N) -> np.ndarray:
    """``n`` digits upsampled 4x to 32 x 32, each in its own colour on a dark background (uint8, N x 3 x 32 x 32)."""
    digits = load_digits().images[:n] / 16.0
    big = digits.repeat(4, 1).repeat(4, 2)[:, None]  # N x 1 x 32 x 32 in [0, 1]
    colours = np.random.default_rng(0).uniform(0.3, 1.0, (n, 3, 1, 1))
    return np.round(255 * (0.1 + 0.9 * big * colours)).astype(np.uint8)


def rgb_batch(n: int = 3, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.from_numpy(rgb_digits(n)).to(dtype) / 127.5 - 1


# --- the exact references, on 3 x 32 x 32 --------------------------------------------------------------


@pytest.mark.parametrize("projection", ["dense", "structured"])
def test_rgb32_projected_grads_equal_autograd_loop_and_explicit_matrix(projection):
    model = DiffusionModel(unet=dict(TINY_UNET_RGB32), seed=3).double().eval()
    check_projected_grads(model, rgb_batch(), torch.tensor([4, 0, 17]), projection, "square_norm")


def test_rgb32_factors_equal_explicit_per_position_computation(float64):
    unet = build_unet(TINY_UNET_RGB32, 0).double()
    task = DiffusionTask()
    x0 = rgb_batch(2)
    t, eps = task.draw(torch.arange(2), 0, x0.shape[1:], stream=Stream.FACTORS, dtype=x0.dtype)
    layers = {"down_blocks.2.attentions.0.to_q", "down_blocks.1.downsamplers.0.conv", "conv_in"}
    check_unet_factors(unet, task.add_noise(x0, t, eps), t, eps, "expand", layers)


def test_rgb32_synthetic_ablation_jacobian_equals_finite_differences():
    check_jvp_columns(unet_sampler(steps=3, unet=TINY_UNET_RGB32))


# --- configs/cifar32.yaml from the CLI ------------------------------------------------------------------


def _unet_flag() -> str:
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in TINY_UNET_RGB32.items()})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The config's single model and an encoded ensemble of it, trained briefly on the generated RGB digits."""
    root = tmp_path_factory.mktemp("rgb32")
    np.save(root / "images.npy", rgb_digits())
    common = ["--config", "configs/cifar32.yaml", "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
              "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
              "--data", "wherefrom.ArrayDataModule", "--data.path", str(root / "images.npy"), "--data.batch_size", "8",
              "--data.num_workers", "0", "--data.pool_size", "32", "--model.unet", _unet_flag()]  # fmt: skip
    ckpts = {}
    for name, extra in [("single", []), ("ensemble", ["--model", "wherefrom.EncodedEnsemble", "--model.n", "7", "--model.w", "3"])]:
        out = root / name
        code = cli_run(*common, *extra, "--trainer.default_root_dir", str(out), "--trainer.callbacks.init_args.dirpath", str(out))
        assert code == 0
        ckpts[name] = out / "last.ckpt"
    return root, ckpts


def cli_run(*args: str) -> int:
    from wherefrom.cli import main

    try:
        main(["fit", *args])
    except SystemExit as e:
        return int(e.code)
    return 0


def test_cifar32_config_is_the_ddpm_cifar10_unet():
    import yaml

    cfg = yaml.safe_load(open("configs/cifar32.yaml"))["model"]["init_args"]["unet"]
    unet = build_unet(cfg, 0)
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307 and unet(torch.zeros(1, *SHAPE), torch.tensor([0])).sample.shape == (1, *SHAPE)


def test_rgb32_trained_sampled_and_attributed_by_every_method(runs, tmp_path, capsys):
    root, ckpts = runs
    single, ensemble = str(ckpts["single"]), str(ckpts["ensemble"])
    code, err = cli(capsys, "sample", "--ckpt", single, "--num-samples", "3", "--steps", "4", "--out", str(tmp_path / "samples"))
    assert code == 0, err
    samples = np.load(tmp_path / "samples" / "samples.npy")
    assert samples.shape == (3, *SHAPE) and np.isfinite(samples).all()
    queries = ["--queries", str(tmp_path / "samples" / "samples.npy"), "--top-k", "3"]
    scores = attribute_every_method(capsys, single, tmp_path, queries, ensemble, ["--num-samples", "2", "--steps", "3"])
    assert set(scores) == set(ATTRIBUTORS)
    data = ArrayDataModule(str(root / "images.npy"), pool_size=32)
    data.setup()
    for method, s in scores.items():
        top = json.loads((tmp_path / f"scores_{method}" / "topk.json").read_text())
        assert s.shape[1] == N and all(set(row["indices"]) <= set(data.indices.tolist()) for row in top["queries"]), method  # only the pool of 32
        assert method == "random" or (s != 0).any(0).sum() == 32, method
    assert np.load(tmp_path / "scores_ablation" / "counterfactuals.npy").shape == (2, 2, *SHAPE)
