"""What attribution reads from a run, found in any Lightning pipeline.

* **networks**: ``module.denoisers()`` (wherefrom's modules, :class:`~wherefrom.model.Attributable`),
  else ``denoiser`` (an attribute path on the module, e.g. ``"unet"`` or ``"model.unet"``), else
  the module's single diffusers ``UNet2DModel`` / ``UNet2DConditionModel``;
* **task**: ``module.task`` (a :class:`~wherefrom.task.DiffusionTask`), else ``task``, else
  :meth:`DiffusionTask.from_scheduler` of the module's single diffusers scheduler;
* **data**: a wherefrom datamodule (``fingerprint``, ``indices``, ``dataset``), else a map-style
  dataset (given, or a DataLoader's or a LightningDataModule's train dataset) seen through
  :class:`DatasetView`: indices from each item's ``"index"``, else its position (in a ``Subset``'s
  parent dataset, said once), images from ``"image"`` (or a tuple's first tensor, or the item itself);
* **queries**: :func:`as_queries` checks them as every command and attributor takes them.

Resolution raises one line naming the caller's own arguments (a callback's keyword, a
command's flag), so a pipeline that lacks something fails before any work is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from wherefrom.errors import Spell, WherefromError, keyword
from wherefrom.io import fingerprint, to_model_range
from wherefrom.objective import OBJECTIVES
from wherefrom.task import DiffusionTask, predict

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


@dataclass
class Target:
    """The networks (``{model_id: net}``) and the diffusion task of ``module``; an
    :class:`~wherefrom.model.Attributable` for any module."""

    networks: dict[str, nn.Module]
    task: DiffusionTask
    module: Any

    def denoisers(self) -> dict[str, nn.Module]:
        return self.networks

    @property
    def codes_fingerprint(self) -> str | None:
        """The module's encoded-ensemble codes (read when needed: an ensemble assigns them in its own ``setup``)."""
        return getattr(self.module, "codes_fingerprint", None)

    @property
    def image_shape(self) -> tuple[int, ...]:
        from wherefrom.model import image_shape

        return image_shape(next(iter(self.networks.values())))

    @torch.no_grad()
    def generate(self, num_samples: int, seed: int = 0, **kwargs: Any) -> Tensor:
        """Unconditional samples of a single network (see :func:`wherefrom.sampling.generate`)."""
        from wherefrom.sampling import generate

        if hasattr(self.module, "generate"):
            return self.module.generate(num_samples, seed=seed, **kwargs)
        if len(self.networks) != 1:
            raise WherefromError(f"the module has {len(self.networks)} networks; pass queries to attribute instead of generating them")
        if {"labels", "cond", "guidance", "null"} & set(kwargs):
            raise WherefromError("wherefrom samples your own module unconditionally only; generate conditional queries in your pipeline and pass them as the queries")
        net = next(iter(self.networks.values()))
        device = next(net.parameters()).device
        return generate(lambda x, t: predict(net, x, t), self.task, self.image_shape, num_samples, seed, device=device, **kwargs)


def _found(module: Any, accept) -> dict[int, tuple[str, Any]]:
    """The attributes of ``module`` (its children and plain attributes) that ``accept`` takes, once each."""
    children = module.named_modules() if isinstance(module, nn.Module) else []
    found = {name: m for name, m in children if name and accept(m)}
    found.update({name: v for name, v in vars(module).items() if not name.startswith("_") and accept(v)})
    return {id(v): (name, v) for name, v in found.items()}


def _find(module: nn.Module, accept, what: str, option: str) -> Any:
    """The single attribute of ``module`` (searched as :func:`_found` does) that ``accept`` takes."""
    unique = _found(module, accept)
    if len(unique) == 1:
        return next(iter(unique.values()))[1]
    names = sorted(name for name, _ in unique.values())
    hint = f"found {len(unique)} ({', '.join(names)})" if unique else "found none"
    raise WherefromError(f"{what}: {hint}; pass {option}")


def _attribute(module: Any, path: str, option: str) -> Any:
    obj = module
    for part in path.split("."):
        if not hasattr(obj, part):
            raise WherefromError(f"{option.replace('...', repr(path))}: {type(module).__name__} has no attribute {path!r}")
        obj = getattr(obj, part)
    return obj


