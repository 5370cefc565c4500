"""Attribution averaged over several models (independent seeds, checkpoints of one run, an EMA and its
raw weights): each model is attributed on its own and the scores are averaged, as TRAK averages over
models (Park et al. 2023, Sec. 3.2). Averaging was the largest quality lever the LDS benchmark found.

Every model's stored entries live in the store folder's ``model-<weights>`` sub-store, keyed by the
hash of its weights (:func:`model_store`), so several models share one folder without colliding; a
single model uses the folder itself, as always.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from wherefrom.attribution.protocol import Attribution, Attributor
from wherefrom.errors import WherefromError
from wherefrom.io import tensor_hash


def model_key(module: Any) -> str:
    """The hash of every network's weights of ``module`` (its :meth:`denoisers`), in their order."""
    return tensor_hash({f"{name}/{k}": v for name, net in module.denoisers().items() for k, v in net.state_dict().items()})


def model_store(store: str | Path, module: Any, several: bool) -> Path:
    """The store of ``module`` in the folder ``store``: its ``model-<weights>`` sub-store when ``several``
    models share the folder or when that sub-store exists (a model of an averaged run, attributed alone);
    else the folder itself."""
    sub = Path(store) / f"model-{model_key(module)}"
    return sub if several or sub.is_dir() else Path(store)


def _kind(module: Any) -> dict[str, Any]:
    """What must agree for scores to be averaged: the networks' architectures (class, config, parameter
    shapes), the objective, the codes' kind."""
    nets = module.denoisers()
    config = {k: v for k, v in module.task.config.items() if k != "seed"}
    shapes = {n: (type(net).__name__, {k: v for k, v in dict(getattr(net, "config", {})).items() if not k.startswith("_")},
                  [tuple(p.shape) for p in net.state_dict().values()]) for n, net in nets.items()}  # fmt: skip
    return {"networks": shapes, "objective": config, "ensemble": module.codes_fingerprint is not None}


def check_models(modules: Sequence[Any], datas: Sequence[Any], names: Sequence[str]) -> None:
    """Refuse, before any work, models that cannot be averaged: another architecture, objective or kind
    (ensemble or single), or training data with another fingerprint (``names`` say which model is which)."""
    if not modules:
        raise WherefromError("no models to attribute; pass at least one checkpoint")
    first = _kind(modules[0])
    for module, data, name in zip(modules[1:], datas[1:], names[1:]):
        other = _kind(module)
        for what, label in (("networks", "architecture"), ("objective", "objective"), ("ensemble", "kind (encoded ensemble or single model)")):
            if other[what] != first[what]:
                raise WherefromError(f"{name} has another {label} than {names[0]}; average models of one architecture, objective and data only")
        if data.fingerprint != datas[0].fingerprint:
            raise WherefromError(f"{name} was trained on other data than {names[0]} (fingerprint {data.fingerprint} vs {datas[0].fingerprint}); average models of one data only")
    keys = [model_key(m) for m in modules]
    twice = next((n for n, k in zip(names, keys) if keys.count(k) > 1), None)
    if twice is not None:
        raise WherefromError(f"{twice} has the same weights as another model given; pass each model once")


def attribute_models(
    method: Attributor, modules: Sequence[Any], data: Any, queries: Tensor, cond: Tensor | None = None,
    names: Sequence[str] | None = None, datas: Sequence[Any] | None = None,
) -> Attribution:  # fmt: skip
    """``method`` averaged over ``modules`` (LightningModules or checkpoint paths, all trained on ``data``, as
    the attributors take it; ``datas``: each one's own, checked against each other): the mean of each model's
    scores, with every model's scores in ``by_model`` and the models in ``info["models"]``. A method that
    reads a store reads each model's sub-store of its ``store`` folder (:func:`model_store`)."""
    from wherefrom.checkpoint import load_module
    from wherefrom.target import as_data, attributable

    owner = f"{type(method).__name__} over several models"
    names = list(names) if names is not None else [str(m) if isinstance(m, (str, Path)) else f"model {i}" for i, m in enumerate(modules)]
    modules = [attributable(load_module(m) if isinstance(m, (str, Path)) else m, owner) for m in modules]
    data = as_data(data, owner)
    check_models(modules, [as_data(d, owner) for d in datas] if datas is not None else [data] * len(modules), names)
    several = len(modules) > 1
    results = []
    for module in modules:
        store = getattr(method, "store", None)
        own = dataclasses.replace(method, store=str(model_store(store, module, several))) if store is not None else method
        results.append(own.attribute(module, data, queries, cond=cond))
    if not several:
        return results[0]
    by_model = np.stack([r.scores for r in results])
    models = [{"name": n, "weights": model_key(m)} for n, m in zip(names, modules)]
    info = {**results[0].info, "models": models}
    info.pop("store", None)
    return dataclasses.replace(results[0], scores=by_model.mean(0, dtype=np.float64).astype(np.float32), by_model=by_model, info=info, extra=[], artifacts={})


__all__ = ["attribute_models", "check_models", "model_key", "model_store"]
