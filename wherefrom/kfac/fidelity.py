"""Fidelity of stored influence on the user's own model (issue 34): stored against exact influence.

Stored rows keep ``dim`` eigenbasis coordinates per image, so stored influence approximates exact
mode (Mlodozeniec et al. 2024's K-FAC influence, every coordinate). How much is lost depends on the
model: the LDS benchmark measured it on the digits UNets only. After writing rows, the same
preconditioner scores a seeded sample both ways: ``queries`` training images as queries against
``train`` training images (one gradient pass over the sample, dense per-sample gradients in blocks
of the memory budget). Per query, Pearson and Spearman r between the stored and the exact scores
of the sample, averaged over the queries, are the fidelity.

Below :data:`THRESHOLD` (Pearson r) the same gradients give rows at larger budgets (``dim`` x 4, x 16, ... up to
every coordinate) and the smallest budget meeting the threshold is named.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn
from torch.utils.data import DataLoader

from wherefrom.ddp import Comm, LocalComm, on_rank_zero
from wherefrom.features import per_sample_grads
from wherefrom.kfac.preconditioner import KFACPreconditioner, load_preconditioner, precondition
from wherefrom.kfac.stored import StoredInfluence, open_stored
from wherefrom.memory import gradient_rows
from wherefrom.store import Entry, Store
from wherefrom.task import DiffusionTask, Stream, condition

# Pearson r of stored against exact influence below which the stored budget is too small. On the LDS
# benchmark's v-prediction and rectified-flow digits models (benchmarks/results/fidelity_digits500.md)
# no budget at or above it lost more than 0.02 LDS against exact mode, and every budget that lost more
# lies below it; Spearman r saturates too early to tell them apart (0.991 at a budget that lost 0.05).
THRESHOLD = 0.99
QUERIES, TRAIN = 8, 256


@dataclass(frozen=True)
class Fidelity:
    """Stored against exact influence on a seeded sample (means over the queries of per-query r)."""

    pearson: float
    spearman: float
    dim: int  # the stored rows' actual dimension (``row_dim``)
    queries: int
    train: int
    seed: int
    suggested_dim: int | None = None  # the smallest budget meeting THRESHOLD, when this one does not

    @property
    def ok(self) -> bool:
        return self.pearson >= THRESHOLD

    def line(self, spell: str = "dim") -> str:
        """One line for the user (``spell``: how the front end names the budget)."""
        text = (
            f"stored influence fidelity: Pearson r {self.pearson:.3f}, Spearman r {self.spearman:.3f} against exact mode "
            f"({self.queries} training images as queries x {self.train} training images, {self.dim} coordinates per image)"
        )
        if self.ok:
            return text
        more = f"{spell} {self.suggested_dim} meets it" if self.suggested_dim else f"no {spell} up to every coordinate meets it (the draws, not the budget, limit it)"
        return f"{text}; Pearson r below {THRESHOLD} lost more than 0.02 LDS on the benchmark: {more}"

    def to_dict(self) -> dict:
        return asdict(self)


def _images(datamodule, indices: np.ndarray, batch_size: int):
    return DataLoader(datamodule.dataset(indices), batch_size=batch_size, shuffle=False)


def _correlations(stored: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    pearson = [stats.pearsonr(s, e)[0] for s, e in zip(stored, exact)]
    spearman = [stats.spearmanr(s, e)[0] for s, e in zip(stored, exact)]
    return float(np.mean(pearson)), float(np.mean(spearman))


def fidelities(
    net: nn.Module,
    task: DiffusionTask,
    datamodule,
    split: np.ndarray,
    stored: Sequence[StoredInfluence],
    preconditioner: KFACPreconditioner,
    batch_size: int = 64,
    queries: int = QUERIES,
    train: int = TRAIN,
    seed: int = 0,
) -> tuple[list[tuple[float, float]], int, int]:
    """``(pearson, spearman)`` of each of ``stored`` (one model's rows at several budgets) against exact
    influence on ``queries`` x ``train`` training images of ``split`` drawn with ``seed``, and the numbers of
    queries and images drawn. The sample's rows are formed from its dense gradients as the store's are (equal
    up to rounding), in the stored dtype; query and training gradients use the first rows' draws."""
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(np.asarray(split), min(train, len(split)), replace=False))
    asked = np.sort(rng.choice(sample, min(queries, len(sample)), replace=False))
    first = next(net.parameters())
    draws = stored[0].config.features().draws(task)

    def grads(batch: dict[str, Tensor]) -> Tensor:
        c = condition(batch)
        x0 = batch["image"].to(first.device, first.dtype)
        return per_sample_grads(net, task, x0, batch["index"], "loss", draws, Stream.FEATURES, None if c is None else c.to(first.device))

    g_q = torch.cat([grads(b) for b in _images(datamodule, asked, batch_size)])
    pre = precondition(net, g_q, preconditioner)
    query_rows = [c.rows(g_q, preconditioner).double() for c in stored]
    exact = np.zeros((len(asked), len(sample)))
    approx = np.zeros((len(stored), len(asked), len(sample)))
    done = 0
    for batch in _images(datamodule, sample, min(batch_size, gradient_rows(stored[0].num_params, first.dtype, first.device))):
        g = grads(batch)
        cols = slice(done, done + len(g))
        exact[:, cols] = (pre @ g.T).double().cpu().numpy()
        for j, (c, w) in enumerate(zip(stored, query_rows)):
            approx[j, :, cols] = (w @ c.rows(g).to(getattr(torch, c.config.dtype)).double().T).numpy()  # rows rounded as stored
        done += len(g)
    return [_correlations(a, exact) for a in approx], len(asked), len(sample)


