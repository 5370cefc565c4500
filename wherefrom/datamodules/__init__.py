"""Datamodules yielding ``{"index", "image"}`` batches keyed by global index."""

from wherefrom.datamodules.base import ImageDataModule, IndexedDataset, fingerprint, read_indices, select_indices
from wherefrom.datamodules.sources import ArrayDataModule, CIFAR10DataModule, DigitsDataModule, FolderDataModule

__all__ = [
    "ArrayDataModule",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FolderDataModule",
    "ImageDataModule",
    "IndexedDataset",
    "fingerprint",
    "read_indices",
    "select_indices",
]
