"""Reading and writing checkpoints: wherefrom's own and any Lightning module's.

A checkpoint written through a wherefrom module records its class and datamodule
(:func:`record_provenance`), so every command rebuilds both from the file alone. Any
other Lightning checkpoint is rebuilt from its saved ``hyper_parameters`` given the
class: ``class_path``, else the ``_class_path`` LightningCLI saves beside the
hyperparameters in subclass mode. A plain ``LightningCLI(MyModule, MyData)``
records no class (only ``_instantiator``; its ``config.yaml`` holds the arguments alone),
so its checkpoints need the class given.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from wherefrom.errors import CheckpointError, Spell, WherefromError, keyword, one_line
from wherefrom.io import write_json

if TYPE_CHECKING:
    import lightning as L

CLASS_KEY, DATAMODULE_KEY = "wherefrom_class", "wherefrom_datamodule"
TASK_FILE = "wherefrom_task.json"  # an export's noise schedule, beside the diffusers weights


def class_path(obj: Any) -> str:
    """``module.QualName`` of ``obj``'s class."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def import_class(path: str, flag: str = "class_path") -> type:
    """The class (or any attribute) at ``package.module.Name``; ``flag`` names the option in the error."""
    mod, _, name = path.rpartition(".")
    try:
        obj = importlib.import_module(mod)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as e:
        raise WherefromError(f"cannot import {flag} {path!r} ({one_line(e)}); give its full dotted path, importable from here") from None
    return obj


def init_args(hparams: dict[str, Any]) -> dict[str, Any]:
    """Saved hyperparameters minus LightningCLI's private keys (``_class_path``, ``_instantiator``)."""
    return {k: v for k, v in dict(hparams).items() if not k.startswith("_")}


def record_provenance(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Store the module class and the datamodule (class, init args) so any
    wherefrom command can rebuild both from the checkpoint alone."""
    checkpoint[CLASS_KEY] = class_path(module)
    dm = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    if dm is not None:
        checkpoint[DATAMODULE_KEY] = {"class": class_path(dm), "init_args": dict(getattr(dm, "hparams", {}))}


def check_state_dict(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Raise a clear error when a checkpoint's weights do not fit ``module``."""
    mine = module.state_dict()
    theirs = checkpoint.get("state_dict", {})
    missing = sorted(set(mine) - set(theirs))
    extra = sorted(set(theirs) - set(mine))
    wrong = sorted(k for k in set(mine) & set(theirs) if mine[k].shape != theirs[k].shape)
    if missing or extra or wrong:
        example = (missing or extra or wrong)[0]
        raise CheckpointError(
            f"checkpoint is from another architecture ({len(missing)} missing, {len(extra)} unexpected, "
            f"{len(wrong)} mis-shaped weights, e.g. {example!r}); use the config it was trained with"
        )


def _plain_cli(hparams: dict[str, Any]) -> str:
    """Why a LightningCLI checkpoint names no class: a plain ``LightningCLI(MyModule, ...)`` saves ``_instantiator`` only."""
    return " (a plain LightningCLI(YourModule, ...) run records no class, only its arguments)" if "_instantiator" in hparams else ""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint's dict, on the CPU (one-line error for a missing or foreign file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass the .ckpt written by `wherefrom fit` or your Trainer")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(f"cannot read checkpoint {str(path)!r} ({type(e).__name__}: {one_line(e)})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{str(path)!r} holds a {type(ckpt).__name__}, not a Lightning checkpoint; pass the .ckpt written by `wherefrom fit` or your Trainer")
    return ckpt


def _construct(cls: type, kwargs: dict[str, Any], path: str | Path, what: str) -> Any:
    try:
        return cls(**kwargs)
    except WherefromError:
        raise
    except TypeError as e:
        raise CheckpointError(
            f"cannot rebuild {cls.__qualname__} from the {what} saved in {str(path)!r} ({one_line(e)}); "
            "call self.save_hyperparameters() in its __init__ so the checkpoint records its arguments"
        ) from None


def load_module(path: str | Path, class_path: str | None = None, spell: Spell | None = None) -> L.LightningModule:
    """Rebuild the LightningModule of a checkpoint, in eval mode.

    The class is ``class_path``, else the one a wherefrom module recorded, else LightningCLI's
    ``_class_path``; it is built from the saved ``hyper_parameters`` and given the weights
    (after its ``on_load_checkpoint``, as Lightning's loader does). ``spell`` writes
    ``class_path`` in messages (default: as this function's keyword argument).
    """
    o = spell or keyword("load_module")
    import lightning as L  # on first use: a missing or foreign file is refused without it

    ckpt = read_checkpoint(path)
    hparams = ckpt.get("hyper_parameters", {}) or {}
    name = class_path or ckpt.get(CLASS_KEY) or hparams.get("_class_path")
    if name is None:
        raise CheckpointError(f"{str(path)!r} does not say which LightningModule wrote it{_plain_cli(hparams)}; pass {o('class_path')} your_package.YourModule")
    cls = import_class(name, o("class_path"))
    if not (isinstance(cls, type) and issubclass(cls, L.LightningModule)):
        raise WherefromError(f"{o('class_path')} {name!r} is not a LightningModule class")
    module = _construct(cls, init_args(hparams), path, "hyper_parameters")
    module.on_load_checkpoint(ckpt)  # wherefrom's modules check the architecture and restore codes here
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"the weights in {str(path)!r} do not fit {name} ({one_line(e)}); pass the class and settings it was trained with") from None
    return module.eval()


