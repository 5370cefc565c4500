"""Atomic file writes, content hashes and image grids."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wherefrom.errors import WherefromError, one_line


def tensor_hash(tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> str:
    """A short SHA-256 of tensors' bytes (and of their names, for a mapping such as a state dict)."""
    h = hashlib.sha256()
    for name, t in tensors.items() if isinstance(tensors, Mapping) else ((None, t) for t in tensors):
        if name is not None:
            h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def weights_hash(model: torch.nn.Module) -> str:
    """A hash of a network's parameters and buffers (ties features, factors and caches to the weights that made them)."""
    return tensor_hash(model.state_dict())


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or folder's contents (a folder's: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and ``os.replace``
    it into place, so readers see either the old file or the complete new one."""
    path = Path(path)
    check_out_dir(path.parent, "output folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def load_array(path: str | Path, what: str, key: str | None = None) -> np.ndarray:
    """A user's ``.npy`` (or ``key`` of an ``.npz``: by default its only array, else its ``"images"``),
    never unpickled; a missing, truncated or pickled file raises one-line :class:`WherefromError`."""
    path = Path(path)
    if not path.is_file():
        raise WherefromError(f"{what} file {str(path)!r} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return loaded
        with loaded as z:
            keys = list(z.keys())
            if key is None and len(keys) != 1 and "images" not in keys:
                raise WherefromError(f"{what} file {str(path)!r} holds arrays {keys}; keep one array or name the images 'images' (np.savez(path, images=x))")
            key = key or (keys[0] if len(keys) == 1 else "images")
            if key in z:
                return z[key]
    except WherefromError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise WherefromError(f"{what} file {str(path)!r} is not a readable .npy/.npz array ({one_line(e, 120)}); write it with numpy.save") from None
    raise WherefromError(f"{what} file {str(path)!r} has no array {key!r} (has {keys})")


def check_out_dir(path: str | Path, what: str = "output folder") -> Path:
    """Raise before any work if an output folder path is an existing file (or lies under one)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise WherefromError(f"{what} {str(path)!r}: {str(p)!r} is a file, not a folder; pass a folder path")
            break
    return path


def write_bytes(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))


def write_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 (N x C x H x W)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(images: Tensor, nrow: int = 8, scale: int = 4) -> Tensor:
    """``images`` ([-1, 1], N x C x H x W) as one uint8 3 x H' x W' grid, upscaled ``scale`` x (nearest)."""
    from torchvision.utils import make_grid

    grid = make_grid(to_uint8(images), nrow=nrow, padding=1, pad_value=255)
    return grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def save_grid(images: Tensor, path: str | Path, nrow: int = 8, scale: int = 4) -> None:
    """Write ``images`` ([-1, 1], N x C x H x W) as one PNG grid, upscaled ``scale`` x."""
    from PIL import Image

    arr = image_grid(images, nrow, scale).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if images.shape[1] == 1 else arr)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def fingerprint(n: int, shape: Sequence[int], indices: np.ndarray, conditioning: str = "") -> str:
    """Hash of (number of images, image shape, selected index set) and, for data seen through
    conditions or a VAE, a ``conditioning`` string (so stores of other captions/labels/latents differ)."""
    h = hashlib.sha256()
    h.update(json.dumps({"n": int(n), "shape": [int(s) for s in shape]}).encode())
    h.update(np.ascontiguousarray(np.sort(indices), dtype="<i8").tobytes())
    h.update(conditioning.encode())
    return h.hexdigest()[:16]


def to_model_range(images: np.ndarray | Tensor, source: str) -> Tensor:
    """Validate an N x C x H x W (or N x H x W) array and map it to float32 in [-1, 1].

    uint8 is read as [0, 255]; floats must already be in [-1, 1] and finite.
    """
    x = images.detach().cpu() if isinstance(images, Tensor) else torch.as_tensor(np.asarray(images))
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise WherefromError(f"{source}: images must be N x C x H x W (or N x H x W), got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3):
        hint = " (channels-last? transpose to N x C x H x W)" if x.shape[-1] in (1, 3) else ""
        raise WherefromError(f"{source}: images need 1 or 3 channels in dim 1, got shape {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise WherefromError(f"{source}: no images")
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1
    if not x.dtype.is_floating_point:
        raise WherefromError(f"{source}: images must be uint8 in [0, 255] or float in [-1, 1], got dtype {x.dtype}")
    finite = torch.isfinite(x.flatten(1)).all(1)
    if not finite.all():
        bad = torch.nonzero(~finite).flatten()
        what = "NaN" if torch.isnan(x[bad]).any() else "infinite values"
        raise WherefromError(f"{source}: {bad.numel()} of {len(x)} images hold {what} (e.g. image {int(bad[0])}); fix or drop them")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - 1e-6 or hi > 1 + 1e-6:
        raise WherefromError(f"{source}: float images must be in [-1, 1], found [{lo:.3g}, {hi:.3g}]; rescale, e.g. x / 127.5 - 1 for [0, 255]")
    return x.float()