def fidelity(
    net: nn.Module,
    task: DiffusionTask,
    datamodule,
    split: np.ndarray,
    stored: StoredInfluence,
    preconditioner: KFACPreconditioner,
    batch_size: int = 64,
    queries: int = QUERIES,
    train: int = TRAIN,
    seed: int = 0,
) -> Fidelity:
    """The :func:`fidelities` of ``stored``; below :data:`THRESHOLD`, the smallest of the budgets ``dim`` x 4,
    x 16, ... (up to every coordinate, measured on the same gradients) that meets it."""
    budgets = [stored.config.dim]
    while budgets[-1] < stored.num_params:
        budgets.append(min(budgets[-1] * 4, stored.num_params))
    candidates = [stored] + [StoredInfluence(net, stored.eigen, replace(stored.config, dim=d), stored.model_id) for d in budgets[1:]]
    measured, asked, sample = fidelities(net, task, datamodule, split, candidates, preconditioner, batch_size, queries, train, seed)
    pearson, spearman = measured[0]
    suggested = None
    if pearson < THRESHOLD:
        suggested = next((b for b, (r, _) in zip(budgets[1:], measured[1:]) if r >= THRESHOLD), None)
    return Fidelity(pearson, spearman, stored.dim, asked, sample, seed, suggested)


def record_fidelity(
    net: nn.Module, model_id: str, task: DiffusionTask, datamodule, split: np.ndarray, store: Store | None, batch_size: int = 64, comm: Comm | None = None
) -> Fidelity:
    """:func:`fidelity` of ``model_id``'s stored influence in ``store`` (rows written, the EK-FAC preconditioner
    where the store has its eigenvalues), recorded in the entry's manifest record as ``fidelity``; an entry
    that has one keeps it. Every rank calls this and gets the result; only global rank 0 works."""

    def measure() -> Fidelity:
        name = Entry.influence(model_id)
        stored, _ = open_stored(store, model_id, net)
        known = store.manifest["entries"][name].get("fidelity")
        if known is not None:
            return Fidelity(**known)
        preconditioner = load_preconditioner(store, model_id, net, ekfac=store.has(Entry.kfac(model_id)["ekfac"]))
        was_training = net.training
        net.eval()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                found = fidelity(net, task, datamodule, split, stored, preconditioner, batch_size)
        finally:
            net.train(was_training)
        store.annotate(name, "fidelity", found.to_dict())
        return found

    return on_rank_zero(comm or LocalComm(), measure)


__all__ = ["QUERIES", "THRESHOLD", "TRAIN", "Fidelity", "fidelities", "fidelity", "record_fidelity"]
