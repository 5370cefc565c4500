"""Unused codes as controls: the part of an ensemble score that only says which members remain.

Ablating training image ``x`` drops the ``w`` members of its code ``c(x)``, and every ensemble
score (:func:`~wherefrom.ensemble.synthetic.measurement_scores`,
:func:`~wherefrom.ensemble.synthetic.synthetic_scores`) is a function ``s(c)`` of the dropped
members alone. Part of ``s(c(x))`` is due to losing those members, whatever images they saw;
only the rest is due to losing ``x``. When ``C(n, w) > N``, the codes no image carries
(:meth:`~wherefrom.ensemble.codes.Codes.controls`) measure the first part: dropping a control's
members removes no image entirely. So, per query, the member effect is fitted on the controls
as a sum of per-member effects (least squares; an intercept is ``sum_i c_i = w`` times a
constant, so it is included)::

    s(c) ~ beta^T c,     beta = argmin sum_{c in controls} (s(c) - beta^T c)^2

and an image's controlled score is ``s(c(x)) - beta^T c(x)``: how much more its ablation moves
the query than the loss of its members predicts. The fit is additive on purpose: both scores
are exact quadratics in ``c`` (the loss is quadratic in the member weights; so is the squared
synthetic distance), and a fit with pairwise terms would reproduce every code's score and zero
every image's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from wherefrom.ensemble.codes import Codes, masks_from_bits, smallest_n
from wherefrom.errors import WherefromError


@dataclass(frozen=True)
class MemberEffect:
    """Per query, a score as a sum of per-member effects, ``s(c) ~ coef_q^T c``, fitted on control codes.

    ``coef``: Q x n (float64); ``r2``: Q, the share of the controls' score variance it explains."""

    coef: Tensor
    r2: Tensor

    @classmethod
    def fit(cls, controls: np.ndarray, values: Tensor) -> MemberEffect:
        """Least squares of ``values`` (Q x M, the score of each control code) on ``controls`` (M x n bool)."""
        x = torch.as_tensor(np.asarray(controls), dtype=torch.float64)
        y = values.to(torch.float64).T  # M x Q
        coef = torch.linalg.lstsq(x, y, driver="gelsd").solution  # n x Q
        resid = y - x @ coef
        spread = (y - y.mean(0)).pow(2).sum(0)
        r2 = torch.where(spread > 0, 1 - resid.pow(2).sum(0) / spread.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(spread))
        return cls(coef.T.contiguous(), r2)

    def __call__(self, bits: np.ndarray) -> Tensor:
        """The fitted member effect of each code row (N x n bool): Q x N."""
        return self.coef @ torch.as_tensor(np.asarray(bits), dtype=torch.float64).T


def control_codes(codes: Codes, control: bool | None) -> np.ndarray | None:
    """The control codes to score with: ``None`` for ``control=False``; for ``control=None`` (auto),
    the unused codes when they span the ``n`` members (else ``None``); for ``control=True`` the same,
    refused with the ``n`` that leaves enough when they do not."""
    if control is False:
        return None
    controls = codes.controls()
    if len(controls) >= codes.n and np.linalg.matrix_rank(controls.astype(np.float64)) == codes.n:
        return controls
    if control is None:
        return None
    units = len(np.unique(masks_from_bits(codes.bits)))
    raise WherefromError(
        f"controlled scores need unused codes that span the {codes.n} members, but {units} images use {units} of the "
        f"C({codes.n}, {codes.w}) codes and leave {len(controls)}; train the ensemble with n >= {smallest_n(units, codes.w, units)} "
        f"at w = {codes.w} (as many controls as images), or score without controls"
    )


def image_scores(
    score: Callable[[np.ndarray], Tensor], codes: Codes, num_images: int | None = None, controls: np.ndarray | None = None
) -> tuple[np.ndarray, MemberEffect | None]:
    """Q x ``num_images`` scores of the training images from ``score`` (code rows, N x n bool -> Q x N),
    0 outside the codes' split; with ``controls``, minus the member effect fitted on them (returned too)."""
    num_images = int(codes.indices[-1]) + 1 if num_images is None else num_images
    if num_images <= codes.indices[-1]:
        raise WherefromError(f"the codes cover global index {int(codes.indices[-1])} but num_images is {num_images}")
    values = score(codes.bits).to(torch.float64)
    effect = None
    if controls is not None:
        effect = MemberEffect.fit(controls, score(controls))
        values = values - effect(codes.bits)
    scores = np.zeros((values.shape[0], num_images), dtype=np.float64)
    scores[:, codes.indices] = values.cpu().numpy()
    return scores, effect


__all__ = ["MemberEffect", "control_codes", "image_scores"]
