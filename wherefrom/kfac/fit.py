"""Fitting factors into a store: the factor config, each model id's training split, and the passes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from wherefrom.ddp import Comm, LocalComm, gather, on_rank_zero
from wherefrom.errors import FingerprintMismatchError, WherefromError, check_choices
from wherefrom.io import weights_hash
from wherefrom.kfac.collector import FactorCollector
from wherefrom.kfac.curvature import factor_pass
from wherefrom.kfac.factors import Curvature, KFACApprox
from wherefrom.kfac.preconditioner import eigen_tensors, eigen_to, eigendecompose
from wherefrom.progress import progress_bar
from wherefrom.store import Entry, Store
from wherefrom.task import DiffusionTask


@dataclass(frozen=True)
class FactorConfig:
    """Everything that determines a model id's factors; stored in the manifest.

    Args:
        curvature: ``mc`` (default), ``empirical`` or ``type-2`` (``D`` backward passes per batch).
        kfac: ``expand`` (default) or ``reduce``.
        passes: passes over the training set, each with fresh seeded ``(t, eps)`` (draw id = pass).
        ekfac: also measure EK-FAC eigenvalues (``passes`` more passes, draw ids ``passes..2 passes - 1``).
        mode: ``after`` training (dedicated passes) or ``during`` training (the training steps'
            own forward/backward: empirical curvature only).
    """

    curvature: str = field(default=Curvature.MC.value, metadata={"help": "the curvature the factors approximate", "choices": Curvature})
    kfac: str = field(default=KFACApprox.EXPAND.value, metadata={"help": "K-FAC's treatment of weight sharing (Eschenhagen et al. 2023)", "choices": KFACApprox})
    # 8 passes (8 seeded (t, eps) per image) beat 1 by 0.02-0.05 LDS on the benchmark's tuning queries
    passes: int = field(default=8, metadata={"help": "passes over the data, fresh (t, eps) each"})
    ekfac: bool = field(default=False, metadata={"help": "also measure EK-FAC eigenvalues (extra passes)"})
    mode: str = field(default="after", metadata={"help": "after training (dedicated passes) or during it (its own steps)", "choices": ("after", "during")})

    def __post_init__(self) -> None:
        check_choices(self)
        if self.mode == "during" and self.curvature != Curvature.EMPIRICAL.value:
            raise WherefromError("mode='during' reuses the training loss's gradients, i.e. curvature='empirical'; pass it explicitly")
        if self.passes < 1:
            raise WherefromError(f"passes must be >= 1, got {self.passes}")

    def entries(self, model_id: str) -> list[str]:
        """The store entries these factors fill for ``model_id`` (EK-FAC's eigenvalues only with ``ekfac``)."""
        names = Entry.kfac(model_id)
        return [names["factors"], names["eigen"]] + ([names["ekfac"]] if self.ekfac else [])

    def to_dict(self) -> dict[str, object]:
        return {"curvature": self.curvature, "kfac": self.kfac, "passes": self.passes, "ekfac": self.ekfac, "mode": self.mode}


def training_split(module: nn.Module, model_id: str, indices: Iterable[int]) -> np.ndarray:
    """The indices model id ``model_id`` trained on: all of ``indices``, or for member ``i``
    of an encoded ensemble (model id ``member<i>``) its code split."""
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    codes = getattr(module, "codes", None)
    if codes is None or not model_id.startswith("member"):
        return indices
    return np.intersect1d(indices, codes.split(int(model_id.removeprefix("member"))))


def _loader(datamodule, indices: np.ndarray, batch_size: int) -> DataLoader:
    return DataLoader(datamodule.dataset(indices), batch_size=batch_size, shuffle=False)


def fit_factors(
    net: nn.Module,
    model_id: str,
    task: DiffusionTask,
    datamodule,
    indices: np.ndarray,
    store: Store | None,
    config: FactorConfig,
    batch_size: int = 64,
    comm: Comm | None = None,
    progress: bool = False,
    collector: FactorCollector | None = None,
) -> None:
    """Write ``factors/``, ``eigen/`` (and ``ekfac/``) ``<model_id>`` to ``store``.

    ``after`` mode: ``config.passes`` passes over ``indices`` (each rank a disjoint
    ``indices[rank::world]`` shard, so every index exactly once); ``during`` mode: the
    statistics already in ``collector``. Sums and counts are then summed over ranks,
    eigendecomposed in float64 and, for EK-FAC, corrected by further passes. Every
    rank calls this; only global rank 0 touches ``store``.
    """
    comm = comm or LocalComm()
    names = Entry.kfac(model_id)
    wanted = config.entries(model_id)
    meta = {**config.to_dict(), "model_id": model_id, "weights": weights_hash(net), "task": task.config}

    def check() -> bool:
        if all(store.has(n, meta) for n in wanted):
            return True
        clash = [n for n in wanted if store.has(n) and not store.has(n, meta)]
        if clash and not store.overwrite:
            raise FingerprintMismatchError(
                f"store {str(store.root)!r} holds {clash[0]} made with config {store.config(clash[0])}, not {meta}; "
                f"use another store or pass {store.names[1]}"
            )
        return False

    if on_rank_zero(comm, check):
        return
    shard = np.asarray(indices, dtype=np.int64)[comm.global_rank :: comm.world_size]
    reduce_sum = lambda t: gather(comm, t).sum(0)  # noqa: E731 - fixed rank order: the same sums everywhere

    def passes(col: FactorCollector, first_draw: int, what: str) -> None:
        with col.attached():
            for p in range(config.passes):
                batches = progress_bar(_loader(datamodule, shard, batch_size), desc=f"{what} {model_id} pass {p + 1}/{config.passes}", disable=not progress)
                factor_pass(net, task, batches, col, config.curvature, draw=first_draw + p)
        col.reduce_(reduce_sum)

    with torch.inference_mode(False), torch.enable_grad():
        if collector is None:
            collector = FactorCollector(net, config.kfac)
            passes(collector, 0, "factors")
        else:
            collector.reduce_(reduce_sum)
        sums = collector.state_dict()
        eigen = eigendecompose(sums, collector.layers)
        corrected = None
        if config.ekfac:
            ek = FactorCollector(net, config.kfac, eigen={n: eigen_to(e, collector.model_device()) for n, e in eigen.items()})
            passes(ek, config.passes, "ekfac")
            corrected = ek.state_dict()

    def save() -> None:
        store.save_tensors(names["factors"], sums, meta)
        store.save_tensors(names["eigen"], eigen_tensors(eigen), meta)
        if corrected is not None:
            store.save_tensors(names["ekfac"], corrected, meta)

    on_rank_zero(comm, save)
