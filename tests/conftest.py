"""Shared test fixtures: a tiny UNet (a few thousand parameters) and small real data."""

from __future__ import annotations

import os

import pytest
import torch

from wherefrom.cli import main as cli_main

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# ~12k parameters, with attention at 4x4.
TINY_UNET = dict(
    sample_size=8,
    in_channels=1,
    block_out_channels=(4, 8),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=2,
    attention_head_dim=4,
)

# ~15k parameters on 3 x 32 x 32: 32 -> 16 -> 8, attention at 8x8 (the shape of a CIFAR-size UNet, tiny).
TINY_UNET_RGB32 = dict(
    sample_size=32,
    in_channels=3,
    block_out_channels=(4, 8, 8),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=2,
    attention_head_dim=4,
)


@pytest.fixture(scope="module")
def alexnet_home(tmp_path_factory):
    """A torch hub cache holding a randomly initialised AlexNet (float16 halves the file; loading casts)."""
    import torchvision

    from wherefrom.evaluation.distances import ALEXNET_FILE

    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    state = {k: v.half() for k, v in torchvision.models.alexnet(weights=None).state_dict().items()}
    torch.save(state, home / "hub" / "checkpoints" / ALEXNET_FILE)
    return home


@pytest.fixture
def float64():
    """float64 as the default dtype for the test."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def tiny_unet() -> dict:
    return dict(TINY_UNET)


def attribute_every_method(capsys, ckpt, root, queries: list[str], ensemble=None, ensemble_queries: list[str] = ()) -> dict:
    """Every registered method from the CLI on one kind of model: `featurize` (trak and dtrak stores) and
    `factors` (EK-FAC) of ``ckpt``, `attribute` of its ``queries`` (flags) by the store, factor and baseline
    methods, and of the encoded ``ensemble``'s own samples (``ensemble_queries`` flags) by the ensemble
    methods. Returns each method's scores, all finite."""
    import numpy as np

    from wherefrom.attribution.api import ATTRIBUTORS
    from wherefrom.attribution.protocol import Needs

    small = ["--timesteps", "2", "--proj-dim", "64", "--batch-size", "8"]
    for method in ("trak", "dtrak"):
        code, err = cli(capsys, "featurize", "--ckpt", str(ckpt), "--method", method, "--store", str(root / f"store_{method}"), *small)
        assert code == 0, err
    code, err = cli(capsys, "factors", "--ckpt", str(ckpt), "--store", str(root / "store_trak"), "--ekfac", "--passes", "1", "--batch-size", "8")
    assert code == 0, err
    options = {
        "trak": ["--store", str(root / "store_trak")], "dtrak": ["--store", str(root / "store_dtrak")],
        "kfac": ["--store", str(root / "store_trak"), "--timesteps", "2"], "ekfac": ["--store", str(root / "store_trak"), "--timesteps", "2"],
        "ablation": ["--exact", "--top-k", "2"], "ablation-loss": ["--timesteps", "2"],
    }  # fmt: skip
    scores = {}
    for method, cls in ATTRIBUTORS.items():
        if cls.needs is Needs.ENSEMBLE and ensemble is None:
            continue
        run = [str(ensemble), *ensemble_queries] if cls.needs is Needs.ENSEMBLE else [str(ckpt), *queries]
        out = root / f"scores_{method}"
        code, err = cli(capsys, "attribute", "--method", method, "--ckpt", *run, *options.get(method, []), "--out", str(out))
        assert code == 0, f"{method}: {err}"
        scores[method] = np.load(out / "scores.npy")
        assert np.isfinite(scores[method]).all() and (out / "topk.png").is_file(), method
    return scores


def cli(capsys, *args: str) -> tuple[int, str]:
    """Run ``wherefrom ARGS`` in-process; returns (exit status, captured stderr)."""
    try:
        cli_main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err