def resolve_target(
    module: Any, owner: str, denoiser: str | None = None, task: DiffusionTask | None = None, spell: Spell | None = None
) -> Target:
    """The :class:`Target` of ``module`` as ``owner`` sees it (see the module docstring); ``spell``
    writes ``owner``'s options in messages (default: as its keyword arguments)."""
    spell = spell or keyword(owner)
    if hasattr(module, "denoisers") and denoiser is None:
        nets = dict(module.denoisers())
    elif denoiser is not None:
        net = _attribute(module, denoiser, spell("denoiser"))
        if not isinstance(net, nn.Module):
            raise WherefromError(f"{spell('denoiser').replace('...', repr(denoiser))} is a {type(net).__name__}, not a torch module")
        nets = {"model": net}
    else:
        what = f"{owner} needs the module's diffusers UNet (UNet2DModel or UNet2DConditionModel)"
        nets = {"model": _find(module, lambda m: type(m).__name__ in UNET_CLASSES, what, spell("denoiser"))}
    if task is None:
        task = getattr(module, "task", None)
    from diffusers import SchedulerMixin

    is_scheduler = lambda v: isinstance(v, SchedulerMixin)  # noqa: E731
    if not isinstance(task, DiffusionTask):
        what = f"{owner} needs the module's diffusers noise scheduler (e.g. DDPMScheduler)"
        scheduler = _find(module, is_scheduler, what, spell("task"))
        try:
            task = DiffusionTask.from_scheduler(scheduler)
        except WherefromError as e:
            raise WherefromError(f"{owner}: {e}") from None
    else:  # a given task sets the objective; a built-in one cannot contradict what a scheduler of the module says
        for _, scheduler in _found(module, is_scheduler).values():
            check_task_against(task, scheduler, owner)
    return Target(nets, task, module)


def check_task_against(task: DiffusionTask, scheduler: Any, owner: str) -> None:
    """Refuse a given task whose built-in objective is not what the module's diffusers ``scheduler`` trains
    (another family or prediction type; the task sets the schedule), or stands in for a scheduler no
    built-in models; an own
    :class:`~wherefrom.objective.Objective` is the user's word for what their module trains."""
    if type(task.objective) not in OBJECTIVES.values():
        return
    try:
        theirs = DiffusionTask.from_scheduler(scheduler).objective
    except WherefromError as e:
        raise WherefromError(f"{owner}: {e}; a built-in objective cannot stand in for it") from None
    def says(o: Any) -> str:  # what the network regresses on; a given task sets the schedule (levels, betas, shift)
        return f"{type(o).__name__}" + (f"(prediction_type={o.prediction_type!r})" if hasattr(o, "prediction_type") else "")

    if says(theirs) != says(task.objective):
        raise WherefromError(f"{owner}: the module's {type(scheduler).__name__} trains {says(theirs)} but the task given is {says(task.objective)}; drop the task or make it match")


def attributable(module: Any, owner: str, denoiser: str | None = None) -> Any:
    """``module`` itself when it is :class:`~wherefrom.model.Attributable` (a wherefrom module or a
    :class:`Target`) and no ``denoiser`` path is given, else its resolved :class:`Target`."""
    if denoiser is None and hasattr(module, "denoisers") and isinstance(getattr(module, "task", None), DiffusionTask):
        return module
    return resolve_target(module, owner, denoiser)


def item_image(item: Any, owner: str) -> Tensor:
    """The image of a training item, or the images of a collated batch: a dict's ``"image"``, a
    tuple's first tensor, or the tensor itself."""
    if isinstance(item, dict):
        if "image" not in item:
            raise WherefromError(f"{owner}: the training items are dicts without an 'image' key (keys {sorted(item)}); yield {{'index', 'image'}}")
        return torch.as_tensor(item["image"])
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
        return item[0]
    if isinstance(item, Tensor):
        return item
    raise WherefromError(f"{owner}: cannot find the image in a training item of type {type(item).__name__}; yield {{'index', 'image'}}")


def item_conditions(item: Any) -> dict[str, Tensor]:
    """A training item's condition: a dict's ``"label"`` (class) and ``"cond"`` (e.g. a caption embedding), or
    the integer second entry of an ``(image, label)`` tuple; none for other items."""
    if isinstance(item, dict):
        return {key: torch.as_tensor(item[key]) for key in ("label", "cond") if key in item}
    if isinstance(item, (tuple, list)) and len(item) > 1 and not isinstance(item[1], (bool, np.bool_)):
        label = torch.as_tensor(item[1]) if isinstance(item[1], (int, np.integer, Tensor)) else None
        if label is not None and label.dim() == 0 and not label.is_floating_point():
            return {"label": label}
    return {}


