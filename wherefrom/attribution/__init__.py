"""Attribution: every attributor behind one protocol, their registry, and how results are written.

- :mod:`~wherefrom.attribution.protocol`: :class:`Attributor`, the :class:`Attribution` it returns, :class:`Needs`
- attributors: :mod:`~wherefrom.attribution.baseline` (random, pixel), :mod:`~wherefrom.attribution.trak`
  (TRAK, D-TRAK), :mod:`~wherefrom.attribution.influence` (K-FAC, EK-FAC),
  :mod:`~wherefrom.attribution.ablation` (the encoded ensemble's synthetic ablation and ablation-loss)
- :mod:`~wherefrom.attribution.api`: the :data:`ATTRIBUTORS` registry
- :mod:`~wherefrom.attribution.report` and :mod:`~wherefrom.attribution.html`: files, reports, notebook views
"""

from wherefrom.attribution.ablation import AblationLoss, SyntheticAblation
from wherefrom.attribution.api import ATTRIBUTORS, attributor, register
from wherefrom.attribution.baseline import Pixel, Random, pixel_scores, random_scores
from wherefrom.attribution.influence import EKFAC, KFAC, influence_scores
from wherefrom.attribution.protocol import Attribution, Attributor, Needs
from wherefrom.attribution.report import view, write_attribution
from wherefrom.attribution.trak import DTRAK, TRAK, kernel_scores, trak_scores
from wherefrom.ensemble.synthetic import measurement_scores, synthetic_scores
from wherefrom.kfac.stored import InfluenceConfig, featurize_influence
from wherefrom.store import Store

__all__ = [
    # the protocol and its result
    "Attribution",
    "Attributor",
    "Needs",
    "view",
    "write_attribution",
    # attributors and their registry
    "ATTRIBUTORS",
    "attributor",
    "register",
    "Random",
    "Pixel",
    "TRAK",
    "DTRAK",
    "KFAC",
    "EKFAC",
    "SyntheticAblation",
    "AblationLoss",
    # the store, and stored influence (training gradients in the K-FAC eigenbasis)
    "Store",
    "InfluenceConfig",
    "featurize_influence",
    # score functions
    "trak_scores",
    "kernel_scores",
    "influence_scores",
    "pixel_scores",
    "random_scores",
    "synthetic_scores",
    "measurement_scores",
]
