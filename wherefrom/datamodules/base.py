"""Indexed image datamodules: every batch is ``{"index": LongTensor, "image": float [-1, 1]}``.

The *global index* of an image is its position in the full training set of a
source (after the held-out ``val_size`` images are set aside). ``subset`` and
``exclude`` select by global index; the dataset fingerprint hashes the number
of images, their shape and the selected index set, so artifacts made for one
split refuse to load against another.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from wherefrom.errors import WherefromError, one_line
from wherefrom.io import fingerprint, load_array, tensor_hash, to_model_range

IndexSpec = Sequence[int] | str | Path | None


def read_indices(spec: IndexSpec, what: str) -> np.ndarray | None:
    """Indices from a list, or from a ``.npy`` / ``.json`` / whitespace-separated text file."""
    if spec is None:
        return None
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise WherefromError(f"{what} file {str(path)!r} does not exist; pass a list of indices or an existing .npy/.json/.txt file")
        if path.suffix == ".npy":
            arr = load_array(path, what)
        else:
            try:
                text = path.read_text()
                arr = np.asarray(json.loads(text)) if path.suffix == ".json" else np.asarray(text.split(), dtype=np.int64)
            except (ValueError, UnicodeDecodeError) as e:
                raise WherefromError(
                    f"{what} file {str(path)!r} must hold integer indices (.npy, a .json list, or whitespace-separated text): {one_line(e, 100)}"
                ) from None
    else:
        arr = np.asarray(list(spec))
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise WherefromError(f"{what} must hold integer indices, got dtype {arr.dtype}")
    return arr.astype(np.int64).reshape(-1)


def random_pool(n: int, size: int | None, seed: int) -> np.ndarray:
    """``size`` sorted indices of ``range(n)`` drawn without replacement from ``seed`` (all when ``None``)."""
    if size is None:
        return np.arange(n)
    if not 1 <= size <= n:
        raise WherefromError(f"pool_size must be in [1, {n}] (the source has {n} training images), got {size}")
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def select_indices(n: int, subset: IndexSpec = None, exclude: IndexSpec = None, pool: np.ndarray | None = None) -> np.ndarray:
    """Sorted global indices of ``range(n)`` (or of ``pool``) restricted to ``subset`` minus ``exclude``."""
    sub, exc = read_indices(subset, "subset"), read_indices(exclude, "exclude")
    for name, arr in (("subset", sub), ("exclude", exc)):
        if arr is None:
            continue
        bad = arr[(arr < 0) | (arr >= n)]
        if bad.size:
            raise WherefromError(f"{name} has indices outside [0, {n}) (e.g. {bad[:5].tolist()}); the training set has {n} images")
        if np.unique(arr).size != arr.size:
            raise WherefromError(f"{name} lists some indices more than once; pass each index once")
    if sub is not None and exc is not None:
        both = np.intersect1d(sub, exc)
        if both.size:
            raise WherefromError(f"indices {both[:5].tolist()} are in both subset and exclude; remove them from one of the two")
    pool = np.arange(n) if pool is None else pool
    if sub is not None:
        outside = np.setdiff1d(sub, pool)
        if outside.size:
            raise WherefromError(f"subset has indices outside the pool_size draw (e.g. {outside[:5].tolist()}); subset from the pool's indices")
    keep = pool if sub is None else np.sort(sub)
    if exc is not None:
        keep = np.setdiff1d(keep, exc)
    if keep.size == 0:
        raise WherefromError("subset/exclude leave no training images; select at least one")
    return keep


class IndexedDataset(Dataset):
    """The images at the given global indices, yielding ``{"index", "image"}`` (and ``"label"`` /
    ``"cond"`` when ``labels`` / ``cond``, one per image of the index space, are given)."""

    def __init__(self, images: Tensor, indices: np.ndarray, labels: Tensor | None = None, cond: Tensor | None = None) -> None:
        self.images, self.labels, self.cond = images, labels, cond
        self.indices = torch.as_tensor(indices, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        g = self.indices[i]
        item = {"index": g, "image": self.images[g]}
        if self.labels is not None:
            item["label"] = self.labels[g]
        if self.cond is not None:
            item["cond"] = self.cond[g]
        return item


class ImageDataModule(L.LightningDataModule):
    """Base of every source. Subclasses implement :meth:`load_images`.

    Args:
        batch_size: training batch size (per process under DDP).
        num_workers: DataLoader workers.
        subset: global indices (or a file of them) to train on; default all.
        exclude: global indices (or a file) removed from the training set.
        val_size: the last ``val_size`` images of the source form the held-out
            ``val`` split (queries); they are not part of the global index space.
        shuffle: shuffle training batches.
        pool_size, pool_seed: train on ``pool_size`` images drawn at random (from
            ``pool_seed``) before ``subset``/``exclude``; the others keep their
            global indices and serve as held-out queries (:attr:`held_out`).
        groups: a group per image (class, artist, source) for group-level ensemble codes:
            ``"labels"`` (the source's labels, e.g. the digit classes) or a file / list of one
            integer id per image of the full index space (see :attr:`group_ids`).
        conditional: items also carry the source's class ``"label"`` (for class-conditional models).
        vae: a diffusers ``AutoencoderKL`` folder: serve its latents as the ``"image"``s (latent
            diffusion, :mod:`wherefrom.latent`); :meth:`decode` maps them back for display.
        latent_cache: a ``.safetensors`` file keeping the latents between runs (checked before reuse).
        captions: one caption per image (a file, one per line, or ``"labels"``: the source's class
            names) for text-conditional models; embedded once by ``text_encoder`` (:mod:`wherefrom.text`)
            and served as each item's ``"cond"``.
        text_encoder: a folder with a transformers tokenizer and text encoder (e.g. CLIP's).
    """

    source_name = "images"

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        subset: list[int] | str | None = None,
        exclude: list[int] | str | None = None,
        val_size: int = 0,
        shuffle: bool = True,
        pool_size: int | None = None,
        pool_seed: int = 0,
        groups: list[int] | str | None = None,
        conditional: bool = False,
        vae: str | None = None,
        latent_cache: str | None = None,
        captions: str | list[str] | None = None,
        text_encoder: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1:
            raise WherefromError(f"batch_size must be >= 1, got {batch_size}")
        if val_size < 0:
            raise WherefromError(f"val_size must be >= 0, got {val_size}")
        self.batch_size, self.num_workers, self.shuffle = batch_size, num_workers, shuffle
        self.subset, self.exclude, self.val_size = subset, exclude, val_size
        self.pool_size, self.pool_seed, self.groups, self.conditional = pool_size, pool_seed, groups, conditional
        if latent_cache is not None and vae is None:
            raise WherefromError("latent_cache needs a vae (the AutoencoderKL whose latents it keeps)")
        if (captions is None) != (text_encoder is None):
            raise WherefromError("text conditioning needs both captions and text_encoder (the folder that embeds them)")
        self.vae, self.latent_cache, self.captions, self.text_encoder = vae, latent_cache, captions, text_encoder
        self._images: Tensor | None = None
        self._codec = self._encoder = self._cond = self._captions = self._null = None

    def load_images(self) -> np.ndarray | Tensor:
        """The whole source as N x C x H x W (uint8 or float in [-1, 1])."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self._images is not None:
            return
        images = to_model_range(self.load_images(), self.source_name)
        if self.val_size >= len(images):
            raise WherefromError(f"val_size={self.val_size} leaves no training images out of {len(images)}")
        if self.vae is not None:  # latent diffusion: the latents are the model's images, same global indices
            images = self.codec.encode_cached(images, self.latent_cache)
        cut = len(images) - self.val_size
        self._images, self._val = images[:cut], images[cut:]
        if self.text_encoder is not None:
            from wherefrom.text import read_captions

            labels = getattr(self, "labels", None) if self.captions == "labels" else None
            self._captions = read_captions(self.captions, cut, labels, getattr(self, "class_names", None))
            self._cond = self.embed(self._captions)
        self.indices = select_indices(cut, self.subset, self.exclude, random_pool(cut, self.pool_size, self.pool_seed))

    def image_names(self) -> list[str]:
        """Each training image's identity over the index space: its caption (text data), else its
        class (data with labels), else its index."""
        if self._captions is not None:
            return list(self._captions)
        labels, classes = getattr(self, "labels", None), getattr(self, "class_names", None)
        if labels is not None:
            return [classes[int(c)] if classes else f"class {int(c)}" for c in np.asarray(labels)[: self.num_images]]
        return [str(i) for i in range(self.num_images)]

    @property
    def codec(self):
        """The :class:`~wherefrom.latent.LatentCodec` of ``vae`` (``None`` in pixel space)."""
        if self.vae is not None and self._codec is None:
            from wherefrom.latent import LatentCodec

            self._codec = LatentCodec(self.vae)
        return self._codec

    def class_labels(self, option: str = "conditional=True", hint: str = "") -> Tensor:
        """The source's class label of every image (for ``option``, named in the error when it has none)."""
        labels = getattr(self, "labels", None)
        if labels is None:
            raise WherefromError(f"{option} needs a source with labels; {type(self).__name__} has none{hint}")
        return torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def embed(self, captions: list[str]) -> Tensor:
        """The ``text_encoder``'s embeddings of ``captions`` (``B x L x D``): queries' conditions."""
        if self.text_encoder is None:
            raise WherefromError(f"captions need a text-conditional datamodule ({type(self).__name__}(text_encoder=...) and {type(self).__name__}(captions=...))")
        if self._encoder is None:
            from wherefrom.text import TextEncoder

            self._encoder = TextEncoder(self.text_encoder)
        return self._encoder.embed(captions)

    @property
    def null_condition(self) -> Tensor | None:
        """The empty caption's embedding (classifier-free guidance's null condition); ``None`` without text."""
        if self.text_encoder is not None and self._null is None:
            self._null = self.embed([""])[0]
        return self._null

    def decode(self, images: Tensor) -> Tensor:
        """What the model's ``"image"``s look like: decoded latents, or the images themselves in pixel space."""
        return images if self.codec is None else self.codec.decode(images)

    # --- what downstream stages use -------------------------------------------
    @property
    def images(self) -> Tensor:
        """All training images (full index space, before subset/exclude)."""
        self.setup()
        return self._images

    @property
    def val_images(self) -> Tensor:
        self.setup()
        return self._val

    @property
    def held_out(self) -> np.ndarray:
        """Global indices outside the ``pool_size`` draw (never trained on by any split of the pool)."""
        self.setup()
        return np.setdiff1d(np.arange(self.num_images), random_pool(self.num_images, self.pool_size, self.pool_seed))

    @property
    def group_ids(self) -> np.ndarray | None:
        """The group of every image of the full index space (``None`` without ``groups``)."""
        if self.groups is None:
            return None
        if isinstance(self.groups, str) and self.groups == "labels":
            return self.class_labels("groups='labels'", ": pass a file of group ids").numpy()
        ids = read_indices(self.groups, "groups")
        if len(ids) != self.num_images:
            raise WherefromError(f"groups must give one id per image ({self.num_images}), got {len(ids)}")
        return ids

    @property
    def num_images(self) -> int:
        """N, the size of the global index space."""
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def fingerprint(self) -> str:
        self.setup()
        captions = hashlib.sha256("\n".join(self._captions).encode()).hexdigest()[:16] if self._captions is not None else ""
        parts = [f"labels:{tensor_hash([self.class_labels()])}" if self.conditional else "",
                 f"captions:{captions}:{self._encoder.fingerprint}" if captions else "",
                 f"vae:{self.codec.fingerprint}" if self.codec is not None else ""]  # fmt: skip
        return fingerprint(self.num_images, self.image_shape, self.indices, "".join(parts))

    def dataset(self, indices: np.ndarray | None = None) -> IndexedDataset:
        """Dataset over ``indices`` (default: the selected training split)."""
        self.setup()
        labels = self.class_labels() if self.conditional else None
        return IndexedDataset(self._images, self.indices if indices is None else np.asarray(indices), labels, self._cond)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset(),
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
