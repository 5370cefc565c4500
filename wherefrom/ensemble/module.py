"""The encoded-ensemble LightningModule (Dai, Yew & Gifford, "Where did you learn that?").

``n`` members share one ``UNet2DModel`` architecture, each initialised from
its own seed ``mix_seed(seed, i)``. Every batch is routed by the codes: member
``i`` runs forward and backward on ``batch[bits[:, i]]`` only, so it never sees
another image, and one pass over the data is one epoch for every member.

Loss: ``sum_i mean_{rows of i} L``, so member ``i``'s gradient is the one it
would get training alone on those rows. Under DDP the mean is over member
``i``'s rows in the *global* batch (the row counts are all-reduced each step),
so results do not depend on the number of ranks. The one AdamW optimizer is
per-parameter, hence per member exactly the optimizer of a lone run; members
with no rows in a step keep ``grad = None`` and are not stepped (no momentum
drift, no weight decay), as in a lone run that never saw that batch.

DDP with idle members: a member with no rows on a rank adds ``0 * sum(params)``
to the loss instead of a forward pass, so plain ``strategy="ddp"`` works (DDP
expects a gradient for every parameter on every rank). We prefer this to
``ddp_find_unused_parameters_true``, which walks the autograd graph every step
and makes a plain ``ddp`` config fail at the first idle member; the zero
gradients of members idle on *all* ranks are reset to ``None`` before the step.

``member=i`` trains member ``i`` alone on its split (scale-out: one job per
member); :func:`assemble` joins such checkpoints after checking that they share
the codes fingerprint.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn

from wherefrom.checkpoint import CLASS_KEY, DATAMODULE_KEY, init_args, read_checkpoint
from wherefrom.ensemble.codes import Codes, code_weight
from wherefrom.ensemble.sampler import EnsembleSampler
from wherefrom.errors import CheckpointError, FingerprintMismatchError, WherefromError
from wherefrom.io import atomic_path
from wherefrom.model import DiffusionRecipe, build_unet
from wherefrom.task import mix_seed

CODES_KEY = "wherefrom_codes"


def member_seed(seed: int, member: int) -> int:
    """Initialisation seed of member ``member``."""
    return mix_seed(seed, member)


class EncodedEnsemble(DiffusionRecipe):
    """An encoded ensemble of ``n`` DDPM denoisers; implements :class:`~wherefrom.model.Attributable`.

    Args:
        n: number of members.
        w: code weight, the number of members that train on each image (default ``n // 2``);
            an epoch costs about ``w`` single-model epochs.
        member: train only this member, on its split (``None``: the whole ensemble).
        **kwargs: the training recipe (:class:`~wherefrom.model.DiffusionRecipe`: ``unet``, the noise
            schedule, ``lr``/``weight_decay``/``warmup``, ``hflip``, and ``seed``, which also seeds the codes).
    """

    def __init__(self, n: int = 8, w: int | None = None, member: int | None = None, **kwargs: Any) -> None:
        weight = code_weight(n, w)
        if member is not None and not 0 <= member < n:
            raise WherefromError(f"member must be in [0, n) = [0, {n}), got {member}")
        super().__init__(**kwargs)
        self.w = weight
        seed = self.hparams.seed
        self.member_ids = list(range(n)) if member is None else [member]
        self.members = nn.ModuleDict({f"member{i}": net for i, net in zip(self.member_ids, self.networks(seed))})
        self.codes: Codes | None = None
        self._stepped = torch.zeros(len(self.member_ids), dtype=torch.bool)

    def networks(self, seed: int) -> list[nn.Module]:
        """The members: independent UNets initialised from ``member_seed(seed, i)``, or with ``lora``,
        adapters seeded by ``member_seed(seed, i)`` on one frozen base whose tensors they share."""
        if self.hparams.lora is None:
            return [self.network(member_seed(seed, i)) for i in self.member_ids]
        from wherefrom.lora import add_lora, share_frozen

        base = build_unet(self.unet_config, seed).requires_grad_(False)
        members = [add_lora(copy.deepcopy(base), self.hparams.lora, member_seed(seed, i)) for i in self.member_ids]
        for net in members:
            share_frozen(net, base)
        return members

    # --- Attributable ---------------------------------------------------------
    @property
    def codes_fingerprint(self) -> str | None:
        return None if self.codes is None else self.codes.fingerprint

    def denoisers(self) -> dict[str, nn.Module]:
        """``{"member0": unet0, ...}`` (only the trained member when ``member`` is set)."""
        return dict(self.members.items())

    def members_of(self, index: int) -> list[int]:
        """``S(x)``: the members that trained on global index ``index``."""
        return self._codes().members_of(index)

    def _codes(self) -> Codes:
        if self.codes is None:
            raise WherefromError("the ensemble has no codes yet; train it (`wherefrom fit`) or load its checkpoint")
        return self.codes

    # --- data ------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Assign codes to the datamodule's training split; with ``member`` set, restrict the
        datamodule to that member's split (the codes always cover the full split)."""
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "indices"):
            raise WherefromError("an EncodedEnsemble needs a wherefrom ImageDataModule (codes are keyed by global index); train it with one")
        super().setup(stage)  # shapes and conditioning
        member = self.hparams.member
        if member is not None and self.codes is not None and np.array_equal(dm.indices, self.codes.split(member)):
            return  # restricted by an earlier setup of this module
        groups = getattr(dm, "group_ids", None)
        codes = Codes.generate(dm.indices, self.hparams.n, self.w, self.hparams.seed, dm.fingerprint, None if groups is None else groups[dm.indices])
        if self.codes is not None and self.codes.fingerprint != codes.fingerprint:
            raise FingerprintMismatchError(
                f"this ensemble's codes ({self.codes.fingerprint}) were made for another split than the datamodule's "
                f"({codes.fingerprint}); use the data settings it was trained with"
            )
        self.codes = codes
        if member is not None:
            dm.indices = codes.split(member)

    # --- training ----------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x0, index, cond = self.batch(batch)
        bits = self._codes().membership(index)[:, self.member_ids]
        # rows of each member in the global batch (sums reduce correctly under DDP)
        total = self.trainer.strategy.reduce(bits.sum(0), reduce_op="sum")
        ddp = isinstance(self.trainer.strategy, DDPStrategy)
        loss, row_losses = x0.new_zeros(()), []
        for j, unet in enumerate(self.members.values()):
            mask = bits[:, j]
            if mask.any():
                # seeded draws keyed by (index, epoch): the member alone on these rows draws the same (t, eps)
                per_row = self.task.loss(unet, x0[mask], index[mask], draw=self.current_epoch, cond=None if cond is None else cond[mask])
                # DDP averages gradients over ranks, hence * world_size: the mean over the global batch's rows
                loss = loss + per_row.sum() * self.trainer.world_size / total[j]
                row_losses.append(per_row.detach())
            elif ddp:
                # DDP needs a gradient for every parameter on every rank; a zero one costs no forward pass
                loss = loss + 0.0 * sum(p.sum() for p in unet.parameters())
        self._stepped = self._stepped.to(total.device) | (total > 0)
        pairs = torch.cat(row_losses)
        self.log("train/loss", pairs.mean(), prog_bar=True, on_step=True, on_epoch=True, batch_size=len(pairs), sync_dist=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # a member with no rows since the last step must not move (AdamW would apply momentum and
        # weight decay to a zero gradient); grad=None makes AdamW skip it, like a lone run
        for j, unet in enumerate(self.members.values()):
            if not self._stepped[j]:
                for p in unet.parameters():
                    p.grad = None
        self._stepped.zero_()

    # --- checkpoints ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.codes is not None:
            checkpoint[CODES_KEY] = self.codes.state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if CODES_KEY not in checkpoint:
            return
        codes = Codes.from_state(checkpoint[CODES_KEY])
        if self.codes is not None and self.codes.fingerprint != codes.fingerprint:
            raise FingerprintMismatchError(
                f"the checkpoint's codes ({codes.fingerprint}) differ from this run's ({self.codes.fingerprint}); "
                "resume with the data settings, n, w and seed it was trained with"
            )
        self.codes = codes

    # --- sampling ------------------------------------------------------------------
    def sampler(self, **kwargs: Any) -> EnsembleSampler:
        """An :class:`EnsembleSampler` over the members (``kwargs``: seed, steps, scheduler, cond, guidance, ...)."""
        codes = self.codes if self.hparams.member is None else None
        kwargs = {"device": self.device, "dtype": self.dtype, "null": self.null_condition, "clip_sample": self.hparams.clip_sample, **kwargs}
        return EnsembleSampler(list(self.members.values()), self.task, self.image_shape, codes, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        num_samples: int,
        seed: int = 0,
        steps: int = 100,
        scheduler: str = "auto",
        batch_size: int = 256,
        progress: bool = False,
        weights: Tensor | None = None,
        labels: Sequence[int] | Tensor | None = None,
        guidance: float = 1.0,
        cond: Tensor | None = None,
        null: Tensor | None = None,
    ) -> Tensor:
        """Samples for queries ``0..num_samples-1`` with member ``weights`` (default uniform); for a
        conditional ensemble of class ``labels[q]`` or caption embedding ``cond[q]``, with classifier-free
        ``guidance`` (towards ``null``, a text ensemble's empty caption)."""
        cond = self.conditions(num_samples, labels, cond)
        extra = {} if null is None else {"null": null}
        sampler = self.sampler(seed=seed, steps=steps, scheduler=scheduler, cond=cond, guidance=guidance, **extra)
        return sampler.generate(num_samples, weights, batch_size, progress)

    def ablation_weights(self, indices: Sequence[int]) -> Tensor:
        """Uniform weights over the members that saw none of ``indices`` (exact ablation)."""
        if self.hparams.member is not None:
            raise WherefromError("this checkpoint holds a single member; assemble the ensemble (`wherefrom ensemble assemble`) to ablate")
        return self.sampler().ablation_weights(indices)


# --- assembly of per-member runs ----------------------------------------------------


def assemble(member_ckpts: Sequence[str | Path], out: str | Path) -> Path:
    """Join per-member checkpoints (``member=i`` runs) into one ensemble checkpoint at ``out``.

    All members must share the codes fingerprint (same codes, same data split),
    the hyperparameters other than ``member``, and the datamodule; each member
    ``0..n-1`` must appear exactly once.
    """
    if not member_ckpts:
        raise WherefromError("pass the member checkpoints to assemble")
    ckpts = {str(p): read_checkpoint(p) for p in member_ckpts}
    if len(ckpts) != len(member_ckpts):
        raise WherefromError("a member checkpoint is listed more than once; pass each file once")
    first_path, first = next(iter(ckpts.items()))
    ensemble_class = f"{EncodedEnsemble.__module__}.{EncodedEnsemble.__qualname__}"
    ref = {k: v for k, v in init_args(first.get("hyper_parameters", {})).items() if k != "member"}
    members: dict[int, str] = {}
    for path, ckpt in ckpts.items():
        hp = init_args(ckpt.get("hyper_parameters", {}))
        if ckpt.get(CLASS_KEY) != ensemble_class or hp.get("member") is None:
            raise CheckpointError(f"{path!r} is not a per-member ensemble checkpoint; train one with EncodedEnsemble(member=i)")
        if CODES_KEY not in ckpt:
            raise CheckpointError(f"{path!r} stores no codes; it was not saved after training started")
        fp, ref_fp = ckpt[CODES_KEY]["fingerprint"], first[CODES_KEY]["fingerprint"]
        if fp != ref_fp:
            raise FingerprintMismatchError(
                f"{path!r} has codes fingerprint {fp} but {first_path!r} has {ref_fp}: the members were trained with "
                "different data, n, w or seed; retrain them from one config"
            )
        diff = sorted(k for k in set(ref) | set(hp) if k != "member" and ref.get(k) != hp.get(k))
        if diff:
            raise WherefromError(f"{path!r} and {first_path!r} differ in {diff[0]} ({hp.get(diff[0])!r} vs {ref.get(diff[0])!r}); members must share one config")
        if ckpt.get(DATAMODULE_KEY) != first.get(DATAMODULE_KEY):
            raise FingerprintMismatchError(f"{path!r} and {first_path!r} were trained with different datamodule settings")
        if hp["member"] in members:
            raise WherefromError(f"member {hp['member']} appears twice ({members[hp['member']]!r} and {path!r}); pass one checkpoint per member")
        members[hp["member"]] = path
    missing = sorted(set(range(ref["n"])) - set(members))
    if missing:
        raise WherefromError(f"members {missing} are missing; the ensemble has n={ref['n']} members, pass one checkpoint for each")
    state: dict[str, Tensor] = {}
    for ckpt in ckpts.values():
        state.update(ckpt["state_dict"])
    module = EncodedEnsemble(**ref)
    checkpoint = {
        "state_dict": state,
        "hyper_parameters": dict(ref, member=None),
        CLASS_KEY: ensemble_class,
        DATAMODULE_KEY: first.get(DATAMODULE_KEY),
        CODES_KEY: first[CODES_KEY],
        "wherefrom_members": [members[i] for i in range(ref["n"])],
        "pytorch-lightning_version": L.__version__,
    }
    module.on_load_checkpoint(checkpoint)  # architecture and codes check
    out = Path(out)
    with atomic_path(out) as tmp:
        torch.save(checkpoint, tmp)
    return out
