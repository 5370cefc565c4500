"""``TRAKFeatures``: TRAK / D-TRAK features of a run, written to a store by a Lightning callback.

Drop-in for any Lightning pipeline: the networks, the noise schedule and the data are
found as :mod:`wherefrom.target` describes (wherefrom's own modules and
datamodules, or a user's module with one diffusers UNet and scheduler trained from a
plain DataLoader of ``{"index", "image"}``), and checked before the first training step.

Entries: ``features/<output>/<id>``, so TRAK (``loss``) and D-TRAK (``square_norm``) callbacks
attached together fill one store side by side (with :class:`~wherefrom.callbacks.KFACFactors`).
Model ids: after training, the denoisers' ids (``model``, ``member0``, ...);
with ``every_n_epochs = k``, also ``<id>@epoch<e>`` after every k-th epoch
``e`` before the last, whose weights are saved in the store
(``weights/<id>@epoch<e>``) so queries can be featurised with them later.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
import torch

from wherefrom.attribution.report import log_scalars
from wherefrom.callbacks.base import CaptureCallback
from wherefrom.ddp import on_rank_zero
from wherefrom.errors import WherefromError
from wherefrom.features import (
    METHOD_OUTPUTS,
    FeatureConfig,
    default_projector,
    featurize,
)
from wherefrom.io import weights_hash
from wherefrom.store import Entry
from wherefrom.task import DiffusionTask


class TRAKFeatures(CaptureCallback):
    """Featurise every training index after training (and optionally every k epochs).

    Args:
        store: the store folder.
        method: ``dtrak`` (output ``square_norm``) or ``trak`` (output ``loss``).
        output: override the output function (a measurement name).
        timesteps, strategy, proj_dim, projection, allocation, seed: see :class:`~wherefrom.features.config.FeatureConfig`.
        projector: the dense mode's trak projector (default: ``cuda`` with fast_jl on a GPU, else ``basic``).
        every_n_epochs: also featurise every k epochs (0: only after training).
        batch_size: images per featurisation batch (each runs K draws).
        overwrite, denoiser, task: see :class:`~wherefrom.callbacks.base.CaptureCallback`.
    """

    def __init__(
        self,
        store: str,
        method: str = "dtrak",
        output: str | None = None,
        timesteps: int = FeatureConfig.timesteps,
        strategy: str = FeatureConfig.strategy,
        proj_dim: int = FeatureConfig.proj_dim,
        projection: str = FeatureConfig.projection,
        projector: str | None = None,
        allocation: str = FeatureConfig.allocation,
        seed: int = 0,
        every_n_epochs: int = 0,
        batch_size: int = 64,
        overwrite: bool = False,
        denoiser: str | None = None,
        task: DiffusionTask | None = None,
    ) -> None:
        if method not in METHOD_OUTPUTS:
            raise WherefromError(f"method must be one of {sorted(METHOD_OUTPUTS)}, got {method!r}")
        if every_n_epochs < 0 or batch_size < 1:
            raise WherefromError(f"every_n_epochs must be >= 0 and batch_size >= 1, got {every_n_epochs} and {batch_size}")
        super().__init__(store, overwrite, denoiser, task)
        self.every_n_epochs, self.batch_size, self.projector = every_n_epochs, batch_size, projector
        # validated now, so a bad argument fails before training
        self.config = FeatureConfig(
            output=output or METHOD_OUTPUTS[method], timesteps=timesteps, strategy=strategy, proj_dim=proj_dim,
            projection=projection, projector=projector or "basic", allocation=allocation, seed=seed,
        )  # fmt: skip

    @property
    def state_key(self) -> str:
        return self._state_key(output=self.config.output)

    def entries(self, model_id: str) -> dict[str, dict[str, Any]]:
        """``features/<output>/<id>`` and the weights they are made from, ``weights/<id>`` (the projector
        is resolved on the run's device)."""
        config = {k: v for k, v in self.config.to_dict().items() if k != "projector" or self.projector}
        return {Entry.features(config["output"], model_id): {**config, "model_id": model_id}, Entry.weights(model_id): {"model_id": model_id}}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and not last:
            self.run(trainer, pl_module, suffix=f"@epoch{epoch}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module: Any, suffix: str = "") -> None:
        """Featurise every denoiser as model id ``<id><suffix>`` (all ranks call this), and save the
        weights the features were made from, so the store is self-contained."""
        target, data, strategy = self._target, self._data, trainer.strategy
        config = FeatureConfig(**{**self.config.to_dict(), "projector": self.projector or default_projector(pl_module.device)})
        on_rank_zero(strategy, self._open_store)
        on_rank_zero(strategy, lambda: self._check_entries(suffix))  # nothing is written on a mismatch
        store = self._store
        rank_zero_info(f"{type(self).__name__}: featurising {len(data.indices)} training images x {config.timesteps} draws ({config.output}, D = {config.proj_dim}) "
                       f"for {len(target.networks)} network(s) into {self.store}; the first batch's time gives the time left")  # fmt: skip
        with torch.inference_mode(False), torch.enable_grad():
            for name, net in target.networks.items():
                model_id = name + suffix
                meta = {"model_id": model_id, "weights": weights_hash(net)}
                on_rank_zero(strategy, lambda: store.save_tensors(Entry.weights(model_id), net.state_dict(), meta))
                featurize(net, model_id, target.task, data, store, config, self.batch_size, comm=strategy, progress=trainer.is_global_zero and trainer.progress_bar_callback is not None)
                if trainer.is_global_zero:
                    log_scalars(trainer.loggers, {f"wherefrom/features/{model_id}": float(len(data.indices))}, trainer.global_step)


__all__ = ["TRAKFeatures"]
