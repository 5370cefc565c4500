"""Stored influence: each training image's loss gradient written once into the store in its
layers' K-FAC eigenbasis, so an (EK-)FAC query costs one query gradient and a product with the
stored rows instead of recomputing every training gradient.

In the Kronecker eigenbasis ``Q_G (x) Q_A`` of a layer (eigenvectors sorted by decreasing
eigenvalue) the rotated gradient ``R = Q_G^T G Q_A`` diagonalises the damped (EK-)FAC inverse
(George et al. 2018, eq. 10; :class:`~wherefrom.kfac.KFACPreconditioner`)::

    g_q^T (F + lambda I)^{-1} g_x = sum_l sum_ij R_q[i, j] R_x[i, j] / (Lambda_ij + lambda_l)

A stored row holds, per layer,

* the block ``B = R[:k_out, :k_in]`` of the top eigen-directions (``P_out = Q_G[:, :k_out]``,
  ``P_in = Q_A[:, :k_in]``; LoGra, Choe et al. 2024, Sec. 3.3, initialises its projections
  from K-FAC eigenvectors), and
* optionally a sketch ``S = P_out^T (R - [B 0; 0 0]) P_in`` of the rest with scaled orthonormal
  (Haar) ``P_out, P_in`` (``r_out x r_in``; ``E[P P^T] = I``, so sketch inner products estimate
  the rest's without bias).

Training rows come from hooks: each layer's per-example gradient ``G = sum_pos g_pos a_pos^T``
(averaged over the K draws) is formed from one forward and one backward of the batch, then
rotated and reduced exactly as a dense gradient is; rows are stored in ``dtype`` (bfloat16 by
default: its 8-bit mantissa leaves the LDS unchanged, benchmarks/results/stored_influence_digits500.md).

The query side forms ``W = R_q / (Lambda + lambda)`` exactly and reduces it the same way, so
``score = <W_B, B_x> + <P_out^T W_rest P_in, S_x>``; with the whole basis kept and no sketch
this is exact mode's score. The preconditioning stays on the query side, where it is exact:
projecting a preconditioned query at random (``grads='projected'``) estimates the inner
product badly, since its mass sits in the low-curvature directions.

Layout: the budget ``dim`` is split over the layers in proportion to their effective
dimension ``sum_ij Lambda_ij / (Lambda_ij + lambda_l)`` (K-FAC eigenvalues, the default
relative damping), capped at each layer's size; within a layer the block shape
``k_out x k_in <= dim_l`` covering the most effective dimension is kept. ``residual_dim`` is
split in proportion to what each layer's block leaves uncovered. One featurisation serves
K-FAC and EK-FAC (same eigenbasis) at any damping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from wherefrom.ddp import Comm, LocalComm, on_rank_zero
from wherefrom.errors import FingerprintMismatchError, WherefromError, check_choices
from wherefrom.features import (
    FeatureConfig,
    layer_shape,
    projection_seed,
    scaled_orthonormal,
    structured_grads,
    trainable_parameters,
    write_rows,
)
from wherefrom.io import weights_hash
from wherefrom.kfac.factors import HEURISTIC_DAMPING, LayerEigen, layer_dims
from wherefrom.kfac.geometry import example_weight_grads
from wherefrom.kfac.preconditioner import KFACPreconditioner, eigen_from_tensors
from wherefrom.store import Entry, Store
from wherefrom.task import (
    DiffusionTask,
    Stream,
    TimestepStrategy,
    condition,
    generator_for,
)

DTYPES = ("bfloat16", "float32", "float64")  # precisions of the stored rows
RESIDUAL_TAG = 2  # extra seed word of the residual sketches (apart from TRAK's projections)


@dataclass(frozen=True)
class InfluenceConfig:
    """Everything that determines a stored influence row; kept in the manifest.

    Args:
        dim: budget of eigenbasis coordinates kept per image (split over layers, see the module docstring).
        residual_dim: budget of the random sketch of the remaining coordinates (0: none).
        timesteps: K, the seeded ``(t, eps)`` draws averaged per training gradient (exact mode's K).
        strategy: ``uniform`` or ``random`` timesteps, as for TRAK features.
        seed: seed of the residual sketches, mixed with the model id.
        dtype: precision of the stored rows: ``bfloat16`` (2 bytes per coordinate), ``float32`` or ``float64``.
    """

    # the tuning curve (benchmarks/results/stored_influence_digits500.md): the smallest budget within
    # 0.02 of exact mode for K-FAC and EK-FAC on both tuning query sets (512 KiB per image in bfloat16)
    dim: int = field(default=262144, metadata={"help": "eigenbasis coordinates kept per image (dtype bytes each: bfloat16 2, float32 4)"})
    residual_dim: int = field(default=0, metadata={"help": "random sketch of the other coordinates (0: none)"})
    timesteps: int = field(default=FeatureConfig.timesteps, metadata={"help": "K draws averaged per training gradient"})
    strategy: str = field(default=TimestepStrategy.UNIFORM.value, metadata={"help": "draws of t: uniform or random", "choices": TimestepStrategy})
    seed: int = field(default=0, metadata={"help": "seed of the residual sketches"})
    dtype: str = field(default="bfloat16", metadata={"help": "precision of the stored rows (bfloat16: LDS unchanged at half float32's bytes)", "choices": DTYPES})

    def __post_init__(self) -> None:
        if self.dim < 1 or self.residual_dim < 0 or self.timesteps < 1:
            raise WherefromError(f"dim and timesteps must be >= 1 and residual_dim >= 0, got {self.dim}, {self.timesteps}, {self.residual_dim}")
        check_choices(self)

    def features(self, timesteps: int | None = None) -> FeatureConfig:
        """The draws of the training gradients (or, with ``timesteps``, of query gradients) as a
        :class:`FeatureConfig` of the training loss: exact mode's draws."""
        return FeatureConfig(output="loss", timesteps=timesteps or self.timesteps, strategy=self.strategy)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> InfluenceConfig:
        missing = [f.name for f in fields(cls) if f.name not in config]
        if missing:
            raise WherefromError(f"these stored influence rows lack {missing} in their config (an older wherefrom wrote them); fit the factors with features again, overwriting them")
        return cls(**{f.name: config[f.name] for f in fields(cls)})


def allocate(budget: int, caps: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Integer shares of ``budget`` in proportion to ``weights``, each at most its cap; what a
    capped share leaves goes to the others (water-filling)."""
    shares = [0] * len(caps)
    active = [i for i, (c, w) in enumerate(zip(caps, weights)) if c > 0 and w > 0]
    left = budget
    while active and left > 0:
        total = sum(weights[i] for i in active)
        full = [i for i in active if left * weights[i] / total >= caps[i]]
        if not full:
            for i in active:
                shares[i] = int(left * weights[i] / total)
            break
        for i in full:
            shares[i] = caps[i]
            left -= caps[i]
        active = [i for i in active if i not in full]
    return shares


def block_shape(mass: Tensor, budget: int) -> tuple[int, int]:
    """``(k_out, k_in)`` with ``k_out k_in <= budget`` whose top-left block of ``mass`` (sorted
    eigen-directions) holds the most; the whole layer when the budget covers it."""
    d_out, d_in = mass.shape
    if budget >= d_out * d_in:
        return d_out, d_in
    if budget < 1:
        return 0, 0
    covered = mass.cumsum(0).cumsum(1)
    best, shape = -1.0, (0, 0)
    for k_out in range(1, min(d_out, budget) + 1):
        k_in = min(d_in, budget // k_out)
        value = float(covered[k_out - 1, k_in - 1])
        if value > best:
            best, shape = value, (k_out, k_in)
    return shape


def canonical(q: Tensor) -> Tensor:
    """Eigenvectors (columns) with the sign that makes each one's largest-magnitude entry positive,
    so stored coordinates do not flip with round-off in the factors (e.g. another rank count)."""
    top = q.gather(0, q.abs().argmax(0, keepdim=True))
    return q * torch.where(top < 0, -1.0, 1.0)


@dataclass
class StoredLayer:
    """One layer of a stored influence row: its sorted eigenbasis, kept block and residual sketch."""

    name: str
    module: nn.Linear | nn.Conv2d
    weight: slice
    bias: slice | None
    qa: Tensor  # d_in x d_in, eigenvectors by decreasing eigenvalue (float64)
    qg: Tensor  # d_out x d_out
    k_out: int
    k_in: int
    p_out: Tensor | None  # d_out x r_out residual sketch (rotated coordinates), or None
    p_in: Tensor | None  # d_in x r_in

    @property
    def dim(self) -> int:
        sketch = 0 if self.p_out is None else self.p_out.shape[1] * self.p_in.shape[1]
        return self.k_out * self.k_in + sketch

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)``: hooks yield the layer's whole per-example gradient (a ``LayerReduction``)."""
        return self.qg.shape[0], self.qa.shape[0]

    def reduce_grad(self, x: Tensor, g: Tensor, batch: int, draws: int) -> Tensor:
        """The layer's per-example gradient ``[sum g a^T, sum g]`` (``batch x d_out x d_in``, bias
        column last), summed over draws and positions, from its inputs and output gradients."""
        if isinstance(self.module, nn.Conv2d):
            weight, g = example_weight_grads(x, g, self.module, batch, draws), g.flatten(2).unflatten(0, (batch, draws))
        else:
            a, g = (t.reshape(len(t), -1, t.shape[-1]).transpose(1, 2).unflatten(0, (batch, draws)) for t in (x, g))
            weight = torch.einsum("bkop,bkip->boi", g, a)
        return weight if self.module.bias is None else torch.cat([weight, g.sum((1, 3)).unsqueeze(-1)], -1)

    def layer_grad(self, grads: Tensor) -> Tensor:
        """The layer's ``B x d_out x d_in`` gradient (bias column last) in dense gradients ``B x P``."""
        g = grads[:, self.weight].reshape(len(grads), self.qg.shape[0], -1)
        return g if self.bias is None else torch.cat([g, grads[:, self.bias].unsqueeze(-1)], -1)

    def rotated(self, g: Tensor) -> Tensor:
        """``R = Q_G^T G Q_A`` of the layer's gradients ``G`` (``B x d_out x d_in``), in their
        dtype; only its kept block when the layer has no sketch."""
        ko, ki = (self.k_out, self.k_in) if self.p_out is None else self.shape
        (d_out, d_in), qg, qa = self.shape, self.qg[:, :ko].to(g), self.qa[:, :ki].to(g)
        # the cheaper association of the two products
        return (qg.T @ g) @ qa if ko * d_in * (d_out + ki) <= ki * d_out * (d_in + ko) else qg.T @ (g @ qa)

    def reduce(self, r: Tensor) -> Tensor:
        """``[R[:k_out, :k_in], P_out^T (R - block) P_in]`` flattened (``B x dim``)."""
        block = r[:, : self.k_out, : self.k_in]
        parts = [block.flatten(1)]
        if self.p_out is not None:
            rest = r.clone()
            rest[:, : self.k_out, : self.k_in] = 0
            parts.append((self.p_out.T.to(r) @ rest @ self.p_in.to(r)).flatten(1))
        return torch.cat(parts, 1)


class StoredInfluence:
    """The stored influence rows of one model id: which coordinates each layer keeps.

    Args:
        net: the network (its trainable parameters define the dense-gradient layout).
        eigen: per-layer eigendecompositions (:func:`load_eigen`).
        config: the featurisation config.
        model_id: seeds the residual sketches.
    """

    def __init__(self, net: nn.Module, eigen: dict[str, LayerEigen], config: InfluenceConfig, model_id: str) -> None:
        self.net, self.config, self.model_id, self.eigen = net, config, model_id, eigen
        offsets, start = {}, 0
        for name, p in trainable_parameters(net).items():
            offsets[name] = slice(start, start + p.numel())
            start += p.numel()
        self.num_params = start
        modules = dict(net.named_modules())
        names = [n for n in sorted(eigen) if f"{n}.weight" in offsets and (modules[n].bias is None or f"{n}.bias" in offsets)]
        if not names:
            raise WherefromError(f"model {model_id!r} has no trained layer with K-FAC factors to store influence for")
        # effective dimension per eigen-direction pair, K-FAC eigenvalues with the default damping
        masses = []
        for n in names:
            lam = torch.outer(eigen[n].lg.flip(0), eigen[n].la.flip(0)).double()
            masses.append(lam / (lam + HEURISTIC_DAMPING * float(lam.mean())).clamp_min(1e-300))
        sizes = [m.numel() for m in masses]
        blocks = [block_shape(m, d) for m, d in zip(masses, allocate(config.dim, sizes, [float(m.sum()) for m in masses]))]
        uncovered = [float(m.sum() - m[:ko, :ki].sum()) for m, (ko, ki) in zip(masses, blocks)]
        residual = allocate(config.residual_dim, [s - ko * ki for s, (ko, ki) in zip(sizes, blocks)], uncovered)
        seed = projection_seed(config.seed, model_id)
        self.layers = []
        for number, (n, (k_out, k_in), share) in enumerate(zip(names, blocks, residual)):
            e = eigen[n]
            d_out, d_in = layer_dims(modules[n])
            p_out = p_in = None
            if share > 0:
                r_in, r_out = layer_shape(share, d_in, d_out)
                p_in, p_out = (scaled_orthonormal(d, r, generator_for(seed, RESIDUAL_TAG, number, side)) for side, (d, r) in enumerate([(d_in, r_in), (d_out, r_out)]))
            qa, qg = (canonical(q.detach().double().flip(1).cpu()) for q in (e.qa, e.qg))
            self.layers.append(StoredLayer(n, modules[n], offsets[f"{n}.weight"], offsets.get(f"{n}.bias"), qa, qg, k_out, k_in, p_out, p_in))
        self.dim = sum(layer.dim for layer in self.layers)

    @property
    def layout(self) -> list[list[Any]]:
        """``[name, k_out, k_in, r_out, r_in]`` per layer (kept in the manifest)."""
        return [[s.name, s.k_out, s.k_in, 0 if s.p_out is None else s.p_out.shape[1], 0 if s.p_in is None else s.p_in.shape[1]] for s in self.layers]

    def rows(self, grads: Tensor, preconditioner: KFACPreconditioner | None = None) -> Tensor:
        """Rows (``B x dim``, the gradients' dtype) of dense gradients ``B x P``: the training rows as stored, or
        with ``preconditioner`` the query rows ``W = R / (Lambda + lambda)`` reduced alike."""
        if grads.dim() != 2 or grads.shape[1] != self.num_params:
            raise WherefromError(f"expected B x {self.num_params} gradients of model {self.model_id!r}, got {tuple(grads.shape)}")
        out, grads = [], grads.cpu()
        for s in (s for s in self.layers if s.dim):
            r = s.rotated(s.layer_grad(grads))
            if preconditioner is not None:
                r = r * preconditioner.inverse[s.name].cpu().flip(0).flip(1)[: r.shape[1], : r.shape[2]].to(r)
            out.append(s.reduce(r))
        return torch.cat(out, 1)

    def training_rows(self, task: DiffusionTask, batch: dict[str, Tensor]) -> Tensor:
        """Stored rows of a batch of training images (``B x dim``, the network's dtype): each
        layer's per-example gradient from hooks, then rotated and reduced as :meth:`rows` does.
        Forming ``G`` before rotating contracts the draws and positions once, at
        ``d_out d_in`` per position, instead of projecting every position's input."""
        first = next(iter(trainable_parameters(self.net).values()))
        x0 = batch["image"].to(first.device, first.dtype)
        cond = condition(batch)
        cond = None if cond is None else cond.to(first.device)
        layers = [s for s in self.layers if s.dim]
        grads = structured_grads(self.net, layers, task, x0, batch["index"], "loss", self.config.features().draws(task), Stream.FEATURES, cond)
        return torch.cat([s.reduce(s.rotated(g)) for s, g in zip(layers, grads)], 1)


def load_eigen(store: Store | None, model_id: str, comm: Comm | None = None) -> tuple[dict[str, LayerEigen], str]:
    """The eigendecompositions of ``model_id`` from ``store`` (read on global rank 0, broadcast)
    and the hash of their file, which identifies the factors stored rows were made with."""

    def read() -> tuple[dict[str, Tensor], str]:
        name = Entry.kfac(model_id)["eigen"]
        if not store.has(name):
            raise WherefromError(f"store {str(store.root)!r} has no K-FAC factors for {model_id!r}; fit them first (the factors command or KFACFactors)")
        return store.load_tensors(name), store.manifest["entries"][name]["sha256"]

    tensors, digest = on_rank_zero(comm or LocalComm(), read)
    return eigen_from_tensors(tensors), digest


def featurize_influence(
    net: nn.Module,
    model_id: str,
    task: DiffusionTask,
    datamodule: Any,
    split: np.ndarray,
    store: Store | None,
    config: InfluenceConfig,
    batch_size: int = 64,
    comm: Comm | None = None,
    progress: bool = False,
) -> None:
    """Write (or resume) ``influence/<model_id>`` for the images of ``split`` from the store's factors
    of ``model_id`` (fit them first). Every rank calls this; only global rank 0 touches ``store``."""
    eigen, factors = load_eigen(store, model_id, comm)
    stored = StoredInfluence(net, eigen, config, model_id)
    first = next(iter(trainable_parameters(net).values()))
    meta = {**config.to_dict(), "model_id": model_id, "row_dim": stored.dim, "layout": stored.layout, "weights": weights_hash(net), "factors": factors}
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            write_rows(store, Entry.influence(model_id), meta, stored.dim, getattr(torch, config.dtype), first.device, datamodule, split,
                       lambda batch: stored.training_rows(task, batch), batch_size, comm, progress)  # fmt: skip
    finally:
        net.train(was_training)


def open_stored(store: Store, model_id: str, net: nn.Module) -> tuple[StoredInfluence, np.ndarray]:
    """The stored influence of ``model_id`` (layout and rows), checked against ``net``'s weights and the store's factors."""
    name = Entry.influence(model_id)
    if not store.has(name):
        raise WherefromError(f"store {str(store.root)!r} has no stored influence for {model_id!r}; fit the factors with features (KFACFactors(features=True) or the factors command)")
    meta = store.config(name)
    if meta["weights"] != weights_hash(net):
        raise FingerprintMismatchError(f"the stored influence of {model_id!r} in {str(store.root)!r} was made from other weights than this checkpoint's; fit factors and features again")
    eigen_name = Entry.kfac(model_id)["eigen"]
    if not store.has(eigen_name) or store.manifest["entries"][eigen_name]["sha256"] != meta["factors"]:
        raise FingerprintMismatchError(f"the stored influence of {model_id!r} in {str(store.root)!r} was made with other K-FAC factors than the store holds; featurise again")
    stored = StoredInfluence(net, eigen_from_tensors(store.load_tensors(eigen_name)), InfluenceConfig.from_dict(meta), model_id)
    if stored.layout != meta["layout"]:
        raise FingerprintMismatchError(f"the stored influence of {model_id!r} in {str(store.root)!r} has another layout than its factors give; featurise again")
    return stored, store.read_array(name, raw=True)


__all__ = ["DTYPES", "InfluenceConfig", "StoredInfluence", "StoredLayer", "allocate", "block_shape", "canonical", "featurize_influence", "load_eigen", "open_stored"]
