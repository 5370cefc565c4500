"""The random baseline: seeded i.i.d. normal scores, the floor every method must beat
(LDS and leave-one-out correlation ~ 0 in expectation)."""

from __future__ import annotations

import argparse

import numpy as np
from torch import Tensor

from wherefrom.attribution.report import Attribution
from wherefrom.task import mix_seed


def random_scores(num_queries: int, num_train: int, seed: int) -> np.ndarray:
    """Q x N standard-normal scores; row q depends only on ``(seed, q)``."""
    return np.stack([np.random.default_rng(mix_seed(seed, q)).standard_normal(num_train) for q in range(num_queries)]).astype(np.float32)


def random_attribute(module, datamodule, queries: Tensor, args: argparse.Namespace) -> Attribution:
    """``wherefrom attribute --method random`` (seeded by ``--seed``)."""
    return Attribution(random_scores(len(queries), datamodule.num_images, args.seed), queries, "random")
