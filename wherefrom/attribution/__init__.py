"""Attribution: typed attributors behind one protocol, the store they read, and the score functions.

Names are imported on first use (the ensemble's attributors import this package's
modules, so an eager import here would be circular).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # the protocol and its result
    "Attribution": "report",
    "Attributor": "report",
    "Needs": "report",
    "view": "report",
    "write_attribution": "report",
    # attributors and their registry
    "ATTRIBUTORS": "api",
    "attributor": "api",
    "register": "api",
    "Random": "baseline",
    "Pixel": "baseline",
    "TRAK": "trak",
    "DTRAK": "trak",
    "KFAC": "influence",
    "EKFAC": "influence",
    "SyntheticAblation": "wherefrom.ensemble.synthetic",
    "AblationLoss": "wherefrom.ensemble.synthetic",
    # the store, and stored influence (training gradients in the K-FAC eigenbasis)
    "Store": "store",
    "InfluenceConfig": "wherefrom.attribution.kfac.stored",
    "featurize_influence": "wherefrom.attribution.kfac.stored",
    # score functions
    "trak_scores": "trak",
    "kernel_scores": "trak",
    "influence_scores": "influence",
    "pixel_scores": "baseline",
    "random_scores": "baseline",
    "synthetic_scores": "wherefrom.ensemble.synthetic",
    "measurement_scores": "wherefrom.ensemble.synthetic",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wherefrom.attribution' has no attribute {name!r}")
    where = _EXPORTS[name]
    module = importlib.import_module(where if "." in where else f"wherefrom.attribution.{where}")
    return getattr(module, name)
