"""Options several commands share, each declared once here, and the run they open.

A *run* is a checkpoint plus what reads it: wherefrom's own checkpoints name their module
and datamodule; any other Lightning checkpoint is read given ``--model.class_path`` (or
LightningCLI's saved ``_class_path``) and ``--data.class_path`` / ``--data.init_args``, and
its network, task and data are found as :mod:`wherefrom.target` describes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wherefrom.attribution.average import check_models, model_store
from wherefrom.checkpoint import load_datamodule, load_module
from wherefrom.cli.parser import ConfigArgumentParser
from wherefrom import memory
from wherefrom.datamodules.sources import IMAGE_EXTENSIONS, image_files, read_images
from wherefrom.errors import WherefromError
from wherefrom.io import load_array
from wherefrom.sampling import SchedulerType
from wherefrom.store import Store
from wherefrom.target import as_data, as_queries, check_conditions, resolve_target


def add_run(
    p: ConfigArgumentParser, ckpt_help: str = "checkpoint from `wherefrom fit` or any Lightning run (single model or ensemble)", data: bool = True,
    several: bool = False,
) -> None:
    """``--ckpt`` and how to read a checkpoint wherefrom did not write (``data``: also its training data;
    ``several``: one or more checkpoints, whose attributions are averaged)."""
    if several:
        p.add_argument("--ckpt", required=True, nargs="+", help=ckpt_help + "; several: models of one architecture, objective and data, averaged")
    else:
        p.add_argument("--ckpt", required=True, help=ckpt_help)
    g = p.add_argument_group("your own Lightning module", "for a checkpoint written without wherefrom's modules")
    g.add_argument("--model.class_path", default=None, help="its LightningModule class, e.g. my_package.MyModule (default: the one it records)")
    if data:
        g.add_argument("--data.class_path", default=None, help="its LightningDataModule or map-style Dataset class (default: the one it records)")
        g.add_argument("--data.init_args", type=dict, default=None, help="the datamodule's arguments over the saved ones, e.g. '{root: data}'")
    g.add_argument("--denoiser", default=None, help="attribute path of the network on the module, e.g. unet (default: its single diffusers UNet)")


def flag(argument: str) -> str:
    """An option spelled as a command-line flag (a :data:`~wherefrom.errors.Spell`)."""
    return "--" + argument.replace("_", "-")


def open_module(a: Any, owner: str, device: str | None = None, ckpt: str | None = None) -> Any:
    """The run's :class:`~wherefrom.model.Attributable` module, from :func:`add_run`'s options (``ckpt``: one of several)."""
    module = load_module(ckpt or a.ckpt, a.model.class_path, lambda argument: f"--model.{argument}")
    if device is not None:
        module = module.to(device)
    if a.denoiser is not None or not hasattr(module, "denoisers"):
        module = resolve_target(module, owner, a.denoiser, spell=flag)
    return module


def open_run(a: Any, owner: str, device: str | None = None, ckpt: str | None = None) -> tuple[Any, Any]:
    """The run's :class:`~wherefrom.model.Attributable` module and its training data, from :func:`add_run`'s options."""
    module = open_module(a, owner, device, ckpt)
    return module, as_data(load_datamodule(ckpt or a.ckpt, a.data.class_path, lambda argument: f"--data.{argument}", **(a.data.init_args or {})), owner)


def open_runs(a: Any, owner: str, device: str | None = None) -> tuple[list[Any], Any, list[Any]]:
    """Every ``--ckpt``'s module, the training data and each checkpoint's own data, checked to be averageable
    (:func:`~wherefrom.attribution.average.check_models`) before any work."""
    modules, datas = [], []
    a.ckpt = [a.ckpt] if isinstance(a.ckpt, str) else list(a.ckpt)  # a config file may give one path as a string
    for ckpt in a.ckpt:
        module, data = open_run(a, owner, device, ckpt)
        modules.append(module)
        datas.append(data)
    check_models(modules, datas, [f"--ckpt {c}" for c in a.ckpt])
    for module in modules:
        check_conditions(module.denoisers(), datas[0], owner)
    return modules, datas[0], datas


def add_device(p: ConfigArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_batch_size(p: ConfigArgumentParser, default: int = 64) -> None:
    p.add_argument("--batch-size", type=int, default=default)


def check_batch_size(a: Any) -> None:
    if a.batch_size < 1:
        raise WherefromError(f"--batch-size must be >= 1, got {a.batch_size}")


def add_memory(p: ConfigArgumentParser) -> None:
    p.add_argument(
        "--memory",
        default=None,
        help="working-set budget of every pass, e.g. 4GiB (default: half the free GPU memory, or 1GiB on the CPU); "
        "peak memory follows it, never --batch-size or the draws",
    )


def set_memory(a: Any) -> None:
    """Apply ``--memory`` (checked before any work)."""
    try:
        memory.set_budget(a.memory)
    except WherefromError as e:
        raise WherefromError(f"--memory: {e}") from None


def add_sampling(p: ConfigArgumentParser, what: str = "the samples", conditions: bool = True) -> None:
    """``--seed``, ``--steps``, ``--scheduler`` of seeded sampling, and (``conditions``) a conditional
    model's ``--labels`` / ``--captions`` / ``--guidance``."""
    p.add_argument("--seed", type=int, default=0, help=f"sampling seed of {what}")
    p.add_argument("--steps", type=int, default=100, help="denoising steps")
    p.add_argument("--scheduler", choices=[s.value for s in SchedulerType], default="auto", help="the sampling chain (auto: ddpm for the DDPM family, euler for flow matching and EDM)")
    if not conditions:
        return
    p.add_argument("--labels", default=None, help=f"class-conditional models: the class of each of {what}, e.g. 0,1,2 (one label: all)")
    p.add_argument("--captions", nargs="+", default=None, help=f"text-conditional models: the caption of each of {what} (one caption: all)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")


