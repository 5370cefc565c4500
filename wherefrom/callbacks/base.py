"""The base of wherefrom's capture callbacks: the store they write, and the networks, task and data
they find in any Lightning pipeline (:mod:`wherefrom.target`), checked before the first training step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from wherefrom.ddp import on_rank_zero
from wherefrom.errors import FingerprintMismatchError
from wherefrom.io import weights_hash
from wherefrom.store import Store
from wherefrom.target import Target, check_conditions, resolve_data, resolve_target
from wherefrom.task import DiffusionTask


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
        """Find the data, open the store and check the entries this callback will write, so a
        mismatch fails before the first step."""
        self._data = resolve_data(trainer, type(self).__name__)
        check_conditions(self._target.networks, self._data, type(self).__name__)
        on_rank_zero(trainer.strategy, self._open_store)
        on_rank_zero(trainer.strategy, self._check_entries)

    def entries(self, model_id: str) -> dict[str, dict[str, Any]]:
        """The store entries this callback writes for ``model_id``, with the config keys an existing
        entry must share."""
        return {}

    def _check_entries(self, suffix: str = "") -> None:
        """Refuse (unless ``overwrite``) an existing entry of model ids ``<id><suffix>`` made with another
        config, or from other weights than the networks' now: before the first step, an entry that another
        model or run made (finishing this run would fail or mix the two); before writing, any mismatch.
        Only that entry would be replaced, never another callback's or method's."""
        if self.overwrite:
            return
        owner = type(self).__name__
        fix = f"point {owner}(store=...) at another folder, or pass {owner}(overwrite=True) to recompute that entry (only it)"
        for model_id, net in self._target.networks.items():
            weights = {"weights": weights_hash(net)}
            for name, config in self.entries(model_id + suffix).items():
                clash = self._store.clash(name, config)
                if clash:
                    raise FingerprintMismatchError(f"store {self.store!r} already holds {name} made with another config ({clash}); {fix}")
                if self._store.clash(name, weights):
                    stored = str(self._store.config(name).get("weights"))
                    raise FingerprintMismatchError(
                        f"store {self.store!r} already holds {name} of a run with weights {stored[:12]}, not this model's ({weights['weights'][:12]}): "
                        f"to capture this run, point {owner}(store=...) at a new folder or pass {owner}(overwrite=True) to replace that entry (only it); "
                        "to finish an interrupted capture of that run, resume it with trainer.fit(..., ckpt_path=...)"
                    )

    def _open_store(self) -> None:
        """(Re)open the store on rank 0 as ``self._store`` (other ranks never touch it)."""
        owner = type(self).__name__
        self._store = Store(self.store, self._data.fingerprint, self._target.codes_fingerprint, overwrite=self.overwrite,
                            names=(f"{owner}(store=...)", f"{owner}(overwrite=True)", f"{owner}(overwrite=True)"))  # fmt: skip


__all__ = ["CaptureCallback"]
