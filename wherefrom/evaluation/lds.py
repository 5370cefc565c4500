"""Linear datamodelling score (LDS; Park et al. 2023, "TRAK", Sec. 2).

Draw M random subsets S_1..S_M of the training split, each a fraction alpha of
it; train one model per subset (optionally several seeds) and measure, for every
query q, the model output f(q; theta(S_j)). An attribution tau predicts that
output additively, g(q, S_j) = sum_{i in S_j} tau(q)_i, and

    LDS(tau, q) = spearman( {g(q, S_j)}_j , {f(q; theta(S_j))}_j ),

reported as the mean over queries with a bootstrap confidence interval over
queries. For diffusion models the output is the query's loss averaged over a
fixed set of seeded (t, eps) draws shared by every subset model (Zheng et al.
2024, D-TRAK; Mlodozeniec et al. 2024); since every wherefrom method scores
"larger = more helpful", f is the *negated* loss.

Files under the benchmark's ``out`` folder::

    subsets/subset_000.npy ...   sorted global indices of each subset
    subsets/subsets.json         num, alpha, seed and the split's fingerprint
    models/subset_000/seed_0/    fit.yaml, checkpoints/last.ckpt, done.json (one per model)
    measurements.npy             float64, M x S x Q (subsets x seeds x queries)
    measurements.json            the measurement config and the queries' hash
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from wherefrom.checkpoint import load_module
from wherefrom.errors import FingerprintMismatchError, WherefromError
from wherefrom.evaluation.benchmark import (
    Benchmark,
    MeasureConfig,
    checkpoint,
    eps_fn,
    is_trained,
    train,
)
from wherefrom.evaluation.stats import BootstrapConfig, Correlation, spearman_rows
from wherefrom.fitting import join, start_worker
from wherefrom.io import write_json, write_npy
from wherefrom.task import Stream, mix_seed

# --- the score -----------------------------------------------------------------------


def make_subsets(indices: np.ndarray, num: int, alpha: float, seed: int) -> np.ndarray:
    """``num`` subsets (rows, sorted) of ``round(alpha * len(indices))`` of ``indices``.

    Subset j depends only on ``(seed, j)``, so adding subsets keeps the old ones.
    """
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    k = round(alpha * len(indices))
    if not 1 <= k < len(indices):
        raise WherefromError(f"alpha={alpha} of {len(indices)} training images gives subsets of {k}; pick alpha so that 1 <= k < N")
    rows = [np.sort(np.random.default_rng(mix_seed(seed, j)).choice(indices, size=k, replace=False)) for j in range(num)]
    return np.stack(rows)


def subset_masks(subsets: np.ndarray, n: int) -> np.ndarray:
    """Boolean M x n membership matrix of index subsets."""
    masks = np.zeros((len(subsets), n), dtype=bool)
    for j, s in enumerate(subsets):
        masks[j, s] = True
    return masks


def lds_per_query(scores: np.ndarray, masks: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-query LDS for ``scores`` (Q x N), subset ``masks`` (M x N) and measured
    outputs ``targets`` (M x Q, larger = the query is better supported)."""
    scores, masks, targets = np.asarray(scores, np.float64), np.asarray(masks, bool), np.asarray(targets, np.float64)
    if scores.ndim != 2 or masks.ndim != 2 or scores.shape[1] != masks.shape[1]:
        raise WherefromError(f"scores ({scores.shape}) and subsets ({masks.shape}) must cover the same N training images")
    if targets.shape != (masks.shape[0], scores.shape[0]):
        raise WherefromError(f"measurements are {targets.shape}, expected (subsets, queries) = {(masks.shape[0], scores.shape[0])}")
    predicted = scores @ masks.T.astype(np.float64)  # g(q, S_j) = sum_{i in S_j} tau(q)_i, Q x M
    return spearman_rows(predicted, targets.T)


@dataclass(frozen=True)
class Calibration:
    """Whether a score's scale can be taken literally: measured vs predicted loss of the subset
    models, both centred per query, fitted by one least-squares slope (1: calibrated) with its R^2."""

    slope: float
    r2: float