def _per_query(values: list, num: int, flag: str) -> list:
    if len(values) not in (1, num):
        raise WherefromError(f"{flag} gives {len(values)} values for {num} queries; give one per query or one for all")
    return values * num if len(values) == 1 else values


def query_conditions(a: Any, data: Any, num: int) -> dict[str, Any]:
    """``generate`` keywords for ``num`` queries' conditions: ``labels`` (``--labels``), or ``cond`` and
    ``null`` (``--captions``, embedded by the run's text datamodule), and ``guidance``."""
    out: dict[str, Any] = {} if a.guidance == 1.0 else {"guidance": a.guidance}
    if a.labels is not None and a.captions is not None:
        raise WherefromError("pass --labels (class-conditional) or --captions (text-conditional), not both")
    if a.labels is not None:
        try:
            out["labels"] = _per_query([int(v) for v in str(a.labels).split(",")], num, "--labels")
        except ValueError:
            raise WherefromError(f"--labels takes comma-separated class labels like 0,1,2, got {a.labels!r}") from None
    if a.captions is not None:
        if not hasattr(data, "embed"):
            raise WherefromError("--captions needs the run's text encoder: pass the training checkpoint (an export or a foreign run records none)")
        out["cond"], out["null"] = data.embed(_per_query(list(a.captions), num, "--captions")), data.null_condition
    return out


def condition_texts(a: Any, data: Any, conditions: dict[str, Any], num: int) -> list[str] | None:
    """Each query's condition as reports show it: its class name (the data's ``class_names``, else ``class <y>``) or caption."""
    if conditions.get("labels") is not None:
        names = getattr(data, "class_names", None)
        return [names[y] if names is not None and 0 <= y < len(names) else f"class {y}" for y in conditions["labels"]]
    return None if a.captions is None else [str(c) for c in _per_query(list(a.captions), num, "--captions")]


def query_cond(module: Any, conditions: dict[str, Any], num: int) -> Tensor | None:
    """The queries' condition tensor for an attributor, checked by a wherefrom module (present exactly when it is conditional)."""
    labels, cond = conditions.get("labels"), conditions.get("cond")
    if hasattr(module, "conditions"):
        return module.conditions(num, labels, cond)
    net = next(iter(module.denoisers().values()))
    if labels is None and cond is None and getattr(net, "class_embedding", None) is not None:
        raise WherefromError("this network is class-conditional; pass --labels (each query's class, comma-separated, or one for all)")
    if labels is None and cond is None and getattr(getattr(net, "config", None), "cross_attention_dim", None) is not None:
        raise WherefromError("this network is text-conditional; pass --captions (one per query)")
    if labels is not None:
        classes = getattr(getattr(net, "class_embedding", None), "num_embeddings", None)
        if classes is not None and not all(0 <= y < classes for y in labels):
            raise WherefromError(f"--labels must be in [0, {classes}) for this network's class embedding, got {labels}")
        return torch.tensor(labels)
    return cond


