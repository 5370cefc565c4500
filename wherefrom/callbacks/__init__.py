"""Drop-in Lightning callbacks that capture attribution statistics during a run."""

from wherefrom.callbacks.kfac import KFACFactors
from wherefrom.callbacks.trak import TRAKFeatures

__all__ = ["KFACFactors", "TRAKFeatures"]
