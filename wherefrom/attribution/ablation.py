"""The encoded ensemble's attributors: synthetic ablation of every training image through the
sampler's Jacobian (:class:`SyntheticAblation`) and of a quadratic model of the query loss
(:class:`AblationLoss`), over the Jacobian math of :mod:`wherefrom.ensemble.synthetic`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from wherefrom.attribution.protocol import Attribution, Needs
from wherefrom.ensemble.controls import MemberEffect, control_codes, image_scores
from wherefrom.ensemble.synthetic import (
    QUERY_TOLERANCE,
    Linearization,
    ablated_weights,
    exact_ablation,
    linearize,
    quadratic_measurement,
    sampler_codes,
)
from wherefrom.errors import WherefromError
from wherefrom.sampling import SchedulerType
from wherefrom.target import as_data, as_queries, image_names


def _rerank(name: str, candidates: np.ndarray, distances: np.ndarray) -> dict[str, list]:
    order = np.argsort(-distances, kind="stable")
    return {f"exact_{name}": distances.tolist(), f"{name}_order": candidates[order].tolist()}


CONTROL_UNIT = (
    "; controlled (the default when the codes leave unused ones): minus what dropping the same members predicts, "
    "a sum of per-member effects fitted on the unused codes, so > 0 = more than its members' loss explains"
)


def _control_info(controls, effect: MemberEffect | None) -> dict:
    """What ``topk.json`` says of the control: the number of unused codes the member effect was fitted on
    and the share of their scores' variance it explains (mean over queries)."""
    if effect is None:
        return {"control": "none"}
    return {"control": "member effect fitted on unused codes", "controls": len(controls), "member_effect_r2": float(effect.r2.mean())}


def _ensemble(module, name: str):
    if getattr(module, "codes", None) is None or not hasattr(module, "sampler"):
        raise WherefromError(f"{name} needs an encoded-ensemble checkpoint with codes (an EncodedEnsemble, e.g. configs/digits_ensemble.yaml)")
    return module.eval()


@dataclass
class SyntheticAblation:
    """Synthetic ablation (Dai, Yew & Gifford): every training image's effect on the ensemble's
    own samples, from one Jacobian of the sampling chain in the member weights.

    Unit and sign: how far (L2 over pixels in [-1, 1]) the sample moves, to first order, when the
    image's members are dropped; larger = more influential.

    The queries must be the ensemble's samples ``0..Q-1`` with this ``seed``, ``steps``,
    ``scheduler`` (the chain's exogenous noise) and, for a conditional ensemble, their conditions
    ``cond`` and classifier-free ``guidance``. The result carries the top-k synthetic
    counterfactuals (artifact ``counterfactuals``); ``exact`` also reruns the chain without the
    members of each top-k image (artifact ``exact_counterfactuals``) and adds, per query, the
    exact L2 distances and the top-k re-ranked by them (and by LPIPS when its backbone file is present).

    ``control``: subtract the member effect fitted on the unused codes, as :class:`AblationLoss` does.
    """

    seed: int = 0
    steps: int = 100
    scheduler: SchedulerType = SchedulerType.AUTO
    exact: bool = False
    top_k: int = 10
    batch_size: int = 64
    guidance: float = 1.0
    control: bool | None = None

    name: ClassVar[str] = "ablation"
    needs: ClassVar[Needs] = Needs.ENSEMBLE
    unit: ClassVar[str] = "how far the query sample moves (L2 over pixels in [-1, 1]) when the image's members are dropped, to first order; larger = more influential" + CONTROL_UNIT

    def __post_init__(self) -> None:
        self.scheduler = SchedulerType(self.scheduler)
        if min(self.steps, self.top_k, self.batch_size) < 1:
            raise WherefromError(f"steps, top_k and batch_size must be >= 1, got {self.steps}, {self.top_k}, {self.batch_size}")

    def attribute(self, module, data, queries: Tensor, cond: Tensor | None = None) -> Attribution:
        data = as_data(data, type(self).__name__)
        queries = as_queries(queries, data, f"{type(self).__name__} queries")
        module = _ensemble(module, self.name)
        # guidance's null: the module's null class, or a text ensemble's empty caption from its data
        null = module.null_condition if module.null_condition is not None else getattr(data, "null_condition", None)
        sampler = module.sampler(seed=self.seed, steps=self.steps, scheduler=self.scheduler, cond=cond, guidance=self.guidance, null=null)
        codes = sampler_codes(sampler)
        controls = control_codes(codes, self.control)
        lin = linearize(sampler, len(queries), batch_size=self.batch_size, progress=True)
        gap = float((lin.x0 - queries.to(lin.x0)).abs().max())
        if gap > QUERY_TOLERANCE:
            raise WherefromError(
                f"the queries differ from the ensemble's own samples by {gap:.3g}; synthetic ablation attributes the ensemble's "
                "samples: generate them with the same seed, steps and scheduler"
            )
        lin = Linearization(lin.queries, queries.to(lin.x0), lin.jacobian, lin.weights)  # x0: exactly the images shown
        scores, effect = image_scores(lin.ablation_distances, codes, data.num_images, controls)
        result = Attribution(scores, queries, self.name, split=data.indices, unit=self.unit, names=image_names(data), info=_control_info(controls, effect))
        top, _ = result.topk(self.top_k)
        deltas = ablated_weights(lin.weights, codes.bits[codes.rows(top.ravel())]).reshape(*top.shape, -1) - lin.weights
        result.artifacts["counterfactuals"] = lin.counterfactuals(deltas)
        if self.exact:
            from wherefrom.evaluation.distances import (  # the exact re-ranking only
                LPIPSDistance,
                alexnet_weights_path,
                l2_distance,
            )

            pairs_q = np.repeat(np.arange(len(top)), top.shape[1])
            exact = exact_ablation(sampler, pairs_q.tolist(), top.ravel().tolist(), self.batch_size)
            x0 = lin.x0[torch.as_tensor(pairs_q)]
            l2 = l2_distance(x0, exact).reshape(top.shape).double().cpu().numpy()
            result.extra = [_rerank("l2", top[q], l2[q]) for q in range(len(top))]
            if alexnet_weights_path().is_file():
                lp = LPIPSDistance().to(x0.device)(x0, exact).reshape(top.shape).double().cpu().numpy()
                for q, extra in enumerate(result.extra):
                    extra.update(_rerank("lpips", top[q], lp[q]))
            else:
                print(f"LPIPS re-ranking skipped: no backbone weights at {alexnet_weights_path()}")
            result.artifacts["exact_counterfactuals"] = exact.reshape(*top.shape, *exact.shape[1:])
        return result


