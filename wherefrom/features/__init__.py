"""Featurisation: per-sample gradients of a training set, projected, into the store.

- :mod:`~wherefrom.features.config`: :class:`FeatureConfig`, everything that determines a feature vector
- :mod:`~wherefrom.features.gradients`: dense per-sample gradients of an output function (D-TRAK)
- :mod:`~wherefrom.features.projection`: dense (trak) and structured (per-layer, LoGra) projections
- :mod:`~wherefrom.features.featurize`: the chunked, resumable, rank-invariant pass into the store
"""

from wherefrom.features.config import (
    METHOD_OUTPUTS,
    Allocation,
    FeatureConfig,
    ProjectionKind,
    Projector,
)
from wherefrom.features.featurize import featurize, project_images, write_rows
from wherefrom.features.gradients import (
    Draws,
    noisy_inputs,
    num_parameters,
    pair_rows,
    per_sample_grads,
    trainable_parameters,
)
from wherefrom.features.projection import (
    LayerReduction,
    Projection,
    default_projector,
    layer_shape,
    projection_seed,
    scaled_orthonormal,
    structured_grads,
)

__all__ = [
    # what determines a feature vector
    "METHOD_OUTPUTS",
    "Allocation",
    "FeatureConfig",
    "ProjectionKind",
    "Projector",
    # gradients
    "Draws",
    "noisy_inputs",
    "num_parameters",
    "pair_rows",
    "per_sample_grads",
    "trainable_parameters",
    # projections
    "LayerReduction",
    "Projection",
    "default_projector",
    "layer_shape",
    "projection_seed",
    "scaled_orthonormal",
    "structured_grads",
    # the pass into the store
    "featurize",
    "project_images",
    "write_rows",
]
