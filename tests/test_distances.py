"""Distances: exact L2, LPIPS through the real ``lpips`` loading path with a locally
placed (randomly initialised) AlexNet file, and the clear error without it."""

from __future__ import annotations

import lpips
import pytest
import torch
import torch.nn.functional as F

from wherefrom.errors import WherefromError
from wherefrom.evaluation.distances import ALEXNET_FILE, DistanceKind, ImageDistance, LPIPSDistance, alexnet_weights_path, l2_distance


def test_l2_is_the_euclidean_norm_over_pixels():
    a = torch.zeros(2, 1, 2, 2)
    b = torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]).reshape(2, 1, 2, 2)
    torch.testing.assert_close(l2_distance(a, b), torch.tensor([5.0, 2.0]))
    with pytest.raises(WherefromError, match="equal shape"):
        l2_distance(a, b[:1])


def test_lpips_loads_the_hub_file_and_compares_images(alexnet_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(alexnet_home))
    assert alexnet_weights_path() == alexnet_home / "hub" / "checkpoints" / ALEXNET_FILE
    dist = LPIPSDistance()
    # the backbone holds the file's weights: the real torchvision/lpips loading path was used
    state = torch.load(alexnet_weights_path())
    torch.testing.assert_close(dist.net.net.slice1[0].weight, state["features.0.weight"].float())
    torch.testing.assert_close(dist.net.net.slice5[0].weight, state["features.10.weight"].float())

    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1, torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    d = dist(a, b)
    assert d.shape == (3,) and (d > 0).all()
    torch.testing.assert_close(dist(a, a), torch.zeros(3))
    torch.testing.assert_close(dist(b, a), d)
    # equals lpips itself on the 3-channel, 64 x 64 bilinear upsampling of the digits
    reference = lpips.LPIPS(net="alex", verbose=False)

    def up(x):
        return F.interpolate(x.expand(-1, 3, -1, -1), size=(64, 64), mode="bilinear", align_corners=False)

    with torch.no_grad():
        torch.testing.assert_close(d, reference(up(a), up(b)).flatten())

    metric = ImageDistance("lpips")
    metric.update(a[:2], b[:2])
    metric.update(a[2:], b[2:])
    assert float(metric.compute()) == pytest.approx(float(d.mean()), rel=1e-5)


def test_lpips_without_the_file_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WherefromError, match=ALEXNET_FILE) as err:
        LPIPSDistance()
    assert str(tmp_path) in str(err.value)


def test_l2_metric_and_unknown_kind():
    metric = ImageDistance("l2")
    metric.update(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 1.0))  # distance 2
    metric.update(torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.5))  # distance 1 each
    assert float(metric.compute()) == pytest.approx(4 / 3)
    assert ImageDistance().kind is DistanceKind.L2
    with pytest.raises(WherefromError, match="unknown distance"):
        ImageDistance("ssim")
