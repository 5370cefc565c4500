"""``KFACFactors``: K-FAC / EK-FAC factors of a run, written to a store by a Lightning callback.

Drop-in for any Lightning pipeline: the networks, the noise schedule and the data are
found as :mod:`wherefrom.target` describes, and checked before the first
training step. Each denoiser (model id)
gets ``factors/<id>``, ``eigen/<id>``, optionally ``ekfac/<id>`` (see
:mod:`wherefrom.kfac`) and, with ``features=True``, the stored influence
``influence/<id>`` (:mod:`wherefrom.kfac.stored`); an encoded ensemble's member
uses only the images of its code split.

Modes:

* ``after`` (default): after training, ``passes`` dedicated passes over the
  training set with fresh seeded ``(t, eps)``; DDP ranks take disjoint shards
  (every index exactly once, no padded sampler) and sum their statistics.
* ``during``: the hooks record the training steps' own forward and backward
  (the empirical Fisher of the loss actually trained on, at negligible cost).
  The gradient reaching a layer is that of the batch-mean loss, so it is
  multiplied by the rows the denoiser ran on (and by ``accumulate_grad_batches``,
  and divided by an AMP loss scale) to give per-example gradients; for an
  encoded ensemble under DDP this uses the rank's rows, not the global ones the
  loss divides by (an approximation). The statistics are part of the callback's
  checkpoint state: at every checkpoint they are summed over ranks (kept on
  rank 0), and a resumed run continues from them.

Only global rank 0 writes the store.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
import torch

from wherefrom.attribution.report import log_scalars
from wherefrom.callbacks.base import CaptureCallback
from wherefrom.ddp import gather, on_rank_zero
from wherefrom.errors import WherefromError
from wherefrom.kfac import (
    Curvature,
    FactorCollector,
    FactorConfig,
    KFACApprox,
    fit_factors,
    tracked_layers,
    training_split,
)
from wherefrom.kfac.fidelity import record_fidelity
from wherefrom.kfac.stored import InfluenceConfig, featurize_influence
from wherefrom.store import Entry
from wherefrom.target import item_image
from wherefrom.task import DiffusionTask


class KFACFactors(CaptureCallback):
    """Fit K-FAC factors of every denoiser and write them to ``store``.

    Args:
        store: the store folder (may be shared with :class:`~wherefrom.callbacks.TRAKFeatures`).
        mode: ``after`` (dedicated passes after training) or ``during`` (from the training steps).
        curvature: ``mc`` / ``empirical`` / ``type-2``; default ``mc`` after training,
            ``empirical`` (the only choice) during training.
        kfac: ``expand`` (default) or ``reduce``.
        passes: passes over the training set in ``after`` mode (and for EK-FAC).
        ekfac: also measure EK-FAC eigenvalues after training.
        features: also store every training image's loss gradient in the factors' eigenbasis
            (``influence/<id>``, written after the factors), so K-FAC / EK-FAC queries read it instead
            of recomputing the training gradients (:mod:`wherefrom.kfac.stored`).
        dim, residual_dim, timesteps, features_strategy, features_seed, features_dtype: the stored influence's config
            (``features_*``: its ``strategy``, ``seed``, ``dtype``; :class:`~wherefrom.kfac.stored.InfluenceConfig`).
        fidelity: with ``features``, measure stored against exact influence on a seeded sample, log it, record
            it in the store and warn below :data:`~wherefrom.kfac.fidelity.THRESHOLD` (:mod:`wherefrom.kfac.fidelity`).
        batch_size: images per batch of the dedicated passes.
        overwrite, denoiser, task: see :class:`~wherefrom.callbacks.base.CaptureCallback`.
    """

    def __init__(
        self,
        store: str,
        mode: str = "after",
        curvature: str | None = None,
        kfac: str = KFACApprox.EXPAND.value,
        passes: int = FactorConfig.passes,
        ekfac: bool = False,
        features: bool = False,
        dim: int = InfluenceConfig.dim,
        residual_dim: int = InfluenceConfig.residual_dim,
        timesteps: int = InfluenceConfig.timesteps,
        features_strategy: str = InfluenceConfig.strategy,
        features_seed: int = InfluenceConfig.seed,
        features_dtype: str = InfluenceConfig.dtype,
        fidelity: bool = True,
        batch_size: int = 64,
        overwrite: bool = False,
        denoiser: str | None = None,
        task: DiffusionTask | None = None,
    ) -> None:
        if batch_size < 1:
            raise WherefromError(f"batch_size must be >= 1, got {batch_size}")
        default = Curvature.EMPIRICAL.value if mode == "during" else Curvature.MC.value
        self.config = FactorConfig(curvature or default, kfac, passes, ekfac, mode)  # validated before training
        influence = InfluenceConfig(dim, residual_dim, timesteps, features_strategy, features_seed, features_dtype)  # validated before training
        self.features = influence if features else None
        self.fidelity = fidelity
        super().__init__(store, overwrite, denoiser, task)
        self.batch_size = batch_size
        self.collectors: dict[str, FactorCollector] = {}
        self._loaded: dict[str, dict[str, torch.Tensor]] | None = None
        self._output_size = 1  # D, the entries of one eps prediction

    @property
    def state_key(self) -> str:
        return self._state_key(mode=self.config.mode)

    def entries(self, model_id: str) -> dict[str, dict[str, Any]]:
        """The factor entries (and ``influence/<id>`` with ``features``)."""
        out = {n: {**self.config.to_dict(), "model_id": model_id} for n in self.config.entries(model_id)}
        if self.features is not None:
            out[Entry.influence(model_id)] = {**self.features.to_dict(), "model_id": model_id}
        return out

    # --- during training -------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Check the data and the store (:class:`CaptureCallback`); in ``during`` mode, attach the hooks."""
        super().on_train_start(trainer, pl_module)
        if self.config.mode != "during":
            return
        for model_id, net in self._target.networks.items():
            collector = FactorCollector(net, self.config.kfac)
            collector.grad_scale = lambda n, trainer=trainer: self._grad_scale(trainer, n)
            if self._loaded is not None and trainer.is_global_zero:  # the summed state lives on rank 0
                collector.load_state_dict(self._loaded.get(model_id, {}))
            collector.attach()
            self.collectors[model_id] = collector
        self._loaded = None

    def _grad_scale(self, trainer: L.Trainer, rows: int) -> float:
        """From the gradient of the batch-mean training loss to the per-example
        empirical-Fisher vector ``sqrt(D) grad_f l`` (see :mod:`wherefrom.kfac`)."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        loss_scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        return rows * trainer.accumulate_grad_batches * math.sqrt(self._output_size) / loss_scale

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.collectors:
            self._output_size = item_image(batch, type(self).__name__)[0].numel()  # eps predictions have an image's shape
            for c in self.collectors.values():
                c.active = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        for c in self.collectors.values():
            c.active = False

    def state_dict(self) -> dict[str, Any]:
        """``during``: the statistics summed over ranks (a collective: Lightning builds the
        checkpoint on every rank); rank 0 keeps the sum, the others restart from zero."""
        if not self.collectors:
            return {"collectors": self._loaded or {}}
        trainer = self._trainer
        state = {}
        for model_id, c in self.collectors.items():
            c.reduce_(lambda t: gather(trainer.strategy, t).sum(0))
            state[model_id] = c.state_dict()
            if not trainer.is_global_zero:
                c.reset()
        return {"collectors": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict.get("collectors") or None

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = trainer

    # --- after training --------------------------------------------------------------------
    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._detach()
        on_rank_zero(trainer.strategy, self._open_store)
        on_rank_zero(trainer.strategy, self._check_entries)  # nothing is written on a mismatch
        stored = "" if self.features is None else f", then stored-influence rows of {len(self._data.indices)} images x {self.features.timesteps} draws"
        ekfac = f" and {self.config.passes} EK-FAC pass(es)" if self.config.ekfac else ""
        rank_zero_info(f"{type(self).__name__}: {self.config.passes} factor pass(es){ekfac} over {len(self._data.indices)} training images "
                       f"(one seeded draw per image per pass) of {len(self._target.networks)} network(s){stored}, "
                       f"into {self.store}; the first batch's time gives the time left")  # fmt: skip
        for model_id, net in self._target.networks.items():
            split = training_split(pl_module, model_id, self._data.indices)
            fit_factors(
                net, model_id, self._target.task, self._data, split, self._store, self.config, self.batch_size,
                comm=trainer.strategy, progress=trainer.is_global_zero and trainer.progress_bar_callback is not None, collector=self.collectors.get(model_id),
            )  # fmt: skip
            if self.features is not None:  # after the factors: the rows live in their eigenbasis
                featurize_influence(net, model_id, self._target.task, self._data, split, self._store, self.features, self.batch_size,
                                    comm=trainer.strategy, progress=trainer.is_global_zero and trainer.progress_bar_callback is not None)  # fmt: skip
            scalars = {f"wherefrom/factors/{model_id}/layers": float(len(tracked_layers(net))), f"wherefrom/factors/{model_id}/images": float(len(split))}
            if self.features is not None and self.fidelity:
                found = record_fidelity(net, model_id, self._target.task, self._data, split, self._store, self.batch_size, comm=trainer.strategy)
                (rank_zero_info if found.ok else rank_zero_warn)(f"{type(self).__name__} {model_id}: {found.line()}")
                scalars.update({f"wherefrom/factors/{model_id}/fidelity_pearson": found.pearson, f"wherefrom/factors/{model_id}/fidelity_spearman": found.spearman})
            if trainer.is_global_zero:
                log_scalars(trainer.loggers, scalars, trainer.global_step)
        self.collectors = {}

    def teardown(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self._detach()

    def _detach(self) -> None:
        for c in self.collectors.values():
            c.detach()


__all__ = ["KFACFactors"]
