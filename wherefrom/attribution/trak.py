"""TRAK / D-TRAK scores from the store's features.

TRAK (Park et al. 2023, Alg. 1) with D-TRAK's choices for diffusion (Zheng et
al. 2024, Sec. 3): no output reweighting (``Q = I``), query features made with
the same config as the training features, and for each model id ``m``::

    tau_m(q) = phi_m(q)^T (Phi_m^T Phi_m + lambda_m I)^{-1} Phi_m^T      (1 x N)

averaged over the M model ids (checkpoints and/or ensemble members). ``Phi_m``
(N x D) is read in row blocks, so memory is ``O(D^2 + Q N + block D)``.

Damping: ``lambda_m = damping * tr(Phi_m^T Phi_m) / min(N, D)``, i.e. ``damping``
times the mean *nonzero* eigenvalue of the feature kernel. It is scale-free
(features of different output functions differ by orders of magnitude), means the
same for any D or N (dense, structured or unprojected gradients), and keeps the
solve well posed when ``D >= N``. The defaults, :data:`DAMPING` (D-TRAK 0.1, TRAK
1.0), were chosen on the LDS benchmark's tuning queries
(``benchmarks/tune_defaults.py``; curves in ``benchmarks/results/tuning_digits500.md``):
D-TRAK peaks at 0.03-0.1 and loses 0.05-0.1 LDS at 1; TRAK is flat from 0.3 to 1
and loses 0.06 at 0.03.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from wherefrom.attribution.protocol import Attribution, Needs
from wherefrom.errors import FingerprintMismatchError, WherefromError
from wherefrom.features import METHOD_OUTPUTS, FeatureConfig, Projection, project_images
from wherefrom.io import weights_hash
from wherefrom.store import Entry, Store, check_store
from wherefrom.target import as_data, as_queries, attributable, image_names

DAMPING: dict[str, float] = {"dtrak": 0.1, "trak": 1.0}  # relative damping per method (see the module docstring)
BLOCK_ROWS = 8192


def damping_value(damping: float, trace: Tensor, rank: int) -> Tensor:
    """``lambda = damping * tr(K) / rank``: ``damping`` times the mean *nonzero* eigenvalue of
    the feature kernel (``rank = min(D, N)``), the same scale for any D, N or output function."""
    return damping * trace / max(rank, 1)


def kernel_scores(cross: Tensor | np.ndarray, gram: Tensor | np.ndarray, damping: float = DAMPING["dtrak"]) -> np.ndarray:
    """TRAK scores from inner products: ``phi_q Phi^T (Phi Phi^T + lambda I)^{-1}`` (float64),

    equal to ``phi_q (Phi^T Phi + lambda I)^{-1} Phi^T`` by the push-through identity; ``cross``
    is ``Q x N`` (``phi_q Phi^T``), ``gram`` ``N x N`` (``Phi Phi^T``), ``lambda`` as in
    :func:`damping_value` with rank N (use when N < D, e.g. unprojected gradients).
    """
    cross, gram = (torch.as_tensor(np.asarray(x), dtype=torch.float64) for x in (cross, gram))
    if damping <= 0:
        raise WherefromError(f"damping must be > 0 for the kernel form (N x N Gram), got {damping}")
    lam = damping_value(damping, torch.trace(gram), len(gram))
    chol, info = torch.linalg.cholesky_ex(gram + lam * torch.eye(len(gram), dtype=torch.float64))
    if info:
        raise WherefromError("the feature Gram matrix is singular (all-zero features?); pass a positive damping")
    return torch.cholesky_solve(cross.T, chol).T.numpy()


def _rows(phi: np.ndarray, normalize: bool = False) -> Tensor:
    """Feature rows in float64; ``normalize`` scales every nonzero row to unit norm
    (Diffusion-ReTrac's renormalisation of training gradients, Xie et al. 2024)."""
    rows = torch.from_numpy(np.asarray(phi, dtype=np.float64))
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-300) if normalize else rows


def _blocks(phi: np.ndarray, block: int, normalize: bool = False) -> Iterator[tuple[int, Tensor]]:
    """``(start, rows)`` of a (memory-mapped) feature matrix in float64 row blocks (see :func:`_rows`)."""
    for s in range(0, len(phi), block):
        yield s, _rows(phi[s : s + block], normalize)