@dataclass
class AblationLoss:
    """Signed encoded-ensemble scores: the rise of each query's ``measurement`` (loss or elbo, over
    ``timesteps`` seeded draws) when an image's members are dropped, exact for all N images from
    one quadratic form per query (:func:`quadratic_measurement`).

    Unit and sign: the measurement's own unit; larger = the image's members helped the query more.

    ``control``: subtract the member effect fitted on the codes no image carries
    (:mod:`wherefrom.ensemble.controls`), so a score says how much more the image's ablation raises
    the loss than losing its members predicts; ``None`` (default) does so when the codes leave
    unused ones, ``True`` requires it, ``False`` gives the raw rise. ``info["control"]`` says which."""

    measurement: Literal["loss", "elbo"] = "loss"
    timesteps: int = 100
    seed: int = 0
    control: bool | None = None

    name: ClassVar[str] = "ablation-loss"
    needs: ClassVar[Needs] = Needs.ENSEMBLE
    unit: ClassVar[str] = "the exact rise of the query's measurement when the image's ensemble members are dropped; larger = more helpful to the query" + CONTROL_UNIT

    def __post_init__(self) -> None:
        if self.measurement not in ("loss", "elbo"):
            raise WherefromError(f"measurement must be 'loss' or 'elbo' for ablation-loss, got {self.measurement!r}")
        if self.timesteps < 1:
            raise WherefromError(f"timesteps must be >= 1, got {self.timesteps}")

    def attribute(self, module, data, queries: Tensor, cond: Tensor | None = None) -> Attribution:
        data = as_data(data, type(self).__name__)
        queries = as_queries(queries, data, f"{type(self).__name__} queries")
        sampler = _ensemble(module, self.name).sampler()
        codes = sampler_codes(sampler)
        controls = control_codes(codes, self.control)
        quad = quadratic_measurement(sampler, queries, self.measurement, self.timesteps, seed=self.seed, cond=cond)
        scores, effect = image_scores(partial(quad.ablation_change, sampler.uniform_weights()), codes, data.num_images, controls)
        return Attribution(scores, queries, self.name, split=data.indices, unit=self.unit, names=image_names(data), info=_control_info(controls, effect))


__all__ = ["AblationLoss", "SyntheticAblation"]
