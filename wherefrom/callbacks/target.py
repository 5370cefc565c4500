"""What a capture callback reads from a run, found in any Lightning pipeline.

* **networks**: ``module.denoisers()`` (wherefrom's modules, :class:`~wherefrom.model.Attributable`),
  else the callback's ``denoiser`` (an attribute path on the module, e.g. ``"unet"`` or
  ``"model.unet"``), else the module's single diffusers ``UNet2DModel`` / ``UNet2DConditionModel``;
* **task**: ``module.task`` (a :class:`~wherefrom.task.DiffusionTask`), else the callback's ``task``,
  else :meth:`DiffusionTask.from_scheduler` of the module's single diffusers scheduler;
* **data**: the trainer's datamodule when it is a wherefrom one (``fingerprint``, ``indices``,
  ``dataset``), else the train DataLoader's map-style dataset (:class:`DatasetView`): indices
  from each item's ``"index"`` (or its position), images from ``"image"`` (or a tuple's first tensor).

Resolution raises one line naming the callback's own arguments, so a pipeline that
lacks something fails in ``setup()`` / ``on_train_start``, before the first training step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from wherefrom.attribution.features import on_rank_zero
from wherefrom.attribution.store import Store
from wherefrom.datamodules.base import fingerprint
from wherefrom.errors import WherefromError
from wherefrom.task import DiffusionTask

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


@dataclass
class Target:
    """The networks (``{model_id: net}``) and the diffusion task of ``module``."""

    denoisers: dict[str, nn.Module]
    task: DiffusionTask
    module: Any

    @property
    def codes_fingerprint(self) -> str | None:
        """The module's encoded-ensemble codes (read when needed: an ensemble assigns them in its own ``setup``)."""
        return getattr(self.module, "codes_fingerprint", None)


def _find(module: nn.Module, accept, what: str, owner: str, argument: str) -> Any:
    """The single attribute of ``module`` (searched through its children and plain attributes) that ``accept`` takes."""
    found = {name: m for name, m in module.named_modules() if name and accept(m)}
    found.update({name: v for name, v in vars(module).items() if not name.startswith("_") and accept(v)})
    unique = {id(v): (name, v) for name, v in found.items()}
    if len(unique) == 1:
        return next(iter(unique.values()))[1]
    names = sorted(name for name, _ in unique.values())
    hint = f"found {len(unique)} ({', '.join(names)})" if unique else "found none"
    raise WherefromError(f"{owner} needs the module's {what}: {hint}; pass {owner}({argument}=...)")


def _attribute(module: Any, path: str, owner: str, argument: str) -> Any:
    obj = module
    for part in path.split("."):
        if not hasattr(obj, part):
            raise WherefromError(f"{owner}({argument}={path!r}): {type(module).__name__} has no attribute {path!r}")
        obj = getattr(obj, part)
    return obj


def resolve_target(module: Any, owner: str, denoiser: str | None = None, task: DiffusionTask | None = None) -> Target:
    """The :class:`Target` of ``module`` as the callback ``owner`` sees it (see the module docstring)."""
    if hasattr(module, "denoisers") and denoiser is None:
        nets = dict(module.denoisers())
    elif denoiser is not None:
        net = _attribute(module, denoiser, owner, "denoiser")
        if not isinstance(net, nn.Module):
            raise WherefromError(f"{owner}(denoiser={denoiser!r}) is a {type(net).__name__}, not a torch module")
        nets = {"model": net}
    else:
        nets = {"model": _find(module, lambda m: type(m).__name__ in UNET_CLASSES, "diffusers UNet (UNet2DModel or UNet2DConditionModel)", owner, "denoiser")}
    if task is None:
        task = getattr(module, "task", None)
    if not isinstance(task, DiffusionTask):
        from diffusers import SchedulerMixin

        scheduler = _find(module, lambda v: isinstance(v, SchedulerMixin), "diffusers noise scheduler (e.g. DDPMScheduler)", owner, "task")
        try:
            task = DiffusionTask.from_scheduler(scheduler)
        except WherefromError as e:
            raise WherefromError(f"{owner}: {e}; pass {owner}(task=DiffusionTask(...)) if the model was trained otherwise") from None
    return Target(nets, task, module)


class _ByIndex(Dataset):
    def __init__(self, view: DatasetView, indices: np.ndarray) -> None:
        self.view, self.indices = view, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        g = int(self.indices[i])
        return {"index": torch.tensor(g), "image": self.view.images[self.view.position[g]]}


