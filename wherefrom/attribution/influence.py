"""K-FAC / EK-FAC influence scores (Mlodozeniec et al. 2024, arXiv 2410.13850, eq. 5 and Sec. 4).

For a query ``q`` and a training image ``x``::

    score(q, x) = grad m(q)^T (F + lambda I)^{-1} grad L(x)

``m`` is the measurement (``loss``, ``elbo``, ``square_norm``, ``loss_at_time``)
and ``L`` the training loss, each averaged over K seeded ``(t, eps)`` draws;
``F`` is the block-diagonal (EK-)FAC curvature of :mod:`wherefrom.kfac`
with its per-layer damping. Up-weighting ``x`` by ``e`` moves the optimum by
``-e (F + lambda I)^{-1} grad L(x)`` (Koh & Liang 2017, eq. 1-2), so removing it
(``e = -1/N``) raises ``m(q)`` by about ``score / N``: larger = more helpful to ``q``.

Only query gradients are preconditioned (Q of them, not N). The sum runs over
the parameters of the Linear/Conv2d layers K-FAC covers; other parameters
(GroupNorm affines) get zero weight, as in the structured TRAK projection.

* **stored** (default when the store has it): each training gradient was written once
  in the K-FAC eigenbasis (:mod:`wherefrom.kfac.stored`); a call computes
  only the Q query gradients and one product with the stored rows.
* **exact**: training gradients are formed densely for every call (small models; the reference).
* **projected**: the store's TRAK features (output ``loss``, written by
  the featurize command, method ``trak``) are reused; the preconditioned query
  gradient is projected with the same matrix, and ``<P u, P v> / c``
  estimates ``<u, v>`` (``c = E|P u|^2 / |u|^2``, the projection's scale).

Draws: query ``q`` uses global index ``-(q + 1)`` and training image ``i`` index
``i``, both on the FEATURES stream with the draws of the features' config, so
exact, stored and projected mode estimate the same numbers. Queries may take more
draws than the training side (``query_timesteps``): they are few.

Ensembles: member ``i`` scores only the images it trained on; the ensemble's
score is ``(1/n) sum_{i in S(x)} score_i(q, x)`` (its eps is the members' mean).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from wherefrom.attribution.protocol import Attribution, Needs
from wherefrom.attribution.trak import network_for
from wherefrom.errors import WherefromError
from wherefrom.features import (
    FeatureConfig,
    Projection,
    ProjectionKind,
    num_parameters,
    per_sample_grads,
)
from wherefrom.kfac import (
    HEURISTIC_DAMPING,
    load_preconditioner,
    precondition,
    training_split,
)
from wherefrom.kfac.stored import open_stored
from wherefrom.memory import gradient_rows
from wherefrom.progress import progress_bar
from wherefrom.store import Entry, Store, as_tensor, check_store
from wherefrom.target import as_data, as_queries, attributable, image_names
from wherefrom.task import DiffusionTask, Stream, condition

MEASURES = ("loss", "elbo", "square_norm", "loss_at_time")
BLOCK_BYTES = 1 << 28  # the store rows in memory at once while scoring (256 MiB)


def query_gradient_batches(
    net: nn.Module, task: DiffusionTask, queries: Tensor, measurement: str, config: FeatureConfig, batch_size: int, cond: Tensor | None = None, start: int = 0
) -> Iterator[Tensor]:
    """``B x P`` gradients of the measurement of each batch of queries (query ``q``, at position ``start + q``: index
    ``-(start + q + 1)``, condition ``cond[q]``), batches of at most ``batch_size`` and of what the memory budget holds."""
    first = next(net.parameters())
    step = min(batch_size, gradient_rows(num_parameters(net), first.dtype, first.device))
    for s in range(0, len(queries), step):
        index = -torch.arange(start + s, start + min(s + step, len(queries))) - 1
        x0 = queries[s : s + step].to(first.device)
        c = None if cond is None else cond[s : s + step].to(first.device)
        yield per_sample_grads(net, task, x0, index, measurement, config.draws(task), Stream.FEATURES, c)


def query_gradients(
    net: nn.Module, task: DiffusionTask, queries: Tensor, measurement: str, config: FeatureConfig, batch_size: int, cond: Tensor | None = None, start: int = 0
) -> Tensor:
    """``Q x P`` gradients of the measurement of each query (see :func:`query_gradient_batches`)."""
    return torch.cat(list(query_gradient_batches(net, task, queries, measurement, config, batch_size, cond, start)))


def exact_scores(
    net: nn.Module, task: DiffusionTask, datamodule, indices: np.ndarray, pre: Tensor, config: FeatureConfig, batch_size: int, progress: bool = False
) -> np.ndarray:
    """``pre @ grad L(x)`` for every training index (``Q x N``; zero outside ``indices``)."""
    device = pre.device
    scores = np.zeros((len(pre), datamodule.num_images))
    batches = DataLoader(datamodule.dataset(indices), batch_size=batch_size, shuffle=False)
    step = gradient_rows(pre.shape[1], pre.dtype, device)  # training gradients held at once
    for batch in progress_bar(batches, desc="training gradients", disable=not progress):
        x0, index, c = batch["image"].to(device=device, dtype=pre.dtype), batch["index"], condition(batch)
        for s in range(0, len(x0), step):
            part = None if c is None else c[s : s + step].to(device)
            g = per_sample_grads(net, task, x0[s : s + step], index[s : s + step], "loss", config.draws(task), Stream.FEATURES, part)
            scores[:, index[s : s + step].numpy()] = (pre @ g.T).double().cpu().numpy()
    return scores


def projection_scale(projection: Projection) -> float:
    """``c`` with ``E <P u, P v> = c <u, v>``: the dimension for a dense projection (i.i.d.
    N(0, 1) entries); 1 for the structured one (scaled orthonormal factors)."""
    return float(projection.dim) if projection.kind is ProjectionKind.DENSE else 1.0


def score_features(queries: Tensor, features: np.ndarray, dtype: str | None = None, block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """``queries @ features^T`` (``Q x D`` by ``N x D``) as float64, read in row blocks of at most
    ``block_bytes`` (memory flat in N). ``dtype``: the store array's dtype (default: the numpy
    array's). The product runs in float32 for float32 and bfloat16 stores (bfloat16 blocks are
    widened one at a time) and in float64 for float64 ones."""
    dtype = dtype or features.dtype.name
    out = np.empty((len(queries), len(features)), dtype=np.float64)
    block = max(1, block_bytes // max(1, features[:1].nbytes))
    q = None
    for s in range(0, len(features), block):
        rows = as_tensor(features[s : s + block], dtype).to(queries.device)
        rows = rows.float() if rows.dtype == torch.bfloat16 else rows
        q = queries.to(rows.dtype) if q is None else q
        out[:, s : s + block] = (q @ rows.T).double().cpu().numpy()
    return out


def loss_features(store: Store, model_id: str) -> tuple[str, dict]:
    """The store's TRAK training-loss features of ``model_id`` (projected mode needs ``output = loss``)."""
    name = Entry.features("loss", model_id)
    if not store.has(name):
        raise WherefromError(f"grads='projected' needs {name} in {str(store.root)!r}; featurise with method 'trak' (output loss) into that store")
    return name, store.config(name)


