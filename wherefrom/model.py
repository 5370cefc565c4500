"""DDPM training on diffusers ``UNet2DModel`` s: the shared recipe (:class:`DiffusionRecipe`) and the single model.

Also defines the small protocol every wherefrom callback and scorer relies on
(:class:`Attributable`), so users can attach the callbacks to their own modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch import Tensor, nn

from wherefrom.checkpoint import (
    check_state_dict,
    record_provenance,
    save_pretrained,
    save_task,
)
from wherefrom.errors import WherefromError
from wherefrom.sampling import EpsFn, generate, guided
from wherefrom.task import DiffusionTask, Stream, generator_for, predict

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
    """A ``UNet2DModel`` from ``DEFAULT_UNET`` updated by ``config``, initialised from ``seed``; a
    config with ``cross_attention_dim`` builds a text-conditional ``UNet2DConditionModel``."""
    cfg = {**DEFAULT_UNET, **(config or {})}
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        cfg[key] = tuple(cfg[key])
    if "out_channels" not in (config or {}):
        cfg["out_channels"] = cfg["in_channels"]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            return (UNet2DConditionModel if cfg.get("cross_attention_dim") is not None else UNet2DModel)(**cfg)
        except (TypeError, ValueError) as e:
            raise WherefromError(f"invalid UNet config {cfg}: {e}") from None


def image_shape(unet: UNet2DModel) -> tuple[int, int, int]:
    s = unet.config.sample_size
    h, w = (s, s) if isinstance(s, int) else tuple(s)
    return (unet.config.in_channels, h, w)


def check_data_shape(unet: UNet2DModel, datamodule: Any, owner: str = "DiffusionModel") -> None:
    """Raise if the datamodule's images do not fit the UNet's input."""
    shape = getattr(datamodule, "image_shape", None)
    if shape is not None and tuple(shape) != image_shape(unet):
        raise WherefromError(
            f"the data has images of shape {tuple(shape)} but the UNet expects {image_shape(unet)}; "
            f"set in_channels / sample_size of {owner}(unet=...) to match the data"
        )


def seeded_coins(p: float, seed: int, stream: Stream, index: Tensor, epoch: int, device: torch.device | str) -> Tensor:
    """One coin per row, ``True`` with probability ``p``, seeded by (seed, stream, index, epoch)."""
    return torch.tensor([bool(torch.rand(1, generator=generator_for(seed, int(stream), i, epoch)) < p) for i in index.tolist()], device=device)


def hflip(images: Tensor, index: Tensor, seed: int, epoch: int) -> Tensor:
    """Flip each image horizontally with probability 1/2, seeded by (seed, index, epoch)."""
    flips = seeded_coins(0.5, seed, Stream.AUGMENT, index, epoch, images.device)
    return torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)


class DiffusionRecipe(L.LightningModule):
    """The training recipe every wherefrom module shares: a diffusion objective (DDPM epsilon-prediction by default) on a diffusers
    ``UNet2DModel`` config, AdamW with cosine decay, seeded flips and checkpoint provenance.

    Subclasses build their networks from ``self.hparams.unet`` and implement ``training_step`` and
    ``denoisers()``; their own arguments come first and the recipe's are passed on as ``**kwargs``
    (LightningCLI lists and validates them all).

    Args:
        unet: ``UNet2DModel`` keyword arguments, merged over ``DEFAULT_UNET``.
        num_train_timesteps, beta_start, beta_end, beta_schedule: the noise schedule.
        lr, weight_decay, warmup: AdamW with cosine decay after ``warmup`` (a fraction of steps).
        hflip: random horizontal flips (seeded per index and epoch).
        seed: initialisation and the root of every seeded draw.
        num_classes: class-conditional on the batches' ``"label"`` (0..num_classes-1): the UNet gets
            ``num_class_embeds = num_classes + 1``, the last being the null class of classifier-free guidance.
        cond_dropout: the probability that a training row's label is replaced by the null class
            (seeded per index and epoch; Ho & Salimans 2022), so samples can be guided.
        base: the UNet's starting weights: a single-model wherefrom checkpoint or a diffusers export
            folder, loaded when training starts (default: initialised from ``seed``). A trained
            checkpoint holds every weight, so it reloads without this file.
        lora: fine-tune LoRA adapters on the frozen base instead of every weight (:mod:`wherefrom.lora`):
            ``{r: 4, alpha: 4, target_modules: [to_q, to_k, to_v, to_out.0]}`` (keys optional).
        clip_sample: sampling clips each predicted x0 to [-1, 1]; a latent model (the data's ``vae``)
            needs ``false``, as latents are unbounded.
        objective: what the network is trained to predict (:mod:`wherefrom.objective`): ``epsilon``,
            ``v_prediction`` or ``sample`` (x0) on the schedule above; ``flow_matching`` or ``edm`` with their
            defaults; or ``{type: flow_matching, shift: 3.0, density: logit_normal}``-style settings
            (``type``: ``ddpm``, ``flow_matching`` or ``edm``; the rest are that objective's arguments).
    """

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
        num_classes: int | None = None,
        cond_dropout: float = 0.1,
        base: str | None = None,
        lora: dict[str, Any] | None = None,
        clip_sample: bool = True,
        objective: str | dict[str, Any] = "epsilon",
    ) -> None:
        super().__init__()
        if not 0 <= warmup < 1:
            raise WherefromError(f"warmup is a fraction of the training steps in [0, 1), got {warmup}")
        if num_classes is not None and num_classes < 1:
            raise WherefromError(f"num_classes must be >= 1 (or unset for an unconditional model), got {num_classes}")
        if not 0 <= cond_dropout < 1:
            raise WherefromError(f"cond_dropout is a probability in [0, 1), got {cond_dropout}")
        keys = {k for k in ("num_class_embeds", "class_embed_type", "projection_class_embeddings_input_dim") if (unet or {}).get(k) is not None}
        if keys:
            model = type(self).__name__
            raise WherefromError(f"{model}(unet=...) sets {sorted(keys)[0]}: class conditioning is set by {model}(num_classes=...) (it adds the null class of guidance)")
        if num_classes is not None and (unet or {}).get("cross_attention_dim") is not None:
            raise WherefromError(f"{type(self).__name__}(num_classes=...) is for UNet2DModel; a text-conditional UNet (cross_attention_dim) is conditioned by captions")
        self.save_hyperparameters()  # with the subclass's own arguments (Lightning reads the calling frames)
        self.task = DiffusionTask(num_train_timesteps, beta_start, beta_end, beta_schedule, seed=seed, objective=objective)
        self._null_text: Tensor | None = None  # a text model's empty-caption embedding, from its data in setup
        self._weights_set = False  # restored from a checkpoint, or the base already loaded

    def denoisers(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    @property
    def unet_config(self) -> dict[str, Any]:
        """The networks' ``UNet2DModel`` arguments (with the class embeddings of a conditional model)."""
        config = dict(self.hparams.unet or {})
        if self.hparams.num_classes is not None:
            config["num_class_embeds"] = self.hparams.num_classes + 1
        return config

    def network(self, seed: int) -> UNet2DModel:
        """A UNet of the recipe initialised from ``seed``, with a LoRA adapter seeded by ``seed`` when ``lora`` is set."""
        from wherefrom.lora import add_lora

        net = build_unet(self.unet_config, seed)
        return net if self.hparams.lora is None else add_lora(net, self.hparams.lora, seed)

    def load_base(self) -> None:
        """Copy the ``base`` weights into every network (LoRA: under the adapters)."""
        from wherefrom.lora import load_base, read_base

        state = read_base(self.hparams.base)
        for net in self.denoisers().values():
            load_base(net, state, self.hparams.base)

    @property
    def is_conditional(self) -> bool:
        """Whether the model takes a condition (class labels or captions)."""
        return self.hparams.num_classes is not None or self.is_text

    @property
    def is_text(self) -> bool:
        """Whether the networks are text-conditional ``UNet2DConditionModel`` s."""
        return isinstance(next(iter(self.denoisers().values())), UNet2DConditionModel)

    @property
    def null_condition(self) -> Tensor | None:
        """The null condition of classifier-free guidance: the null class, or (while training a text
        model) the empty caption's embedding; ``None`` otherwise."""
        if self.hparams.num_classes is not None:
            return torch.tensor(self.hparams.num_classes)
        return self._null_text

    def conditions(self, num_samples: int, labels: Sequence[int] | Tensor | None = None, cond: Tensor | None = None) -> Tensor | None:
        """The checked conditions of ``num_samples`` queries: class ``labels`` for a class-conditional model,
        caption embeddings ``cond`` (``B x L x D``) for a text-conditional one, neither otherwise."""
        if self.is_text:
            if cond is None or len(cond) != num_samples:
                raise WherefromError(f"this model is text-conditional; pass one caption per sample ({num_samples})")
            return cond
        if cond is not None:
            raise WherefromError("captions are for text-conditional models (a UNet with cross_attention_dim); this one is not")
        return self.labels(labels, num_samples)

    def labels(self, labels: Sequence[int] | Tensor | None, num_samples: int) -> Tensor | None:
        """Checked class labels of ``num_samples`` queries (one label repeats); ``None`` when unconditional."""
        k = self.hparams.num_classes
        if k is None:
            if labels is not None:
                raise WherefromError(f"this model is unconditional; drop the labels (train with {type(self).__name__}(num_classes=...) for a class-conditional one)")
            return None
        if labels is None:
            raise WherefromError(f"this model is class-conditional ({k} classes); pass a label per sample (or one for all)")
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if len(labels) == 1:
            labels = labels.expand(num_samples)
        if len(labels) != num_samples or labels.min() < 0 or labels.max() >= k:
            raise WherefromError(f"need {num_samples} labels in [0, {k}) (or one for all), got {labels.tolist()[:8]}")
        return labels

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        model, data = type(self).__name__, type(dm).__name__
        check_data_shape(next(iter(self.denoisers().values())), dm, model)
        if self.hparams.num_classes is not None and not getattr(dm, "conditional", False):
            raise WherefromError(f"the model is class-conditional ({self.hparams.num_classes} classes) but the data yields no labels; pass {data}(conditional=True)")
        if self.is_text:
            if getattr(dm, "text_encoder", None) is None:
                raise WherefromError(f"the UNet is text-conditional (cross_attention_dim) but the data has no captions; pass {data}(captions=...) and {data}(text_encoder=...)")
            self._null_text = dm.null_condition  # condition dropout's target
        elif getattr(dm, "text_encoder", None) is not None:
            raise WherefromError(f"the data has captions but the UNet takes no text; give {model}(unet=...) a cross_attention_dim (a UNet2DConditionModel) or drop {data}(captions=...)")
        if self.hparams.num_classes is None and getattr(dm, "conditional", False):
            raise WherefromError(f"the data yields class labels but the model is unconditional; pass {model}(num_classes=...) or drop {data}(conditional=...)")
        if getattr(dm, "vae", None) is not None and self.hparams.clip_sample:
            raise WherefromError(f"latents are unbounded: a latent model ({data}(vae=...)) needs {model}(clip_sample=False)")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return image_shape(next(iter(self.denoisers().values())))

    def batch(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(x0, index, cond)`` of a training batch: flipped when ``hflip`` is set; the rows' labels (or
        caption embeddings) dropped to the null condition with probability ``cond_dropout`` (``None``
        when unconditional)."""
        x0, index = batch["image"], batch["index"]
        if self.hparams.hflip:
            x0 = hflip(x0, index, self.task.seed, self.current_epoch)
        cond = batch.get("cond") if self.is_text else batch.get("label") if self.hparams.num_classes is not None else None
        if cond is None:
            return x0, index, None
        drop = seeded_coins(self.hparams.cond_dropout, self.task.seed, Stream.CONDITION, index, self.current_epoch, cond.device)
        null = self.null_condition.to(cond.device)
        return x0, index, torch.where(drop.view(-1, *[1] * (cond.dim() - 1)), null, cond)

    def configure_optimizers(self):
        """AdamW with linear warmup then cosine decay over the whole run (D-TRAK recipe)."""
        h = self.hparams
        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=h.lr, weight_decay=h.weight_decay)
        total = self.trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) else 10_000
        sched = get_cosine_schedule_with_warmup(opt, int(h.warmup * total), max(total, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        # a fresh run starts from the base; a restored or reloaded one (ckpt_path, load_module) holds its weights
        if self.hparams.base is not None and not self._weights_set:
            self.load_base()
        self._weights_set = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record_provenance(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_state_dict(self, checkpoint)
        self._weights_set = True


class DiffusionModel(DiffusionRecipe):
    """A single DDPM denoiser; the arguments are the recipe's (:class:`DiffusionRecipe`)."""

    codes_fingerprint = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unet = self.network(self.hparams.seed)

    def denoisers(self) -> dict[str, nn.Module]:
        return {"model": self.unet}

    def eps_fn(self, guidance: float = 1.0, null: Tensor | None = None) -> EpsFn:
        """``(x_t, t[, cond]) -> eps`` for the sampler, with classifier-free ``guidance`` towards ``null``
        (default: :attr:`null_condition`)."""
        return guided(lambda x, t, cond=None: predict(self.unet, x, t, cond), guidance, self.null_condition if null is None else null)

    @torch.no_grad()
    def generate(
        self,
        num_samples: int,
        seed: int = 0,
        labels: Sequence[int] | Tensor | None = None,
        guidance: float = 1.0,
        cond: Tensor | None = None,
        null: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Samples for queries ``0..num_samples-1``: of class ``labels[q]``, or for caption embedding
        ``cond[q]`` (guided towards the empty caption's ``null``), for a conditional model
        (see :func:`wherefrom.sampling.generate`)."""
        cond = self.conditions(num_samples, labels, cond)
        kwargs = {"clip_sample": self.hparams.clip_sample, **kwargs}
        return generate(self.eps_fn(guidance, null), self.task, self.image_shape, num_samples, seed, device=self.device, cond=cond, **kwargs)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x0, index, cond = self.batch(batch)
        loss = self.task.loss(self.unet, x0, index, draw=self.current_epoch, cond=cond).mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(index), sync_dist=True)
        return loss

    def save_pretrained(self, path: str | Path) -> None:
        """Export the UNet in diffusers format plus the task config (``wherefrom_task.json``); a LoRA
        model exports its adapter (:func:`wherefrom.lora.save_adapter`) beside the task config."""
        if self.hparams.lora is None:
            return save_pretrained(self.unet, self.task, path)
        from wherefrom.lora import save_adapter

        save_task(self.task, save_adapter(self.unet, self.hparams.lora, path))
