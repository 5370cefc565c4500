"""Shared test fixtures: a tiny UNet (a few thousand parameters) and small real data."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import TINY_UNET

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


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


