"""Distances between generated images: pixel L2 and LPIPS (Zhang et al. 2018).

LPIPS comes from the ``lpips`` package with its AlexNet backbone, whose ImageNet
weights torchvision reads from the torch hub cache
(``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``). Nothing is ever
downloaded: with the file absent, :class:`LPIPSDistance` raises a
:class:`~wherefrom.errors.WherefromError` naming it.

:class:`ImageDistance` is the torchmetrics interface (mean distance over all
updated pairs, reduced as a sum plus a count under DDP).
"""

from __future__ import annotations

import enum
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from wherefrom.errors import WherefromError

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
# AlexNet's first conv (11x11, stride 4) and three 3x3/2 max-pools need >= ~64 px.
LPIPS_MIN_SIZE = 64


class DistanceKind(str, enum.Enum):
    L2 = "l2"
    LPIPS = "lpips"


def alexnet_weights_path() -> Path:
    """Where torchvision looks for AlexNet's ImageNet weights (the torch hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise WherefromError(f"distances compare two N x C x H x W batches of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def l2_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-pair Euclidean distance over all pixels (images in [-1, 1]), shape (N,)."""
    _check_pair(a, b)
    return (a.double() - b.double()).flatten(1).norm(dim=1).to(a.dtype)


class LPIPSDistance(nn.Module):
    """LPIPS v0.1 with the AlexNet backbone, for images in [-1, 1].

    Grey images are repeated to three channels; images smaller than
    ``min_size`` are upsampled (bilinear) so that AlexNet's feature maps exist.
    """

    def __init__(self, min_size: int = LPIPS_MIN_SIZE) -> None:
        super().__init__()
        path = alexnet_weights_path()
        if not path.is_file():
            raise WherefromError(
                f"LPIPS needs AlexNet's ImageNet weights at {path} (no download here); copy {ALEXNET_FILE} there "
                "(or set TORCH_HOME to a folder with hub/checkpoints/" + ALEXNET_FILE + "), or use the l2 distance"
            )
        import lpips

        try:
            self.net = lpips.LPIPS(net="alex", version="0.1", verbose=False)
        except Exception as e:  # noqa: BLE001 - a corrupt or foreign weights file
            raise WherefromError(f"cannot load LPIPS backbone weights from {path} ({type(e).__name__}: {e}); replace the file") from None
        self.net.requires_grad_(False)
        self.min_size = min_size

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-pair LPIPS, shape (N,)."""
        _check_pair(a, b)
        if a.shape[1] not in (1, 3):
            raise WherefromError(f"LPIPS takes 1- or 3-channel images, got {a.shape[1]} channels")
        x = torch.cat([a, b]).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if min(x.shape[-2:]) < self.min_size:
            scale = self.min_size / min(x.shape[-2:])
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        with torch.no_grad():
            return self.net(x[: len(a)], x[len(a) :]).flatten()


def distance_kind(kind: DistanceKind | str) -> DistanceKind:
    try:
        return DistanceKind(kind)
    except ValueError:
        raise WherefromError(f"unknown distance {kind!r}; choose one of {[k.value for k in DistanceKind]}") from None


def distance_fn(kind: DistanceKind | str):
    """``(a, b) -> (N,)`` for a distance kind (LPIPS loads its backbone here, once)."""
    return l2_distance if distance_kind(kind) is DistanceKind.L2 else LPIPSDistance()


class ImageDistance(Metric):
    """Mean L2 or LPIPS distance between pairs of image batches (torchmetrics)."""

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, kind: DistanceKind | str = DistanceKind.L2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.kind = distance_kind(kind)
        self.fn = distance_fn(self.kind)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, a: Tensor, b: Tensor) -> None:
        d = self.fn(a, b)
        self.total += d.double().sum()
        self.count += d.numel()

    def compute(self) -> Tensor:
        return self.total / self.count
