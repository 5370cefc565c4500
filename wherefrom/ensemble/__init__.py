"""Encoded ensembles (Dai, Yew & Gifford, "Where did you learn that?"): codes, the
ensemble LightningModule, assembly of per-member runs, the exact-ablation sampler, the
diffusers pipeline, and the Jacobian math of synthetic ablation (:mod:`~wherefrom.ensemble.synthetic`,
whose attributors live in :mod:`wherefrom.attribution.ablation`).

The LightningModule and the pipeline (Lightning, diffusers) are imported on first use, so the
codes, the sampler and the Jacobian math import with torch alone.
"""

from __future__ import annotations

import importlib
from typing import Any

from wherefrom.ensemble.codes import Codes, check_codes, smallest_n
from wherefrom.ensemble.sampler import EnsembleSampler

_ON_USE = {
    "EncodedEnsemble": "wherefrom.ensemble.module",
    "assemble": "wherefrom.ensemble.module",
    "member_seed": "wherefrom.ensemble.module",
    "EncodedEnsemblePipeline": "wherefrom.ensemble.pipeline",
    "EnsembleDenoiser": "wherefrom.ensemble.pipeline",
}

__all__ = ["Codes", "EncodedEnsemble", "EncodedEnsemblePipeline", "EnsembleDenoiser", "EnsembleSampler", "assemble", "check_codes", "member_seed", "smallest_n"]


def __getattr__(name: str) -> Any:
    if name not in _ON_USE:
        raise AttributeError(f"module 'wherefrom.ensemble' has no attribute {name!r}")
    return getattr(importlib.import_module(_ON_USE[name]), name)
