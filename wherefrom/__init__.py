"""wherefrom: diffusion training with training-data attribution built in.

Roles:
- the diffusion math: :class:`DiffusionTask`
- data: :mod:`wherefrom.datamodules` (``DigitsDataModule`` is the offline default)
- training: :class:`DiffusionModel` (single model), :class:`EncodedEnsemble` (encoded ensemble)
- sampling: :func:`generate`
- attribution: typed attributors behind one protocol (``DTRAK(store=...).attribute(module, data, queries)``),
  their :data:`ATTRIBUTORS` registry, the :class:`Attribution` they return and the :class:`Store` they read
- capture: the drop-in callbacks :class:`TRAKFeatures` and :class:`KFACFactors`
"""

from wherefrom.attribution.api import ATTRIBUTORS, attributor, register
from wherefrom.attribution.baseline import Pixel, Random
from wherefrom.attribution.influence import EKFAC, KFAC
from wherefrom.attribution.protocol import Attribution, Attributor, Needs
from wherefrom.attribution.report import view, write_attribution
from wherefrom.store import Store
from wherefrom.attribution.trak import DTRAK, TRAK
from wherefrom.callbacks import KFACFactors, TRAKFeatures
from wherefrom.checkpoint import load_datamodule, load_module
from wherefrom.datamodules import ArrayDataModule, CIFAR10DataModule, DigitsDataModule, FolderDataModule, ImageDataModule
from wherefrom.ensemble import Codes, EncodedEnsemble, EnsembleSampler, assemble
from wherefrom.ensemble.pipeline import EncodedEnsemblePipeline, EnsembleDenoiser
from wherefrom.attribution.ablation import AblationLoss, SyntheticAblation
from wherefrom.errors import CheckpointError, FingerprintMismatchError, WherefromError
from wherefrom.model import Attributable, DiffusionModel, DiffusionRecipe
from wherefrom.sampling import generate
from wherefrom.target import Target, as_data, resolve_target
from wherefrom.task import MEASUREMENTS, DiffusionTask

__all__ = [
    # math
    "DiffusionTask",
    "MEASUREMENTS",
    # data
    "ArrayDataModule",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FolderDataModule",
    "ImageDataModule",
    # training
    "Attributable",
    "DiffusionModel",
    "DiffusionRecipe",
    "load_datamodule",
    "load_module",
    # encoded ensembles
    "Codes",
    "EncodedEnsemble",
    "EnsembleSampler",
    "assemble",
    "EncodedEnsemblePipeline",
    "EnsembleDenoiser",
    # sampling
    "generate",
    # attribution
    "Attribution",
    "Attributor",
    "Needs",
    "ATTRIBUTORS",
    "attributor",
    "register",
    "view",
    "write_attribution",
    "AblationLoss",
    "DTRAK",
    "EKFAC",
    "KFAC",
    "Pixel",
    "Random",
    "SyntheticAblation",
    "TRAK",
    "Store",
    # capture callbacks, and what they (and the attributors) find in any pipeline
    "KFACFactors",
    "TRAKFeatures",
    "Target",
    "as_data",
    "resolve_target",
    # errors
    "CheckpointError",
    "FingerprintMismatchError",
    "WherefromError",
]
