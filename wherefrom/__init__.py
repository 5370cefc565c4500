"""wherefrom: diffusion training with training-data attribution built in.

Roles (each name below is importable from ``wherefrom``; it lives in the room named beside it):

- the diffusion math: :class:`DiffusionTask` (:mod:`wherefrom.task`)
- data: :mod:`wherefrom.datamodules` (``DigitsDataModule`` is the offline default)
- training: :class:`DiffusionModel` (:mod:`wherefrom.model`), :class:`EncodedEnsemble` (:mod:`wherefrom.ensemble`),
  any Lightning run from a config (:mod:`wherefrom.fitting`)
- sampling: :func:`generate` (:mod:`wherefrom.sampling`)
- attribution: typed attributors behind one protocol (``DTRAK(store=...).attribute(module, data, queries)``),
  their :data:`ATTRIBUTORS` registry, the :class:`Attribution` they return and the :class:`Store` they read
  (:mod:`wherefrom.attribution`, :mod:`wherefrom.store`)
- capture: the drop-in callbacks :class:`TRAKFeatures` and :class:`KFACFactors` (:mod:`wherefrom.callbacks`)
- evaluation: LDS, leave-one-out, distances (:mod:`wherefrom.evaluation`)

Names are imported from their room on first use, so ``import wherefrom`` (and every command of the
``wherefrom`` command line, which lives in this package) does not pay for Lightning, diffusers and
the attributors before it needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the room (a package face or a top-level module) that exports it
_ROOMS: dict[str, str] = {
    # math
    "DiffusionTask": "wherefrom.task",
    "MEASUREMENTS": "wherefrom.task",
    # data
    "ArrayDataModule": "wherefrom.datamodules",
    "CIFAR10DataModule": "wherefrom.datamodules",
    "DigitsDataModule": "wherefrom.datamodules",
    "FolderDataModule": "wherefrom.datamodules",
    "ImageDataModule": "wherefrom.datamodules",
    # training
    "Attributable": "wherefrom.model",
    "DiffusionModel": "wherefrom.model",
    "DiffusionRecipe": "wherefrom.model",
    "load_datamodule": "wherefrom.checkpoint",
    "load_module": "wherefrom.checkpoint",
    "fit": "wherefrom.fitting",
    # encoded ensembles
    "Codes": "wherefrom.ensemble",
    "EncodedEnsemble": "wherefrom.ensemble",
    "EnsembleSampler": "wherefrom.ensemble",
    "assemble": "wherefrom.ensemble",
    "EncodedEnsemblePipeline": "wherefrom.ensemble",
    "EnsembleDenoiser": "wherefrom.ensemble",
    # sampling
    "generate": "wherefrom.sampling",
    # attribution
    "Attribution": "wherefrom.attribution",
    "Attributor": "wherefrom.attribution",
    "Needs": "wherefrom.attribution",
    "ATTRIBUTORS": "wherefrom.attribution",
    "attributor": "wherefrom.attribution",
    "register": "wherefrom.attribution",
    "view": "wherefrom.attribution",
    "write_attribution": "wherefrom.attribution",
    "AblationLoss": "wherefrom.attribution",
    "DTRAK": "wherefrom.attribution",
    "EKFAC": "wherefrom.attribution",
    "KFAC": "wherefrom.attribution",
    "Pixel": "wherefrom.attribution",
    "Random": "wherefrom.attribution",
    "SyntheticAblation": "wherefrom.attribution",
    "TRAK": "wherefrom.attribution",
    "Store": "wherefrom.store",
    # capture callbacks, and what they (and the attributors) find in any pipeline
    "KFACFactors": "wherefrom.callbacks",
    "TRAKFeatures": "wherefrom.callbacks",
    "Target": "wherefrom.target",
    "as_data": "wherefrom.target",
    "resolve_target": "wherefrom.target",
    # evaluation
    "Benchmark": "wherefrom.evaluation",
    "Correlation": "wherefrom.evaluation",
    "LeaveOneOut": "wherefrom.evaluation",
    "LinearDatamodelingScore": "wherefrom.evaluation",
    "LPIPSDistance": "wherefrom.evaluation",
    "l2_distance": "wherefrom.evaluation",
    "leave_one_out": "wherefrom.evaluation",
    # errors
    "CheckpointError": "wherefrom.errors",
    "FingerprintMismatchError": "wherefrom.errors",
    "WherefromError": "wherefrom.errors",
}

__all__ = list(_ROOMS)


def __getattr__(name: str) -> Any:
    if name not in _ROOMS:
        raise AttributeError(f"module 'wherefrom' has no attribute {name!r}")
    value = getattr(importlib.import_module(_ROOMS[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_ROOMS])