def trak_scores(
    train: Sequence[np.ndarray], queries: Sequence[Tensor | np.ndarray], damping: float = DAMPING["dtrak"], block: int = BLOCK_ROWS, normalize: bool = False
) -> np.ndarray:
    """``Q x N`` scores, the mean over model ids of ``phi_q (Phi^T Phi + lambda I)^-1 Phi^T`` (float64).

    ``train[m]`` is model id m's N x D features (a memmap is read in ``block`` rows),
    ``queries[m]`` its Q x D query features. All-zero rows (images outside the split)
    score 0; when fewer rows than D are nonzero the solve runs on their Gram matrix
    (:func:`kernel_scores`), which gives the same numbers. ``normalize`` unit-normalises the
    training rows first (opt-in; see :func:`_blocks`).
    """
    if len(train) != len(queries) or not train:
        raise WherefromError("need one query feature matrix per training feature matrix (at least one model id)")
    if damping < 0:
        raise WherefromError(f"damping must be >= 0, got {damping}")
    scores = None
    for phi, phi_q in zip(train, queries):
        n, d = phi.shape
        phi_q = torch.as_tensor(np.asarray(phi_q), dtype=torch.float64)
        nonzero = np.flatnonzero(np.concatenate([(b != 0).any(1).numpy() for _, b in _blocks(phi, block)]))
        part = np.zeros((len(phi_q), n))
        if 0 < len(nonzero) < d and damping > 0:
            live = _rows(phi[nonzero], normalize)
            part[:, nonzero] = kernel_scores(phi_q @ live.T, live @ live.T, damping)
        else:
            kernel = torch.zeros(d, d, dtype=torch.float64)
            for _, b in _blocks(phi, block, normalize):
                kernel += b.T @ b
            lam = damping_value(damping, torch.trace(kernel), min(d, len(nonzero)))
            # X = (Phi^T Phi + lambda I)^{-1} phi_q^T  (D x Q), by Cholesky
            chol, info = torch.linalg.cholesky_ex(kernel + lam * torch.eye(d, dtype=torch.float64))
            if info:
                raise WherefromError("the feature kernel is singular (all-zero features?); pass a positive damping")
            x = torch.cholesky_solve(phi_q.T, chol)
            for i, b in _blocks(phi, block, normalize):
                part[:, i : i + block] = (b @ x).T.numpy()
        scores = part if scores is None else scores + part
    return scores / len(train)


def feature_entries(store: Store, output: str) -> dict[str, dict]:
    """The configs of the store's ``features/<output>/<model_id>`` entries (TRAK's and D-TRAK's sit side by side)."""
    prefix = Entry.features(output, "")
    entries = {k: v["config"] for k, v in store.entries("array").items() if k.startswith(prefix)}
    if not entries:
        others = sorted({k.split("/")[1] for k in store.entries("array") if k.startswith("features/")})
        have = f" (it has features of {others})" if others else ""
        raise WherefromError(
            f"store {str(store.root)!r} has no features of output {output!r}{have}; "
            f"featurise the model into it with output {output!r} first (the TRAKFeatures callback or the featurize command)"
        )
    return entries


def network_for(module, store: Store, model_id: str, config: dict) -> nn.Module:
    """The network a model id's features were made with: a denoiser of ``module``, or an
    intermediate checkpoint's weights saved in the store (``weights/<model_id>``)."""
    denoisers = module.denoisers()
    if model_id in denoisers:
        net = denoisers[model_id]
    else:
        base = model_id.split("@")[0]
        if base not in denoisers or not store.has(Entry.weights(model_id)):
            raise WherefromError(f"store features {model_id!r} belong to no network of this checkpoint and the store has no weights for it")
        net = copy.deepcopy(denoisers[base])
        net.load_state_dict(store.load_tensors(Entry.weights(model_id)))
    if weights_hash(net) != config["weights"]:
        raise FingerprintMismatchError(
            f"features {model_id!r} in {str(store.root)!r} were made from other weights than this checkpoint's; "
            "featurise this checkpoint, replacing them (overwrite)"
        )
    return net


def query_features(
    net: nn.Module, module, model_id: str, config: FeatureConfig, queries: Tensor, batch_size: int = 64, cond: Tensor | None = None
) -> Tensor:
    """Features of query images (with their conditions ``cond``) with the training config; query
    ``q`` draws its noise as global index ``-(q + 1)``, outside the training index space."""
    projection = Projection(config, net, model_id)
    out = []
    for s in range(0, len(queries), batch_size):
        index = -torch.arange(s, min(s + batch_size, len(queries))) - 1
        part = None if cond is None else cond[s : s + batch_size]
        out.append(project_images(projection, module.task, queries[s : s + batch_size], index, config, cond=part).cpu())
    return torch.cat(out)


