"""Encoded ensembles (Dai, Yew & Gifford, "Where did you learn that?"): codes, the
ensemble LightningModule, assembly of per-member runs, and the exact-ablation sampler."""

from wherefrom.ensemble.codes import Codes, check_codes, smallest_n
from wherefrom.ensemble.module import EncodedEnsemble, assemble, member_seed
from wherefrom.ensemble.sampler import EnsembleSampler

__all__ = ["Codes", "EncodedEnsemble", "EnsembleSampler", "assemble", "check_codes", "member_seed", "smallest_n"]
