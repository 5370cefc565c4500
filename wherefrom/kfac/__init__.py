"""Kronecker-factored curvature (K-FAC / EK-FAC) of the diffusion training loss.

For every ``nn.Linear`` and ``nn.Conv2d`` (attention projections included) with
weight ``W`` (``d_out x d_in``, a conv flattened to ``d_out x C k_h k_w``) and the
bias folded in as an extra input column, the block of the curvature ``F`` of the
training objective ``(1/N) sum_n E_(t, eps) l_n`` is approximated as
``F_W ~ A (x) G`` (Martens & Grosse 2015, eq. 1-2), where, for the row-major
vectorisation ``vec(W)`` used throughout, ``F_W = kron(G, A)``.

Weight sharing (conv positions, attention tokens; ``R`` positions per example),
Eschenhagen et al. (2023), eq. 7 and 9:

- ``expand``: ``A = sum_{n,r} a a^T / (N R)``, ``G = sum_{n,r} g g^T / N``
- ``reduce``: ``A = sum_n abar abar^T / N`` with ``abar`` the mean over positions,
  ``G = sum_n ghat ghat^T / N`` with ``ghat`` the sum over positions.

Statistics are kept as sums plus counts and normalised late (kronfluence), so
DDP only ever sums them.

Curvature types. The loss of an example is ``l = ||f - y||^2 / D`` (``D`` output
entries, ``task.py``), whose Hessian in ``f`` is ``(2/D) I = S S^T`` with
``S = sqrt(2/D) I``. The GGN is ``J^T S S^T J``; K-FAC needs vectors ``r`` with
``E[r r^T] = S S^T`` to backpropagate through the network (``g = J^T r`` per layer):

- ``type-2``: the ``D`` columns of ``S`` (exact GGN, ``D`` backward passes).
- ``mc``: ``r = sqrt(2/D) z``, ``z ~ N(0, I)``. Equivalently: ``D l`` is, up to a
  constant, the negative log-likelihood of ``y ~ N(f, I/2)``; draw one
  pseudo-target ``y' = f + z / sqrt(2)`` per example; the Fisher of that
  likelihood is the GGN of ``D l``, so the GGN of ``l`` is
  ``(1/D) E[grad_f(D l(y')) grad_f(D l(y'))^T]`` and
  ``sqrt(D) grad_f l(y') = (2/sqrt(D)) (f - y') = -sqrt(2/D) z``.
- ``empirical``: the same with the real target: ``r = (2/sqrt(D)) (f - eps)``,
  so all three estimate the same matrix when the model's residuals have the
  variance 1/2 its loss implies (the empirical Fisher, with that scaling).

EK-FAC (George et al. 2018, eq. 10): in the Kronecker eigenbasis
``Q_G (x) Q_A`` of the K-FAC factors, replace the eigenvalues by the second
moments ``E_n[(Q_G^T grad_W l_n Q_A)^2]`` of per-example (pseudo-)gradients,
measured in an extra pass.

Damping (default): per layer, ``lambda_l = 0.1 * mean`` of that layer's
(EK-)FAC eigenvalues (Grosse et al. 2023, "Studying large language model
generalization with influence functions", Sec. 2.2; kronfluence's heuristic).
It is invariant to rescaling the loss and each layer's parametrisation, and
it uses only training-set curvature, never an evaluation set. An absolute
``damping`` overrides it.
"""

from __future__ import annotations

from wherefrom.kfac.collector import FactorCollector
from wherefrom.kfac.curvature import (
    backpropagate,
    factor_pass,
    frozen,
    mc_noise,
    output_vectors,
)
from wherefrom.kfac.factors import (
    HEURISTIC_DAMPING,
    Curvature,
    KFACApprox,
    Layer,
    LayerEigen,
    activation_factor,
    gradient_factor,
    kfe_square,
    layer_dims,
    tracked_layers,
)
from wherefrom.kfac.fit import FactorConfig, fit_factors, training_split
from wherefrom.kfac.preconditioner import (
    KFACPreconditioner,
    correction_tensors,
    eigen_from_tensors,
    eigen_tensors,
    eigendecompose,
    load_preconditioner,
    precondition,
)

# the package's parts, one job each:
#   geometry        conv geometry of the activation factor (padding, window sums, patch Gram)
#   factors         per-layer factor math, the tracked layers, EK-FAC's squared eigenbasis gradients
#   collector       the forward/backward hooks that accumulate sums and counts
#   curvature       output vectors (type-2 / MC / empirical) and the curvature pass
#   preconditioner  eigendecomposition, the damped (EK-)FAC preconditioner, loading it from a store
#   fit             the factor config, training splits, fitting into a store
#   command         `wherefrom factors`
__all__ = [
    "HEURISTIC_DAMPING",
    "Curvature",
    "FactorCollector",
    "FactorConfig",
    "KFACApprox",
    "KFACPreconditioner",
    "Layer",
    "LayerEigen",
    "activation_factor",
    "backpropagate",
    "correction_tensors",
    "eigen_from_tensors",
    "eigen_tensors",
    "eigendecompose",
    "factor_pass",
    "fit_factors",
    "frozen",
    "gradient_factor",
    "kfe_square",
    "layer_dims",
    "load_preconditioner",
    "precondition",
    "mc_noise",
    "output_vectors",
    "tracked_layers",
    "training_split",
]