class DatasetView:
    """A map-style dataset of a user's DataLoader, seen as wherefrom data: ``indices`` (global, from the
    items' ``"index"`` or their positions), ``num_images`` (largest index + 1), ``fingerprint`` and
    ``dataset(indices)`` yielding ``{"index", "image"}``. Reads every item once."""

    def __init__(self, dataset: Any, owner: str) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise WherefromError(f"{owner} needs a map-style training dataset (with __len__ and __getitem__), got {type(dataset).__name__}")
        indices, images = [], []
        for pos in range(len(dataset)):
            item = dataset[pos]
            if isinstance(item, dict):
                if "image" not in item:
                    raise WherefromError(f"{owner}: the training items are dicts without an 'image' key (keys {sorted(item)}); yield {{'index', 'image'}}")
                image, index = item["image"], item.get("index", pos)
            elif isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
                image, index = item[0], pos
            elif isinstance(item, Tensor):
                image, index = item, pos
            else:
                raise WherefromError(f"{owner}: cannot find the image in a training item of type {type(item).__name__}; yield {{'index', 'image'}}")
            indices.append(int(index))
            images.append(torch.as_tensor(image))
        if not images:
            raise WherefromError(f"{owner}: the training dataset is empty")
        self.indices = np.asarray(indices, dtype=np.int64)
        if np.unique(self.indices).size != self.indices.size or self.indices.min() < 0:
            raise WherefromError(f"{owner}: the training items' 'index' values must be distinct and >= 0 (global indices)")
        self.images = torch.stack(images).float()
        self.position = {int(g): p for p, g in enumerate(self.indices)}
        self.num_images = int(self.indices.max()) + 1
        self.image_shape = tuple(self.images.shape[1:])
        self.fingerprint = fingerprint(self.num_images, self.image_shape, self.indices)

    def dataset(self, indices: np.ndarray | None = None) -> Dataset:
        return _ByIndex(self, self.indices if indices is None else indices)


def resolve_data(trainer: Any, owner: str) -> Any:
    """The trainer's wherefrom datamodule, else a :class:`DatasetView` of its train DataLoader's dataset."""
    dm = trainer.datamodule
    if dm is not None and all(hasattr(dm, a) for a in ("fingerprint", "indices", "dataset", "num_images")):
        return dm
    loader = trainer.train_dataloader
    if loader is None:
        raise WherefromError(f"{owner} needs training data: fit with a wherefrom datamodule or a train DataLoader")
    return DatasetView(getattr(loader, "dataset", loader), owner)


class CaptureCallback(L.Callback):
    """What every capture callback shares: the store it writes, the networks and task resolved in
    ``setup()``, and the data and the opened store checked in ``on_train_start`` (before the first step).

    Args:
        store: the store folder.
        overwrite: replace a store/entries made for other data, config or weights.
        denoiser: attribute path of the network on the module (default: ``denoisers()`` or its single diffusers UNet).
        task: the noise schedule (default: ``module.task`` or its diffusers scheduler's).
    """

    def __init__(self, store: str, overwrite: bool = False, denoiser: str | None = None, task: DiffusionTask | None = None) -> None:
        self.store, self.overwrite, self.denoiser, self.task = store, overwrite, denoiser, task
        self._target: Target | None = None
        self._data: Any = None
        self._store: Store | None = None

    def _state_key(self, **parts: Any) -> str:
        """The checkpoint-state key: the class, the resolved store path (any spelling of one folder) and ``parts``."""
        return self._generate_state_key(store=str(Path(self.store).resolve()), **parts)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._target = resolve_target(pl_module, type(self).__name__, self.denoiser, self.task)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Find the data and open the store now, so a mismatch fails before the first step."""
        self._data = resolve_data(trainer, type(self).__name__)
        on_rank_zero(trainer.strategy, self._open_store)

    def _open_store(self) -> None:
        """(Re)open the store on rank 0 as ``self._store`` (other ranks never touch it)."""
        owner = type(self).__name__
        self._store = Store(self.store, self._data.fingerprint, self._target.codes_fingerprint, overwrite=self.overwrite,
                            names=(f"{owner}(store=...)", f"{owner}(overwrite=True)"))  # fmt: skip


__all__ = ["CaptureCallback", "DatasetView", "Target", "resolve_data", "resolve_target"]