def load_datamodule(path: str | Path, class_path: str | None = None, spell: Spell | None = None, **overrides: Any) -> Any:
    """The datamodule a checkpoint was trained with (``overrides`` replace init args).

    A wherefrom run records it; otherwise ``class_path`` (or LightningCLI's ``_class_path``), a
    LightningDataModule or a map-style Dataset class, is built from the checkpoint's
    ``datamodule_hyper_parameters`` and ``overrides``. ``spell`` writes ``class_path`` and
    ``init_args`` (the overrides) in messages.
    """
    o = spell or (lambda argument: "load_datamodule(..., **overrides)" if argument == "init_args" else f"load_datamodule(..., {argument}=...)")
    import lightning as L

    ckpt = read_checkpoint(path)
    info = ckpt.get(DATAMODULE_KEY)
    if info is not None and class_path is None:
        return _construct(import_class(info["class"]), {**init_args(info["init_args"]), **overrides}, path, "datamodule settings")
    hparams = ckpt.get(L.LightningDataModule.CHECKPOINT_HYPER_PARAMS_KEY, {}) or {}
    name = class_path or hparams.get("_class_path")
    if name is None:
        raise CheckpointError(f"{str(path)!r} records no datamodule{_plain_cli(hparams)}; pass {o('class_path')} your_package.YourDataModule (and {o('init_args')})")
    cls = import_class(name, o("class_path"))
    if not (isinstance(cls, type) and issubclass(cls, (L.LightningDataModule, Dataset))):
        raise WherefromError(f"{o('class_path')} {name!r} is neither a LightningDataModule nor a Dataset class")
    return _construct(cls, {**init_args(hparams), **overrides}, path, "datamodule_hyper_parameters")


def save_task(task: Any, path: str | Path) -> None:
    """The task config beside an export's weights (:data:`TASK_FILE`)."""
    write_json(Path(path) / TASK_FILE, task.config)


def save_pretrained(unet: nn.Module, task: Any, path: str | Path) -> None:
    """A diffusers-format UNet folder plus the task config (:data:`TASK_FILE`)."""
    unet.save_pretrained(path)
    save_task(task, path)


def load_pretrained(path: str | Path):
    """The ``(UNet, DiffusionTask)`` of a folder written by :func:`save_pretrained`: a ``UNet2DModel``
    or, as its config names it, a text-conditional ``UNet2DConditionModel``."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    from wherefrom.task import DiffusionTask

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{str(path)!r} is not a diffusers UNet folder (no config.json); pass a folder written by `wherefrom export`")
    task_file = path / TASK_FILE
    task = DiffusionTask(**json.loads(task_file.read_text())) if task_file.is_file() else DiffusionTask()
    name = json.loads((path / "config.json").read_text()).get("_class_name")
    try:
        return (UNet2DConditionModel if name == "UNet2DConditionModel" else UNet2DModel).from_pretrained(path).eval(), task
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot load the diffusers UNet in {str(path)!r} ({one_line(e)})") from None


__all__ = [
    "check_state_dict",
    "class_path",
    "import_class",
    "init_args",
    "load_datamodule",
    "load_module",
    "load_pretrained",
    "read_checkpoint",
    "record_provenance",
    "save_pretrained",
]
