"""The attributor registry: every method by its CLI name, and what each needs.

    from wherefrom.attribution import DTRAK
    result = DTRAK(store="runs/store").attribute(module, datamodule, queries)
    indices, scores = result.topk(8)

``wherefrom attribute`` derives its per-method options from these dataclasses'
fields; :func:`register` adds a user's own attributor to the registry (the demo runs every registered
one), and the command imports and registers one given as ``--method package.module:Class``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from wherefrom.attribution.ablation import AblationLoss, SyntheticAblation
from wherefrom.attribution.baseline import Pixel, Random
from wherefrom.attribution.influence import EKFAC, KFAC
from wherefrom.attribution.protocol import Attributor
from wherefrom.attribution.trak import DTRAK, TRAK
from wherefrom.errors import WherefromError

ATTRIBUTORS: dict[str, type] = {cls.name: cls for cls in (Random, Pixel, SyntheticAblation, AblationLoss, TRAK, DTRAK, KFAC, EKFAC)}


def register(cls: type) -> type:
    """Add an attributor class (a dataclass with ``name``, ``needs`` and ``attribute``) to :data:`ATTRIBUTORS`
    (``wherefrom attribute --method package.module:Class`` calls this for you)."""
    if not (dataclasses.is_dataclass(cls) and isinstance(getattr(cls, "name", None), str) and callable(getattr(cls, "attribute", None))):
        raise WherefromError(f"{cls!r} is not an attributor: it needs to be a dataclass with a `name`, `needs` and an `attribute` method")
    ATTRIBUTORS[cls.name] = cls
    return cls


def attributor(name: str, **options: Any) -> Attributor:
    """The registered attributor ``name`` with ``options`` (its dataclass fields; unknown ones are refused)."""
    if name not in ATTRIBUTORS:
        raise WherefromError(f"unknown method {name!r}; choose one of {sorted(ATTRIBUTORS)}")
    cls = ATTRIBUTORS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise WherefromError(f"method {name!r} takes no option {unknown[0]!r}; its options are {sorted(known) or 'none'}")
    return cls(**options)


__all__ = ["ATTRIBUTORS", "attributor", "register"]