class Grads(str, enum.Enum):
    """Where K-FAC's training gradients come from."""

    AUTO = "auto"  # stored when the store holds stored influence for every model id, else exact
    STORED = "stored"  # the store's influence rows (KFACFactors(features=True) or the factors command; any size, fast)
    EXACT = "exact"  # formed densely from the checkpoint for every query call (small models; the reference)
    PROJECTED = "projected"  # the store's TRAK training-loss features (random projection; weak at small D)


def resolve_grads(store: Store, module, grads: Grads | str) -> Grads:
    """``auto`` -> ``stored`` when every model id of ``module`` has stored influence in ``store``, else ``exact``."""
    grads = Grads(grads)
    if grads is not Grads.AUTO:
        return grads
    return Grads.STORED if all(store.has(Entry.influence(m)) for m in module.denoisers()) else Grads.EXACT


def influence_scores(
    module,
    datamodule,
    queries: Tensor,
    store: Store,
    measurement: str = "loss",
    ekfac: bool = False,
    damping: float | None = None,
    relative: float = HEURISTIC_DAMPING,
    grads: Grads | str = Grads.EXACT,
    config: FeatureConfig | None = None,
    batch_size: int = 64,
    progress: bool = False,
    cond: Tensor | None = None,
    query_timesteps: int | None = None,
) -> np.ndarray:
    """``Q x N`` (EK-)FAC influence scores of ``module``'s denoisers (mean over model ids) for
    queries with conditions ``cond``.

    ``config`` sets the draws of exact mode (default: output ``loss`` with
    :class:`FeatureConfig`'s draws); projected and stored mode use the stored features' config. ``query_timesteps``
    gives the queries their own number of draws (default: the training side's). ``damping`` is
    an absolute lambda for every layer; when ``None``, each layer gets ``relative`` x its mean eigenvalue.
    """
    if measurement not in MEASURES:
        raise WherefromError(f"measurement must be one of {list(MEASURES)} for K-FAC influence, got {measurement!r}")
    try:
        grads = resolve_grads(store, module, grads)
    except ValueError:
        raise WherefromError(f"grads must be one of {[g.value for g in Grads]}, got {grads!r}") from None
    config = config or FeatureConfig(output="loss")
    nets = module.denoisers()
    total = np.zeros((len(queries), datamodule.num_images))
    for model_id, denoiser in nets.items():
        split = training_split(module, model_id, datamodule.indices)
        feature_config = config
        if grads is Grads.PROJECTED:
            name, stored_config = loss_features(store, model_id)
            net = network_for(module, store, model_id, stored_config)
            feature_config = FeatureConfig.from_dict(stored_config)
        else:
            net = denoiser
        was_training = net.training
        net.eval()
        try:
            preconditioner = load_preconditioner(store, model_id, net, ekfac, damping, relative)
            if grads is Grads.STORED:
                stored, rows = open_stored(store, model_id, net)
                first = next(net.parameters())
                block = gradient_rows(stored.dim, torch.float64, first.device)  # queries whose rows the memory budget holds
                part = np.zeros((len(queries), datamodule.num_images))
                for s in range(0, len(queries), block):  # each block of queries reads the stored rows once
                    c = None if cond is None else cond[s : s + block]
                    batches = query_gradient_batches(net, module.task, queries[s : s + block], measurement, stored.config.features(query_timesteps), batch_size, c, s)
                    part[s : s + block] = score_features(torch.cat([stored.rows(g, preconditioner) for g in batches]), rows, stored.config.dtype)
            else:
                query_config = dataclasses.replace(feature_config, timesteps=query_timesteps or feature_config.timesteps)
                first = next(net.parameters())
                block = gradient_rows(num_parameters(net), first.dtype, first.device)  # queries whose preconditioned gradients the budget holds
                projection = None if grads is Grads.EXACT else Projection(feature_config, net, model_id)
                features = None if grads is Grads.EXACT else store.read_array(name)
                part = np.zeros((len(queries), datamodule.num_images))
                for s in range(0, len(queries), block):
                    c = None if cond is None else cond[s : s + block]
                    pre = precondition(net, query_gradients(net, module.task, queries[s : s + block], measurement, query_config, batch_size, c, start=s), preconditioner)
                    if grads is Grads.EXACT:  # each block of queries passes over the training split once
                        part[s : s + block] = exact_scores(net, module.task, datamodule, split, pre, feature_config, batch_size, progress)
                    else:
                        part[s : s + block] = score_features(projection.project(pre), features) / projection_scale(projection)
                if grads is not Grads.EXACT:  # exact mode scores only the split already
                    mask = np.zeros(datamodule.num_images, dtype=bool)
                    mask[split] = True
                    part[:, ~mask] = 0.0
        finally:
            net.train(was_training)
        total += part
    return total / len(nets)