def load_queries(spec: str | list[str], datamodule) -> Tensor:
    """Query images from an array file (``samples.npy`` / ``.npz``), image files or folders of them (read as
    the training folder is: its mode, its ``image_size``), or the held-out split (``val``)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if specs == ["val"]:
        val = getattr(datamodule, "val_images", None)  # a wherefrom datamodule's held-out split
        if val is None or len(val) == 0:
            raise WherefromError("the checkpoint's datamodule has no held-out split; train with --data.val_size > 0 or pass --queries samples.npy")
        return val
    missing = [s for s in specs if not Path(s).exists()]
    if missing:
        raise WherefromError(f"queries {missing[0]!r} does not exist; pass samples.npy from `wherefrom sample`, image files, a folder of images or 'val'")
    name = f"queries {' '.join(specs)}"
    if len(specs) == 1 and Path(specs[0]).suffix in (".npy", ".npz"):
        return as_queries(load_array(specs[0], "queries"), datamodule, name)
    files = []
    for s in map(Path, specs):
        if s.is_dir():
            files += image_files(s)
        elif s.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(s)
        else:
            raise WherefromError(f"queries {str(s)!r} is neither an image ({', '.join(sorted(IMAGE_EXTENSIONS))}), a folder of images, a .npy/.npz array nor 'val'")
    if not files:
        raise WherefromError(f"{name}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the folder")
    channels, height, width = datamodule.image_shape
    if getattr(datamodule, "codec", None) is not None or channels not in (1, 3):
        raise WherefromError(f"{name}: this model works on latents ({channels} channels); pass latents as samples.npy (`wherefrom sample` writes them)")
    size = getattr(datamodule, "image_size", None)
    images = read_images(files, "L" if channels == 1 else "RGB", size, name, "resize them to one size")
    if size is None and images.shape[2:] != (height, width):
        raise WherefromError(f"{name} are {images.shape[2]} x {images.shape[3]} but the training images are {height} x {width}; resize them (or train with --data.image_size)")
    return as_queries(images, datamodule, name)


def add_config(p: Any, cls: type, skip: tuple[str, ...] = (), names: dict[str, str] | None = None) -> None:
    """One flag per field of the config dataclass ``cls`` with its default, type, choices and help (the
    field's metadata), so every front end offers the options the config defines; ``names`` renames flags."""
    names = names or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        name, help_ = flag(names.get(f.name, f.name)), f.metadata.get("help")
        if isinstance(f.default, bool):
            p.add_argument(name, action="store_true", help=help_)
            continue
        if kind := f.metadata.get("choices"):  # no type beside choices: jsonargparse would print a lambda as the type
            p.add_argument(name, choices=[getattr(k, "value", k) for k in kind], default=f.default, help=help_)
        else:
            p.add_argument(name, type=type(f.default), default=f.default, help=help_)


def config_from(a: Any, cls: type, skip: tuple[str, ...] = (), names: dict[str, str] | None = None, **fixed: Any) -> Any:
    """The config ``cls`` from :func:`add_config`'s flags (``fixed``: the skipped fields' values)."""
    names = names or {}
    given = {f.name: getattr(a, names.get(f.name, f.name)) for f in dataclasses.fields(cls) if f.name not in skip}
    return cls(**given, **fixed)


def add_overwrite(p: ConfigArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=what)


STORE_FLAGS = ("--store", "--overwrite", "--repair")  # how a store's messages name its options in every command


def add_store(p: ConfigArgumentParser, help: str) -> None:
    """``--store`` (the same flag in every command that writes or reads a store), ``--overwrite`` and ``--repair``."""
    p.add_argument("--store", required=True, help=help)
    add_overwrite(p, "replace a store made for other data, or entries made with another config or other weights (only those entries)")
    p.add_argument("--repair", action="store_true", help="recompute exactly the rows of a damaged store (truncated or corrupted files)")


def open_store(a: Any, data: Any, module: Any, several: bool = False) -> Store:
    """The store of ``--store`` for a command that writes it (``several`` models: ``module``'s sub-store,
    :func:`~wherefrom.attribution.average.model_store`), its messages naming this command's flags."""
    path = model_store(a.store, module, several)
    return Store(path, data.fingerprint, module.codes_fingerprint, overwrite=a.overwrite, repair=a.repair, names=STORE_FLAGS)


__all__ = ["STORE_FLAGS", "add_config", "config_from", "flag", "load_queries", "add_batch_size", "add_memory", "set_memory", "add_device", "add_overwrite", "add_run", "add_sampling", "add_store", "open_store", "check_batch_size", "open_module", "open_run", "open_runs", "query_cond", "query_conditions", "condition_texts"]
