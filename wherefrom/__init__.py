"""wherefrom: diffusion training with training-data attribution built in.

Roles:
- the diffusion math: :class:`DiffusionTask`
- data: :mod:`wherefrom.datamodules` (``DigitsDataModule`` is the offline default)
- training: :class:`DiffusionModel` (single model), :class:`EncodedEnsemble` (encoded ensemble)
- sampling: :func:`generate`
"""

from wherefrom.datamodules import ArrayDataModule, CIFAR10DataModule, DigitsDataModule, FolderDataModule, ImageDataModule
from wherefrom.ensemble import Codes, EncodedEnsemble, EnsembleSampler, assemble
from wherefrom.errors import CheckpointError, FingerprintMismatchError, WherefromError
from wherefrom.model import Attributable, DiffusionModel, load_module
from wherefrom.sampling import generate
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
    "load_module",
    # encoded ensembles
    "Codes",
    "EncodedEnsemble",
    "EnsembleSampler",
    "assemble",
    # sampling
    "generate",
    # errors
    "CheckpointError",
    "FingerprintMismatchError",
    "WherefromError",
]
