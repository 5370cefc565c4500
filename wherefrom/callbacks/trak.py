"""``TRAKFeatures``: TRAK / D-TRAK features of a run, written to a store by a Lightning callback.

Drop-in for any LightningModule following this small protocol
(:class:`wherefrom.model.Attributable`):

* ``module.task`` -- a :class:`~wherefrom.task.DiffusionTask` (noise schedule,
  seeded draws, output functions);
* ``module.denoisers()`` -- ``{model_id: network}`` with ``network(x_t, t)``
  returning eps (a tensor, or an object with ``.sample`` like diffusers'
  ``UNet2DModel``); one entry for a single model, one per ensemble member;
* ``module.codes_fingerprint`` -- ``None`` (or the ensemble's codes fingerprint);

and a datamodule with ``fingerprint`` (str), ``num_images`` (N, the global
index space), ``indices`` (the split's global indices) and ``dataset(indices)``
yielding ``{"index", "image"}`` (every :class:`~wherefrom.datamodules.ImageDataModule`).

Model ids: after training, the denoisers' ids (``model``, ``member0``, ...);
with ``every_n_epochs = k``, also ``<id>@epoch<e>`` after every k-th epoch
``e`` before the last, whose weights are saved in the store
(``weights/<id>@epoch<e>``) so queries can be featurised with them later.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from wherefrom.attribution.features import featurize, on_rank_zero, weights_hash
from wherefrom.attribution.gradients import METHOD_OUTPUTS, FeatureConfig
from wherefrom.attribution.projection import default_projector
from wherefrom.attribution.store import Store
from wherefrom.errors import WherefromError


class TRAKFeatures(L.Callback):
    """Featurise every training index after training (and optionally every k epochs).

    Args:
        store: the store folder.
        method: ``dtrak`` (output ``square_norm``) or ``trak`` (output ``loss``).
        output: override the output function (a measurement name).
        timesteps, strategy, proj_dim, projection, allocation, seed: see :class:`~wherefrom.attribution.gradients.FeatureConfig`.
        projector: the dense mode's trak projector (default: ``cuda`` with fast_jl on a GPU, else ``basic``).
        every_n_epochs: also featurise every k epochs (0: only after training).
        batch_size: images per featurisation batch (each runs K draws).
        overwrite: replace a store/entries made for other data, config or weights.
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
    ) -> None:
        if method not in METHOD_OUTPUTS:
            raise WherefromError(f"method must be one of {sorted(METHOD_OUTPUTS)}, got {method!r}")
        if every_n_epochs < 0 or batch_size < 1:
            raise WherefromError(f"every_n_epochs must be >= 0 and batch_size >= 1, got {every_n_epochs} and {batch_size}")
        self.store, self.every_n_epochs, self.batch_size, self.overwrite = store, every_n_epochs, batch_size, overwrite
        self.projector = projector
        # validated now, so a bad argument fails before training
        self.config = FeatureConfig(
            output=output or METHOD_OUTPUTS[method], timesteps=timesteps, strategy=strategy, proj_dim=proj_dim,
            projection=projection, projector=projector or "basic", allocation=allocation, seed=seed,
        )  # fmt: skip

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and not last:
            self.run(trainer, pl_module, suffix=f"@epoch{epoch}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module: Any, suffix: str = "") -> None:
        """Featurise every denoiser of ``pl_module`` as model id ``<id><suffix>`` (all ranks call this)."""
        dm = trainer.datamodule
        if dm is None:
            raise WherefromError("TRAKFeatures needs the trainer's datamodule (fit with datamodule=...)")
        strategy = trainer.strategy
        config = FeatureConfig(**{**self.config.to_dict(), "projector": self.projector or default_projector(pl_module.device)})
        store = None

        def open_store() -> None:
            nonlocal store
            store = Store(self.store, dm.fingerprint, pl_module.codes_fingerprint, overwrite=self.overwrite)

        on_rank_zero(strategy, open_store)
        with torch.inference_mode(False), torch.enable_grad():
            for name, net in pl_module.denoisers().items():
                model_id = name + suffix
                if suffix:
                    meta = {"model_id": model_id, "weights": weights_hash(net)}
                    on_rank_zero(strategy, lambda: store.save_tensors(f"weights/{model_id}", net.state_dict(), meta))
                featurize(net, model_id, pl_module.task, dm, store, config, self.batch_size, comm=strategy, progress=trainer.is_global_zero)


__all__ = ["TRAKFeatures"]
