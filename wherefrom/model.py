"""Single-model DDPM training: a LightningModule around a diffusers ``UNet2DModel``.

Also defines the small protocol every wherefrom callback and scorer relies on
(:class:`Attributable`), so users can attach the callbacks to their own modules.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from diffusers import UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch import Tensor, nn

from wherefrom.errors import CheckpointError, WherefromError, one_line
from wherefrom.sampling import EpsFn, generate
from wherefrom.task import DiffusionTask, Stream, generator_for, predict_eps

# A small UNet for 8x8 digits: 8 -> 4, attention at the lowest resolution.
DEFAULT_UNET: dict[str, Any] = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=16,
)


@runtime_checkable
class Attributable(Protocol):
    """What wherefrom's callbacks and scorers need from a LightningModule.

    ``task`` is the module's :class:`DiffusionTask`; ``denoisers()`` maps each
    TRAK "model id" to a network ``(x_t, t) -> eps`` (one entry for a single
    model, one per member for an ensemble). ``codes_fingerprint`` is ``None``
    unless the module is an encoded ensemble.
    """

    task: DiffusionTask
    codes_fingerprint: str | None

    def denoisers(self) -> dict[str, nn.Module]: ...


def build_unet(config: dict[str, Any] | None, seed: int) -> UNet2DModel:
    """A ``UNet2DModel`` from ``DEFAULT_UNET`` updated by ``config``, initialised from ``seed``."""
    cfg = {**DEFAULT_UNET, **(config or {})}
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        cfg[key] = tuple(cfg[key])
    if "out_channels" not in (config or {}):
        cfg["out_channels"] = cfg["in_channels"]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            return UNet2DModel(**cfg)
        except (TypeError, ValueError) as e:
            raise WherefromError(f"invalid UNet config {cfg}: {e}") from None


def image_shape(unet: UNet2DModel) -> tuple[int, int, int]:
    s = unet.config.sample_size
    h, w = (s, s) if isinstance(s, int) else tuple(s)
    return (unet.config.in_channels, h, w)


def check_data_shape(unet: UNet2DModel, datamodule: Any) -> None:
    """Raise if the datamodule's images do not fit the UNet's input."""
    shape = getattr(datamodule, "image_shape", None)
    if shape is not None and tuple(shape) != image_shape(unet):
        raise WherefromError(
            f"the data has images of shape {tuple(shape)} but the UNet expects {image_shape(unet)}; "
            "set --model.unet.in_channels / sample_size to match the data"
        )


def hflip(images: Tensor, index: Tensor, seed: int, epoch: int) -> Tensor:
    """Flip each image horizontally with probability 1/2, seeded by (seed, index, epoch)."""
    flips = torch.tensor(
        [bool(torch.rand(1, generator=generator_for(seed, int(Stream.AUGMENT), i, epoch)) < 0.5) for i in index.tolist()],
        device=images.device,
    )
    return torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)


def configure_adamw_cosine(module: L.LightningModule, params, lr: float, weight_decay: float, warmup: float):
    """AdamW with linear warmup then cosine decay over the whole run (D-TRAK recipe)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = module.trainer.estimated_stepping_batches
    total = int(total) if math.isfinite(total) else 10_000
    sched = get_cosine_schedule_with_warmup(opt, int(warmup * total), max(total, 1))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class DiffusionModel(L.LightningModule):
    """DDPM epsilon-prediction with a diffusers ``UNet2DModel``.

    Args:
        unet: ``UNet2DModel`` keyword arguments, merged over ``DEFAULT_UNET``.
        num_train_timesteps, beta_start, beta_end, beta_schedule: the noise schedule.
        lr, weight_decay, warmup: AdamW with cosine decay after ``warmup`` (a fraction of steps).
        hflip: random horizontal flips (seeded per index and epoch).
        seed: initialisation and the root of every seeded draw.
    """

    codes_fingerprint = None

    def __init__(
        self,
        unet: dict[str, Any] | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        lr: float = 1e-4,
        weight_decay: float = 1e-6,
        warmup: float = 0.1,
        hflip: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= warmup < 1:
            raise WherefromError(f"warmup is a fraction of the training steps in [0, 1), got {warmup}")
        self.save_hyperparameters()
        self.task = DiffusionTask(num_train_timesteps, beta_start, beta_end, beta_schedule, seed=seed)
        self.unet = build_unet(unet, seed)

    def denoisers(self) -> dict[str, nn.Module]:
        return {"model": self.unet}

    def eps_fn(self) -> EpsFn:
        """``(x_t, t) -> eps`` for the sampler."""
        return lambda x, t: predict_eps(self.unet, x, t)

    @torch.no_grad()
    def generate(self, num_samples: int, seed: int = 0, **kwargs: Any) -> Tensor:
        """Samples for queries ``0..num_samples-1`` (see :func:`wherefrom.sampling.generate`)."""
        return generate(self.eps_fn(), self.task, self.image_shape, num_samples, seed, device=self.device, **kwargs)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return image_shape(self.unet)

    def setup(self, stage: str) -> None:
        check_data_shape(self.unet, getattr(self.trainer, "datamodule", None))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x0, index = batch["image"], batch["index"]
        if self.hparams.hflip:
            x0 = hflip(x0, index, self.task.seed, self.current_epoch)
        loss = self.task.loss(self.unet, x0, index, draw=self.current_epoch).mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(index), sync_dist=True)
        return loss

    def configure_optimizers(self):
        h = self.hparams
        return configure_adamw_cosine(self, self.unet.parameters(), h.lr, h.weight_decay, h.warmup)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record_provenance(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_state_dict(self, checkpoint)

    def save_pretrained(self, path: str | Path) -> None:
        """Export the UNet in diffusers format plus the task config (``wherefrom_task.json``)."""
        save_pretrained(self.unet, self.task, path)


# --- checkpoints ------------------------------------------------------------------


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def record_provenance(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Store the module class and the datamodule (class, init args) so any
    wherefrom command can rebuild both from the checkpoint alone."""
    checkpoint["wherefrom_class"] = _class_path(module)
    dm = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    if dm is not None:
        checkpoint["wherefrom_datamodule"] = {"class": _class_path(dm), "init_args": dict(getattr(dm, "hparams", {}))}


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


def _import(path: str) -> type:
    import importlib

    mod, _, name = path.rpartition(".")
    obj = importlib.import_module(mod)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _init_args(hparams: dict[str, Any]) -> dict[str, Any]:
    """Saved hyperparameters minus LightningCLI's private keys (``_class_path``...)."""
    return {k: v for k, v in dict(hparams).items() if not k.startswith("_")}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass the .ckpt written by `wherefrom fit`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(f"cannot read checkpoint {str(path)!r} ({type(e).__name__}: {one_line(e)})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{str(path)!r} holds a {type(ckpt).__name__}, not a Lightning checkpoint; pass the .ckpt written by `wherefrom fit`")
    return ckpt


def load_module(path: str | Path) -> L.LightningModule:
    """Rebuild a wherefrom LightningModule (single model or ensemble) from a checkpoint, in eval mode."""
    ckpt = read_checkpoint(path)
    if "wherefrom_class" not in ckpt:
        raise CheckpointError(f"{str(path)!r} was not written by a wherefrom module; pass a checkpoint from `wherefrom fit`")
    cls = _import(ckpt["wherefrom_class"])
    module = cls(**_init_args(ckpt.get("hyper_parameters", {})))
    module.on_load_checkpoint(ckpt)  # as in Lightning's loader: check_state_dict, plus extra state (ensemble codes)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def load_datamodule(path: str | Path, **overrides: Any) -> L.LightningDataModule:
    """The datamodule a checkpoint was trained with (``overrides`` replace init args)."""
    ckpt = read_checkpoint(path)
    info = ckpt.get("wherefrom_datamodule")
    if info is None:
        raise CheckpointError(f"{str(path)!r} records no datamodule; it was not trained through `wherefrom fit` with a wherefrom datamodule")
    return _import(info["class"])(**{**_init_args(info["init_args"]), **overrides})


def save_pretrained(unet: UNet2DModel, task: DiffusionTask, path: str | Path) -> None:
    import json

    path = Path(path)
    unet.save_pretrained(path)
    (path / "wherefrom_task.json").write_text(json.dumps(task.config, indent=2))


def load_pretrained(path: str | Path) -> tuple[UNet2DModel, DiffusionTask]:
    """Load a diffusers-format export made by :func:`save_pretrained`."""
    import json

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{str(path)!r} is not a diffusers UNet2DModel folder (no config.json)")
    task_file = path / "wherefrom_task.json"
    task = DiffusionTask(**json.loads(task_file.read_text())) if task_file.is_file() else DiffusionTask()
    return UNet2DModel.from_pretrained(path).eval(), task