@dataclass
class KFAC:
    """K-FAC influence (Mlodozeniec et al. 2024) from a factor store.

    Unit and sign: ``score(q, x) = grad m(q)^T (F + lambda I)^{-1} grad L(x)``; removing ``x``
    from the N training images raises the query's measurement by about ``score / N``
    (larger = more helpful to ``q``).

    Args:
        store: the folder written by ``wherefrom factors`` or the KFACFactors callback.
        measurement: the query function ``m``: one of :data:`MEASURES`.
        damping: relative damping, x each layer's mean eigenvalue.
        grads: training gradients from the store's stored influence (``stored``; ``auto`` picks it
            when the store has it), formed densely per call (``exact``), or TRAK's features (:class:`Grads`).
        timesteps: seeded ``(t, eps)`` draws per training gradient in exact mode (default 100); stored and
            projected mode read the store's, and another value is refused rather than ignored.
        query_timesteps: seeded draws per query gradient (default: the training side's).
        batch_size: gradient batch.
        denoiser: attribute path of the network on a module that holds several (e.g. ``"unet"``).
    """

    store: str | None = None
    measurement: Literal["loss", "elbo", "square_norm", "loss_at_time"] = "loss"
    damping: float = HEURISTIC_DAMPING
    grads: Grads = Grads.AUTO
    timesteps: int | None = None
    query_timesteps: int | None = None
    batch_size: int = 64
    denoiser: str | None = None

    name: ClassVar[str] = "kfac"
    needs: ClassVar[Needs] = Needs.FACTORS
    unit: ClassVar[str] = (
        "influence grad m(q)^T (F + lambda I)^-1 grad L(x): removing the image from the N training images raises the "
        "query's measurement by about score / N (predicted_change); larger = more helpful to the query"
    )
    ekfac: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.measurement not in MEASURES:
            raise WherefromError(f"measurement must be one of {list(MEASURES)} for K-FAC influence, got {self.measurement!r}")
        try:
            self.grads = Grads(self.grads)
        except ValueError:
            raise WherefromError(f"grads must be one of {[g.value for g in Grads]}, got {self.grads!r}") from None
        if self.damping <= 0 or (self.timesteps is not None and self.timesteps < 1) or self.batch_size < 1 or (self.query_timesteps is not None and self.query_timesteps < 1):
            raise WherefromError(
                f"damping must be > 0 and timesteps, query_timesteps, batch_size >= 1; got {self.damping}, {self.timesteps}, {self.query_timesteps}, {self.batch_size}"
            )

    def attribute(self, module, data, queries: Tensor, cond: Tensor | None = None) -> Attribution:
        if self.store is None:
            raise WherefromError(f"{self.name} needs a store, the folder written by `wherefrom factors` (or the KFACFactors callback)")
        data = as_data(data, type(self).__name__)
        queries = as_queries(queries, data, f"{type(self).__name__} queries")
        module = attributable(module, type(self).__name__, self.denoiser)
        store = Store.open(self.store)
        check_store(store, data.fingerprint, module.codes_fingerprint)
        grads = resolve_grads(store, module, self.grads)
        draws = self.timesteps or FeatureConfig.timesteps
        if grads in (Grads.STORED, Grads.PROJECTED):  # the training side was drawn when the store was written
            name = Entry.influence if grads is Grads.STORED else (lambda m: loss_features(store, m)[0])
            stored = {store.config(name(m))["timesteps"] for m in module.denoisers()}
            if self.timesteps is not None and stored != {self.timesteps}:
                raise WherefromError(f"{self.name}: the store's {grads.value} training gradients took {sorted(stored)[0]} draws, not timesteps={self.timesteps}; "
                                     "drop timesteps (it is the store's), or pass grads='exact' to draw the training gradients anew")  # fmt: skip
            draws = sorted(stored)[0]
        scores = influence_scores(
            module, data, queries, store, self.measurement, ekfac=self.ekfac, relative=self.damping, grads=grads,
            config=FeatureConfig(output="loss", timesteps=draws), batch_size=self.batch_size, progress=True, cond=cond,
            query_timesteps=self.query_timesteps,
        )  # fmt: skip
        info = {"grads": grads.value, "measurement": self.measurement, "draws": draws, "query_draws": self.query_timesteps or draws, "damping": self.damping}
        return Attribution(scores, queries, self.name, split=data.indices, info=info, unit=self.unit, removal_scale=1.0 / len(data.indices), names=image_names(data))


@dataclass
class EKFAC(KFAC):
    """EK-FAC influence: K-FAC with eigenvalue correction (George et al. 2018)."""

    name: ClassVar[str] = "ekfac"
    ekfac: ClassVar[bool] = True


__all__ = ["EKFAC", "KFAC", "MEASURES", "Grads", "exact_scores", "influence_scores", "loss_features", "precondition", "projection_scale", "query_gradient_batches", "query_gradients", "resolve_grads", "score_features"]