def check_conditions(networks: dict[str, nn.Module], data: Any, owner: str) -> None:
    """Refuse, before any work, training data without the conditions a class- or text-conditional diffusers network needs."""
    item = data.dataset()[0]
    for name, net in networks.items():
        if getattr(net, "config", None) is None:
            continue
        if getattr(getattr(net, "config", None), "cross_attention_dim", None) is not None and "cond" not in item:
            raise WherefromError(f"{owner}: network {name!r} is text-conditional but the training items carry no 'cond' (caption embedding); yield {{'index', 'image', 'cond'}} items")
        if getattr(net, "class_embedding", None) is not None and "label" not in item and "cond" not in item:
            raise WherefromError(f"{owner}: network {name!r} is class-conditional but the training items carry no class label; "
                                 "yield {'index', 'image', 'label'} dicts or (image, label) tuples")  # fmt: skip


def _item_index(item: Any) -> int | None:
    """A training item's own global index (a dict's ``"index"``; ``None``: use its position)."""
    index = item.get("index") if isinstance(item, dict) else None
    return None if index is None else int(index)


class _ByIndex(Dataset):
    def __init__(self, view: DatasetView, indices: np.ndarray) -> None:
        self.view, self.indices = view, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        g = int(self.indices[i])
        item = self.view.source[self.view.position[g]]
        out = {"index": torch.tensor(g), "image": item_image(item, self.view.owner).float()}
        return out | item_conditions(item)


class DatasetView:
    """A map-style dataset of a user's pipeline seen as wherefrom data: ``indices`` (global, from the
    items' ``"index"`` or their positions), ``num_images`` (largest index + 1), ``fingerprint``,
    ``dataset(indices)`` yielding ``{"index", "image"}`` (and the items' conditions, :func:`item_conditions`) and ``images`` (the full index space,
    zero where no item has that index). An item without ``"index"`` is indexed by its position: in
    the root dataset of a (nested) ``Subset``, so ``Subset(data, range(100, 200))`` keeps 100..199,
    and a warning says so once. Reads every item once for its index; images are read again when needed."""

    def __init__(self, dataset: Any, owner: str) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise WherefromError(f"{owner} needs a map-style training dataset (with __len__ and __getitem__), got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise WherefromError(f"{owner}: the training dataset is empty")
        self.owner, self.source = owner, dataset
        positions, root = _root_positions(dataset)
        indices, shapes, unnamed, labels = [], set(), 0, []
        for pos in range(len(dataset)):
            item = dataset[pos]
            image, index = item_image(item, owner), _item_index(item)
            unnamed += index is None
            indices.append(int(positions[pos]) if index is None else index)
            shapes.add(tuple(image.shape))
            label = item.get("label") if isinstance(item, dict) else None  # a dict's class label names its image
            labels.append(None if label is None or torch.as_tensor(label).dim() else int(label))
        if unnamed:
            where = f"their positions in the {type(root).__name__} the Subset selects from" if root is not dataset else "their positions"
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"{owner}: {unnamed} training items carry no 'index'; {where} are used as their global indices "
                           "(yield {'index', 'image'} items to choose them)")  # fmt: skip
        if len(shapes) != 1:
            raise WherefromError(f"{owner}: the training images have different shapes {sorted(shapes)[:3]}; resize them to one shape")
        self.indices = np.asarray(indices, dtype=np.int64)
        if np.unique(self.indices).size != self.indices.size or self.indices.min() < 0:
            raise WherefromError(f"{owner}: the training items' 'index' values must be distinct and >= 0 (global indices)")
        self.position = {int(g): p for p, g in enumerate(self.indices)}
        self._labels = {int(g): y for g, y in zip(self.indices, labels) if y is not None}
        self.num_images = int(self.indices.max()) + 1
        self.image_shape = shapes.pop()
        self.fingerprint = fingerprint(self.num_images, self.image_shape, self.indices)
        self._images: Tensor | None = None

    def image_names(self) -> list[str]:
        """Each index's identity as reports show it: ``class <label>`` for items that carry a class label, else the index."""
        return [f"class {self._labels[g]}" if g in self._labels else str(g) for g in range(self.num_images)]

    def image(self, index: int) -> Tensor:
        """The image of global index ``index`` (float)."""
        return item_image(self.source[self.position[index]], self.owner).float()

    @property
    def images(self) -> Tensor:
        if self._images is None:
            images = torch.zeros(self.num_images, *self.image_shape)
            for g in self.indices.tolist():
                images[g] = self.image(g)
            self._images = images
        return self._images

    def dataset(self, indices: np.ndarray | None = None) -> Dataset:
        return _ByIndex(self, self.indices if indices is None else indices)