def calibration(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray, scale: float) -> Calibration:
    """:class:`Calibration` of ``scores`` (Q x N) whose ``scale x score`` predicts the rise of a
    query's loss when the image is removed (influence: ``scale = 1 / N``). The model trained on
    subset ``S_j`` lacks the images outside it, so up to a per-query constant its predicted loss is
    ``-scale sum_{i in S_j} score_i``; ``losses``: the measured M x Q losses of the subset models."""
    predicted = -scale * (np.asarray(scores, np.float64) @ np.asarray(masks, bool).T.astype(np.float64))  # Q x M
    measured = np.asarray(losses, np.float64).T
    if measured.shape != predicted.shape:
        raise WherefromError(f"losses are {losses.shape}, expected (subsets, queries) = {predicted.shape[::-1]}")
    p, m = (x - x.mean(1, keepdims=True) for x in (predicted, measured))  # per-query intercepts
    slope = float((p * m).sum() / (p * p).sum())
    return Calibration(slope, float(1 - ((m - slope * p) ** 2).sum() / (m * m).sum()))


def lds(scores: np.ndarray, masks: np.ndarray, targets: np.ndarray, bootstrap: BootstrapConfig | None = None) -> Correlation:
    """LDS (mean over queries) with a bootstrap confidence interval over queries."""
    return Correlation.of(lds_per_query(scores, masks, targets), bootstrap)


