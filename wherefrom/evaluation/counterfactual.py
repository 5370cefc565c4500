"""Retraining without the top influences (Zheng et al. 2024, D-TRAK, Sec. 5.3;
Mlodozeniec et al. 2024): for each query, remove its k highest-scoring training
images, retrain with the same recipe and seed, regenerate the query from the
same exogenous noise, and measure how much it changed — pixel L2, LPIPS, and the
change of the query's loss (same seeded draws for both models). Removing k
random images is the control: a good attribution changes the sample more.

Files under ``<out>/counterfactual/``::

    models/remove_<hash>/       one retrained model per removal set (reused)
    <method>/results.json       per query: removed indices, distances, loss change
    <method>/counterfactual.png per query: original | top-k removed | random removed
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wherefrom.checkpoint import load_datamodule, load_module
from wherefrom.errors import FingerprintMismatchError, WherefromError
from wherefrom.evaluation.benchmark import Benchmark, eps_fn, train
from wherefrom.evaluation.distances import distance_fn
from wherefrom.evaluation.lds import measure_queries
from wherefrom.io import save_grid, write_json
from wherefrom.sampling import sample
from wherefrom.task import mix_seed

KINDS = ("top", "random")


def removal_sets(scores: np.ndarray, train_indices: np.ndarray, k: int, seed: int, query: int) -> dict[str, np.ndarray]:
    """The query's k top-scoring training indices, and k random ones seeded by ``(seed, query)``."""
    order = np.argsort(-scores[train_indices], kind="stable")
    rng = np.random.default_rng(mix_seed(seed, query))
    return {
        "top": np.sort(train_indices[order[:k]]),
        "random": np.sort(rng.choice(train_indices, size=k, replace=False)),
    }


@torch.no_grad()
def regenerate(module, query: int, bench: Benchmark) -> Tensor:
    """Query ``query`` sampled with the benchmark's seed, steps and scheduler (same noise for every model)."""
    s = bench.sampling
    clip = module.hparams.get("clip_sample", True)  # False for a latent model
    return sample(eps_fn(module), module.task, module.image_shape, [query], s.seed, s.steps, s.scheduler, clip, device=module.device).cpu()


def retrain_without(bench: Benchmark, split: np.ndarray, removed: np.ndarray, seed: int) -> Path:
    """Retrain on ``split`` minus ``removed`` (a folder per removal set, reused across methods)."""
    key = hashlib.sha256(np.ascontiguousarray(removed, dtype="<i8").tobytes()).hexdigest()[:12]
    return train(bench, bench.out / "counterfactual" / "models" / f"remove_{key}", seed, subset=np.setdiff1d(split, removed), exclude=None)


def run(bench: Benchmark, ckpt: str | Path, scores: np.ndarray, queries: list[int] | None = None, method: str = "method") -> dict[str, Any]:
    """Counterfactual retraining for ``queries`` (default: every row of ``scores``)."""
    cf = bench.counterfactual
    original = load_module(ckpt)
    dm = load_datamodule(ckpt)
    dm.setup()
    if bench.datamodule().fingerprint != dm.fingerprint:
        raise FingerprintMismatchError(
            f"the benchmark's fit data (split {bench.datamodule().fingerprint}) is not the data {str(ckpt)!r} was trained on "
            f"({dm.fingerprint}); point the config's `fit` at the recipe of that checkpoint"
        )
    if scores.shape[1] != dm.num_images:
        raise WherefromError(f"scores cover {scores.shape[1]} training images but {str(ckpt)!r} has {dm.num_images}")
    queries = list(range(len(scores))) if queries is None else queries
    bad = [q for q in queries if not 0 <= q < len(scores)]
    if bad:
        raise WherefromError(f"query ids {bad} are outside the {len(scores)} rows of the scores")
    k = cf.count(len(dm.indices))
    seed = original.task.seed
    distances = {name: distance_fn(name) for name in cf.distances}
    rows, grid = [], []
    for n, q in enumerate(queries):
        x = regenerate(original, q, bench)
        loss = measure_queries(original, x, bench.measure, ids=[q])[0]
        row: dict[str, Any] = {"query": q, "k": k}
        images = [x]
        for kind, removed in removal_sets(scores[q], dm.indices, k, cf.seed, q).items():
            print(f"[counterfactual] query {q} ({n + 1}/{len(queries)}): retraining without {k} {kind} images", flush=True)
            model = load_module(retrain_without(bench, dm.indices, removed, seed))
            x_cf = regenerate(model, q, bench)
            row[f"removed_{kind}"] = removed.tolist()
            for name, fn in distances.items():
                row[f"{name}_{kind}"] = float(fn(x, x_cf)[0])
            row[f"dloss_{kind}"] = float(measure_queries(model, x, bench.measure, ids=[q])[0] - loss)
            images.append(x_cf)
        rows.append(row)
        grid.append(torch.cat(images))
    metrics = [key for key in rows[0] if key.rsplit("_", 1)[-1] in KINDS and not key.startswith("removed")]
    result = {"method": method, "k": k, "mean": {m: float(np.mean([r[m] for r in rows])) for m in metrics}, "queries": rows}
    folder = bench.out / "counterfactual" / method
    write_json(folder / "results.json", result)
    save_grid(torch.cat(grid), folder / "counterfactual.png", nrow=1 + len(KINDS))
    return result


def summary(result: dict[str, Any]) -> str:
    """One line per measure: mean change when removing the top-k vs k random images."""
    mean = result["mean"]
    lines = [f"{result['method']}: removing k={result['k']} images per query (mean over {len(result['queries'])} queries)"]
    for name in dict.fromkeys(m.rsplit("_", 1)[0] for m in mean):
        lines.append(f"  {name:<6} top-k {mean[f'{name}_top']:.4f}   random {mean[f'{name}_random']:.4f}")
    return "\n".join(lines)

