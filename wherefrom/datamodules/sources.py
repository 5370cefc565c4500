"""Concrete image sources: embedded digits, a folder, an array file, local CIFAR-10."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from wherefrom.datamodules.base import ImageDataModule
from wherefrom.errors import WherefromError
from wherefrom.io import load_array

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def image_files(root: Path) -> list[Path]:
    """Every image file under ``root`` (recursively, sorted by path)."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def read_images(files: list[Path], mode: str, image_size: int | None, what: str, fix: str) -> np.ndarray:
    """``files`` as uint8 N x C x H x W in PIL ``mode`` (``L``: 1 channel, ``RGB``: 3), each resized to
    ``image_size`` when set; differing sizes raise one line ending in ``fix``."""
    arrays = []
    for path in files:
        try:
            img = Image.open(path).convert(mode)
        except OSError as e:
            raise WherefromError(f"{what}: {str(path)!r} is not a readable image ({e})") from None
        if image_size is not None:
            img = img.resize((image_size, image_size), Image.BICUBIC)
        arrays.append(np.asarray(img, dtype=np.uint8))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise WherefromError(f"{what} have different sizes {sorted(shapes)[:3]}; {fix}")
    x = np.stack(arrays)
    return x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, offline).

    Pixel values 0..16 are mapped linearly to [-1, 1].
    """

    source_name = "digits"
    class_names = [f"a digit {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]

    def load_images(self) -> np.ndarray:
        from sklearn.datasets import load_digits

        return (load_digits().images[:, None].astype(np.float32) / 8.0) - 1.0

    @property
    def labels(self) -> np.ndarray:
        """The digit class of every training image (full index space, like :attr:`images`)."""
        from sklearn.datasets import load_digits

        return load_digits().target[: self.num_images]


class FolderDataModule(ImageDataModule):
    """Every image file under ``root`` (recursively, sorted by path).

    Args:
        root: the folder.
        mode: PIL mode, ``"L"`` (1 channel) or ``"RGB"`` (3 channels).
        image_size: resize every image to this square size; required when sizes differ.
    """

    source_name = "folder"

    def __init__(self, root: str, mode: str = "RGB", image_size: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if mode not in ("L", "RGB"):
            raise WherefromError(f"mode must be 'L' or 'RGB', got {mode!r}")
        self.root, self.mode, self.image_size = Path(root), mode, image_size

    def files(self) -> list[Path]:
        if not self.root.is_dir():
            raise WherefromError(f"image folder {str(self.root)!r} does not exist; pass {type(self).__name__}(root=...) pointing at a folder of images")
        files = image_files(self.root)
        if not files:
            raise WherefromError(f"image folder {str(self.root)!r} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        return files

    def image_names(self) -> list[str]:
        """Each training image's file relative to ``root`` (with its caption, for text data)."""
        files = [p.relative_to(self.root).as_posix() for p in self.files()[: self.num_images]]
        captions = self._captions
        return files if captions is None else [f"{f}: {c}" for f, c in zip(files, captions)]

    def load_images(self) -> np.ndarray:
        return read_images(self.files(), self.mode, self.image_size, f"images in {str(self.root)!r}", f"set {type(self).__name__}(image_size=...) to resize them")


class ArrayDataModule(ImageDataModule):
    """Images from a ``.npy`` file or a key of a ``.npz`` file (N x C x H x W or N x H x W;
    uint8 in [0, 255] or float in [-1, 1])."""

    source_name = "array"

    def __init__(self, path: str, key: str = "images", **kwargs) -> None:
        super().__init__(**kwargs)
        self.path, self.key = Path(path), key

    def load_images(self) -> np.ndarray:
        if not self.path.is_file():
            raise WherefromError(f"array file {str(self.path)!r} does not exist; pass {type(self).__name__}(path=...) to a .npy or .npz file")
        if self.path.suffix in (".npy", ".npz"):
            return load_array(self.path, "array", self.key if self.path.suffix == ".npz" else None)
        raise WherefromError(f"array file {str(self.path)!r} must end in .npy or .npz")


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 training images from a local torchvision-format directory (never downloads)."""

    source_name = "cifar10"

    def __init__(self, root: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = root

    def load_images(self) -> np.ndarray:
        from torchvision.datasets import CIFAR10

        try:
            ds = CIFAR10(self.root, train=True, download=False)
        except RuntimeError:
            raise WherefromError(
                f"no CIFAR-10 under {self.root!r}, or its files fail torchvision's checksums; extract the python "
                "version ('cifar-10-batches-py' with data_batch_1..5 and batches.meta) there — wherefrom never downloads"
            ) from None
        return ds.data.transpose(0, 3, 1, 2)