class LinearDatamodelingScore(Metric):
    """LDS as a torchmetrics ``Metric``: ``update(scores, targets)`` per batch of
    queries (``scores`` B x N, ``targets`` M x B), ``compute()`` the mean."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, masks: Tensor | np.ndarray, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("masks", torch.as_tensor(np.asarray(masks, dtype=bool)))
        self.add_state("values", [], dist_reduce_fx="cat")

    def update(self, scores: Tensor, targets: Tensor) -> None:
        per_query = lds_per_query(scores.detach().cpu().double().numpy(), self.masks.cpu().numpy(), targets.detach().cpu().double().numpy())
        self.values.append(torch.as_tensor(per_query, device=self.device))

    def compute(self) -> Tensor:
        values = self.values if isinstance(self.values, Tensor) else torch.cat(self.values)
        return values.mean()


# --- the benchmark pipeline ----------------------------------------------------------


def subsets_dir(bench: Benchmark) -> Path:
    return bench.out / "subsets"


def model_dir(bench: Benchmark, j: int, seed: int) -> Path:
    return bench.out / "models" / f"subset_{j:03d}" / f"seed_{seed}"


def write_subsets(bench: Benchmark) -> np.ndarray:
    """Draw the subsets of the fit config's training split and write them
    (idempotent: the same config rewrites the same bytes; another one raises)."""
    dm = bench.datamodule()
    dm.setup()
    subsets = make_subsets(dm.indices, bench.subsets.num, bench.subsets.alpha, bench.subsets.seed)
    meta = {**asdict(bench.subsets), "n": int(dm.num_images), "fingerprint": dm.fingerprint, "size": int(subsets.shape[1])}
    folder = subsets_dir(bench)
    manifest = folder / "subsets.json"
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        if have != meta:
            raise FingerprintMismatchError(
                f"{folder} holds subsets for {have}, not {meta}; use another benchmark `out` folder for a changed config or data split"
            )
    for j, s in enumerate(subsets):
        write_npy(folder / f"subset_{j:03d}.npy", s)
    write_json(manifest, meta)
    return subsets


def read_subsets(bench: Benchmark) -> tuple[np.ndarray, int]:
    """The written subsets (M x k) and the size N of the index space."""
    manifest = subsets_dir(bench) / "subsets.json"
    if not manifest.is_file():
        raise WherefromError(f"no subsets in {subsets_dir(bench)}; write them first (the benchmark's subsets stage)")
    meta = json.loads(manifest.read_text())
    subsets = np.stack([np.load(subsets_dir(bench) / f"subset_{j:03d}.npy") for j in range(meta["num"])])
    return subsets, int(meta["n"])


def full_model_dir(bench: Benchmark) -> Path:
    """The attributed model: the fit recipe on the whole training split, first model seed."""
    return bench.out / "models" / "full" / f"seed_{bench.model_seeds[0]}"


def subset_seeds(bench: Benchmark, j: int) -> list[int]:
    """The training seeds of subset ``j``: every model seed, plus the noise-ceiling seed
    for the first ``noise_ceiling.num`` subsets."""
    return list(bench.model_seeds) + ([bench.noise_ceiling.seed] if j < bench.noise_ceiling.num else [])


def train_subsets(bench: Benchmark, subset_ids: list[int] | None = None, workers: int = 1) -> list[Path]:
    """Train the model(s) of each subset (all, or ``subset_ids`` for one job per
    subset); finished models are skipped, so an interrupted run resumes.

    ``workers > 1`` trains in that many spawned processes (one thread each), the subsets
    dealt round-robin (:func:`wherefrom.fitting.start_worker`).
    """
    subsets = write_subsets(bench)
    ids = list(range(len(subsets))) if subset_ids is None else list(subset_ids)
    bad = [j for j in ids if not 0 <= j < len(subsets)]
    if bad:
        raise WherefromError(f"subset id {bad[0]} is outside [0, {len(subsets)}); the benchmark has {len(subsets)} subsets")
    if workers > 1:
        todo = [j for j in ids if not all(is_trained(model_dir(bench, j, s)) for s in subset_seeds(bench, j))]
        procs = [start_worker(train_subsets, (bench, todo[w::workers])) for w in range(min(workers, len(todo)))]
        join(procs, "a training worker (see its output above; train again to resume)")
    ckpts = []
    for j in ids:
        for seed in subset_seeds(bench, j):
            root = model_dir(bench, j, seed)
            if workers <= 1:
                print(f"[lds] subset {j + 1}/{len(subsets)}, seed {seed}: {'done' if is_trained(root) else 'training'} ({root})", flush=True)
                train(bench, root, seed, subset=str((subsets_dir(bench) / f"subset_{j:03d}.npy").resolve()))
            ckpts.append(checkpoint(root))
    return ckpts


@torch.no_grad()
def measure_queries(module, queries: Tensor, cfg: MeasureConfig, ids: Tensor | None = None) -> np.ndarray:
    """Each query's ``cfg.measurement`` averaged over ``cfg.draws`` seeded (t, eps)
    draws of the MEASURE stream. The draws depend on ``cfg.seed`` and the query
    ids (default: positions) only, never on the model, so all models see the same noise."""
    task = module.task.reseeded(cfg.seed)
    denoise = eps_fn(module)
    ids = torch.arange(len(queries)) if ids is None else torch.as_tensor(ids)
    draws = [(d, None) for d in range(cfg.draws)]
    out = []
    with torch.no_grad():
        for start in range(0, len(queries), cfg.batch_size):
            x0 = queries[start : start + cfg.batch_size].to(module.device)
            index = ids[start : start + len(x0)]
            out.append(task.measure(denoise, x0, index, cfg.measurement, draws, stream=Stream.MEASURE).double().cpu())
    return torch.cat(out).numpy()


def queries_hash(queries: Tensor) -> str:
    return hashlib.sha256(queries.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def measure(bench: Benchmark, queries: Tensor) -> np.ndarray:
    """Ground-truth measurements of every trained subset model (M x S x Q), written to ``out``."""
    subsets, _ = read_subsets(bench)
    missing = [j for j in range(len(subsets)) for s in bench.model_seeds if not is_trained(model_dir(bench, j, s))]
    if missing:
        raise WherefromError(f"subset models {sorted(set(missing))[:10]} are not trained yet; train them first (the benchmark's train stage)")
    values = np.zeros((len(subsets), len(bench.model_seeds), len(queries)))
    for j in range(len(subsets)):
        for k, seed in enumerate(bench.model_seeds):
            values[j, k] = measure_queries(load_module(checkpoint(model_dir(bench, j, seed))), queries, bench.measure)
        print(f"[lds] measured subset {j + 1}/{len(subsets)}", flush=True)
    write_npy(bench.out / "measurements.npy", values)
    write_json(bench.out / "measurements.json", {**asdict(bench.measure), "queries": queries_hash(queries), "num_queries": len(queries)})
    return values


def score(bench: Benchmark, scores: np.ndarray) -> Correlation:
    """LDS of ``scores`` (Q x N) against the benchmark's measurements."""
    path = bench.out / "measurements.npy"
    if not path.is_file():
        raise WherefromError(f"no measurements at {path}; measure the queries first (the benchmark's measure stage)")
    subsets, n = read_subsets(bench)
    values = np.load(path)
    if scores.shape[0] != values.shape[2] or scores.shape[1] != n:
        raise WherefromError(
            f"scores are {scores.shape} but the benchmark measured {values.shape[2]} queries over {n} training images; "
            "attribute the same queries (same samples.npy) on a model of the same data"
        )
    # f(q; theta(S_j)) = -loss, averaged over the model seeds of subset j
    return lds(scores, subset_masks(subsets, n), -values.mean(axis=1), bench.bootstrap)