def store_scores(
    module, datamodule, queries: Tensor, store: str | Path, method: str, damping: float, normalize: bool, batch_size: int, cond: Tensor | None = None,
    query_timesteps: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """TRAK / D-TRAK scores (Q x N) of ``queries`` (conditions ``cond``) from the store's ``method`` features, averaged over
    its model ids; ``query_timesteps`` gives the queries their own number of draws (default: the features'). Also
    how they were made: the store entries, their draws K and dimension D, the query draws and the damping."""
    store = Store.open(store)
    check_store(store, datamodule.fingerprint, module.codes_fingerprint)
    train, query = [], []
    entries = feature_entries(store, METHOD_OUTPUTS[method])
    for name, config in entries.items():
        net = network_for(module, store, config["model_id"], config)
        was_training = net.training
        net.eval()
        feature_config = FeatureConfig.from_dict(config)
        query_config = dataclasses.replace(feature_config, timesteps=query_timesteps or feature_config.timesteps)
        query.append(query_features(net, module, config["model_id"], query_config, queries, batch_size, cond))
        net.train(was_training)
        train.append(store.read_array(name))
    config = next(iter(entries.values()))
    info = {"store": str(store.root), "entries": sorted(entries), "draws": config["timesteps"], "query_draws": query_timesteps or config["timesteps"],
            "dim": config["dim"], "damping": damping, "normalize": normalize}  # fmt: skip
    return trak_scores(train, query, damping, normalize=normalize), info


@dataclass
class TRAK:
    """TRAK (Park et al. 2023) with the training-loss output function, from a feature store.

    Unit and sign: a kernel-regression weight of the image for the query (comparable between
    images for one query, not a loss change); larger = more influential.

    Args:
        store: the folder of its features (the featurize command or the TRAKFeatures callback, method ``trak``).
        damping: relative damping (x the feature kernel's mean nonzero eigenvalue, see :func:`damping_value`).
        normalize: unit-normalise training features first (ReTrac-style, opt-in).
        query_timesteps: seeded draws per query feature (default: the training features').
        batch_size: query featurisation batch.
        denoiser: attribute path of the network on a module that holds several (e.g. ``"unet"``).
    """

    store: str | None = None
    damping: float = DAMPING["trak"]
    normalize: bool = False
    query_timesteps: int | None = None
    batch_size: int = 64
    denoiser: str | None = None

    name: ClassVar[str] = "trak"
    needs: ClassVar[Needs] = Needs.FEATURES
    unit: ClassVar[str] = "TRAK's kernel-regression weight of the image for the query's loss; larger = more influential (a relative score, not a loss change)"

    def __post_init__(self) -> None:
        if self.damping <= 0:
            raise WherefromError(f"damping must be > 0, got {self.damping}")
        if self.batch_size < 1 or (self.query_timesteps is not None and self.query_timesteps < 1):
            raise WherefromError(f"batch_size and query_timesteps must be >= 1, got {self.batch_size} and {self.query_timesteps}")

    def attribute(self, module, data, queries: Tensor, cond: Tensor | None = None) -> Attribution:
        if self.store is None:
            raise WherefromError(f"{self.name} needs a store, {type(self).__name__}(store=...): the folder of its features (the TRAKFeatures(method={self.name!r}) callback or the featurize command)")
        data = as_data(data, type(self).__name__)
        queries = as_queries(queries, data, f"{type(self).__name__} queries")
        module = attributable(module, type(self).__name__, self.denoiser)
        scores, info = store_scores(module, data, queries, self.store, self.name, self.damping, self.normalize, self.batch_size, cond, self.query_timesteps)
        return Attribution(scores, queries, self.name, split=data.indices, unit=self.unit, names=image_names(data), info=info)


@dataclass
class DTRAK(TRAK):
    """D-TRAK (Zheng et al., ICLR 2024): TRAK with the square-norm output function ``mean(eps_theta^2)``."""

    damping: float = DAMPING["dtrak"]

    name: ClassVar[str] = "dtrak"
    unit: ClassVar[str] = "D-TRAK's kernel-regression weight of the image for the query's mean eps^2; larger = more influential (a relative score, not a loss change)"


__all__ = ["DAMPING", "DTRAK", "TRAK", "store_scores", "damping_value", "kernel_scores", "feature_entries", "network_for", "query_features", "trak_scores"]
