"""The baselines every method must beat: seeded random scores (LDS ~ 0 in expectation)
and pixel similarity ``-||x_q - x_i||^2`` (strong on 8x8 digits: LDS about 0.38 on the
LDS benchmark, see ``benchmarks/results/lds_digits500.md``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from wherefrom.attribution.protocol import Attribution, Needs
from wherefrom.target import as_data, as_queries, image_names
from wherefrom.task import mix_seed


def random_scores(num_queries: int, num_train: int, seed: int) -> np.ndarray:
    """Q x N standard-normal scores; row q depends only on ``(seed, q)``."""
    return np.stack([np.random.default_rng(mix_seed(seed, q)).standard_normal(num_train) for q in range(num_queries)]).astype(np.float32)


def pixel_scores(queries: Tensor, images: Tensor, indices: np.ndarray) -> np.ndarray:
    """``-||x_q - x_i||^2`` (float64) for the training ``indices``; 0 in the other columns (not ranked)."""
    scores = np.zeros((len(queries), len(images)))
    q, x = queries.flatten(1).double().cpu(), images[torch.as_tensor(indices)].flatten(1).double()
    scores[:, indices] = -torch.cdist(q, x).pow(2).numpy()
    return scores


@dataclass
class Random:
    """Seeded i.i.d. standard-normal scores (row q depends only on ``(seed, q)``): the chance baseline, no unit."""

    seed: int = 0

    name: ClassVar[str] = "random"
    needs: ClassVar[Needs] = Needs.NOTHING
    unit: ClassVar[str] = "i.i.d. standard-normal noise: the chance baseline"

    def attribute(self, module, data, queries: Tensor, cond: Tensor | None = None) -> Attribution:
        data = as_data(data, type(self).__name__)
        queries = as_queries(queries, data, f"{type(self).__name__} queries")
        return Attribution(random_scores(len(queries), data.num_images, self.seed), queries, self.name, split=data.indices, unit=self.unit, names=image_names(data))


@dataclass
class Pixel:
    """Pixel similarity: a training image scores ``-||x_q - x_i||^2`` (squared L2 over pixels in
    [-1, 1], negated: larger = more similar)."""

    name: ClassVar[str] = "pixel"
    needs: ClassVar[Needs] = Needs.NOTHING
    unit: ClassVar[str] = "minus the squared pixel distance to the query (images in [-1, 1]); larger = more similar"

    def attribute(self, module, data, queries: Tensor, cond: Tensor | None = None) -> Attribution:
        data = as_data(data, type(self).__name__)
        queries = as_queries(queries, data, f"{type(self).__name__} queries")
        return Attribution(pixel_scores(queries, data.images, np.asarray(data.indices)), queries, self.name, split=data.indices, unit=self.unit, names=image_names(data))


__all__ = ["Pixel", "Random", "pixel_scores", "random_scores"]