def _root_positions(dataset: Any) -> tuple[np.ndarray, Any]:
    """Each item's position in the root dataset of a chain of ``Subset`` s, and that root."""
    positions = np.arange(len(dataset))
    while isinstance(dataset, Subset):
        positions = np.asarray(dataset.indices, dtype=np.int64)[positions]
        dataset = dataset.dataset
    return positions, dataset


def is_wherefrom_data(data: Any) -> bool:
    return all(hasattr(data, a) for a in ("fingerprint", "indices", "dataset", "num_images"))


def as_data(data: Any, owner: str) -> Any:
    """Training data as wherefrom reads it: a wherefrom datamodule (or :class:`DatasetView`) as is, else
    a :class:`DatasetView` of a map-style dataset, a DataLoader's or a LightningDataModule's train dataset."""
    if is_wherefrom_data(data):
        return data
    import lightning as L  # a datamodule's class; Lightning is already imported wherever one exists

    if isinstance(data, L.LightningDataModule):
        data.setup("fit")
        data = data.train_dataloader()
    if isinstance(data, DataLoader):
        data = data.dataset
    return DatasetView(data, owner)


def image_names(data: Any) -> list[str]:
    """Each training index's identity, as ``topk.json`` and reports show it: a wherefrom
    datamodule's ``image_names()`` (file, caption or class), else the index itself."""
    names = getattr(data, "image_names", None)
    return list(names()) if callable(names) else [str(i) for i in range(data.num_images)]


def resolve_data(trainer: Any, owner: str) -> Any:
    """The trainer's wherefrom datamodule, else a :class:`DatasetView` of its train DataLoader's dataset."""
    dm = trainer.datamodule
    if dm is not None and is_wherefrom_data(dm):
        return dm
    loader = trainer.train_dataloader
    if loader is None:
        raise WherefromError(f"{owner} needs training data: fit with a wherefrom datamodule or a train DataLoader")
    return as_data(getattr(loader, "dataset", loader), owner)


def _training_min(data: Any, sample: int = 16) -> float:
    """The smallest pixel among the first ``sample`` training images (their range, cheaply)."""
    items = data.dataset()
    return min(float(torch.as_tensor(items[i]["image"]).min()) for i in range(min(sample, len(items))))


def as_queries(queries: Any, data: Any, source: str) -> Tensor:
    """Query images as every command and attributor takes them, checked against the training data:
    ``Q x C x H x W`` (or ``Q x H x W``) of the training images' shape, a tensor or an array, uint8
    in [0, 255] or floats in [-1, 1] (a latent model's: any finite floats). Arrays come back as
    float32, float tensors keep their dtype and device; ``source`` names them in the one-line error."""
    if getattr(data, "codec", None) is not None:  # a latent model's samples: unbounded latents, any channels
        x = queries.detach() if isinstance(queries, Tensor) else torch.as_tensor(np.asarray(queries))
        if not isinstance(queries, Tensor) and x.is_floating_point():
            x = x.float()  # arrays are read as float32, as to_model_range reads images
        if not x.is_floating_point() or not torch.isfinite(x).all():
            raise WherefromError(f"{source}: latents must be finite floats (samples.npy of `wherefrom sample`), got {x.dtype}")
    else:
        x = to_model_range(queries, source)
        if isinstance(queries, Tensor) and queries.is_floating_point():
            x = queries.detach().reshape(x.shape)  # checked; kept in their own dtype and device (float64 stays exact)
    if tuple(x.shape[1:]) != tuple(data.image_shape):
        single = tuple(np.shape(queries)) == tuple(data.image_shape)
        hint = f"; one image? add the batch dimension (x[None], 1 x {' x '.join(map(str, data.image_shape))})" if single else ""
        raise WherefromError(f"{source} have shape {tuple(x.shape[1:])} but the training images are {tuple(data.image_shape)}{hint}")
    floats = np.asarray(queries).dtype.kind == "f" if not isinstance(queries, Tensor) else queries.is_floating_point()
    lowest = _training_min(data) if getattr(data, "codec", None) is None and floats and x.min() >= 0 else 0.0  # read only when the queries look like [0, 1]
    if lowest < -0.5:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"{source}: no value is below 0, but the training images reach {lowest:.2g}; if these are [0, 1] images "
                       "(as ToTensor makes them), rescale them: x * 2 - 1")  # fmt: skip
    return x


__all__ = ["DatasetView", "Target", "as_data", "as_queries", "attributable", "item_image", "resolve_data", "resolve_target"]
