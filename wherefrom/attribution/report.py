"""How every attribution is written and shown: :func:`write_attribution` writes the same files
for every method (``scores.npy``, ``topk.json``, ``topk.png``, any per-query image rows and the
browsable ``index.html``), so reports and evaluation read one format; :func:`view` is the same
report in a notebook, :func:`log_attribution` the top-k to Lightning's loggers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wherefrom.attribution.html import Report, inline_report, write_run_report
from wherefrom.attribution.protocol import Attribution, topk_table
from wherefrom.errors import WherefromError
from wherefrom.io import image_grid, save_grid, write_json, write_npy


def beside_queries(queries: Tensor, rows: Sequence[Tensor]) -> Tensor:
    """Each query followed by its row of images (``Q (R + 1) x C x H x W``, for a grid of ``R + 1`` columns)."""
    queries = queries.float().cpu()
    return torch.cat([torch.cat([queries[q : q + 1], rows[q].float().cpu()]) for q in range(len(queries))])


def log_scalars(loggers: Sequence[Any], metrics: dict[str, float], step: int = 0) -> None:
    """``metrics`` to every Lightning logger (TensorBoard, CSV, ...)."""
    for logger in loggers:
        logger.log_metrics(metrics, step=step)


def log_attribution(loggers: Sequence[Any], result: Attribution, data: Any, top_k: int = 10, step: int = 0) -> None:
    """Log ``result`` to Lightning loggers: scalars (queries, mean top-1 and top-k score) to every logger,
    and the top-k grid (each query, then its top-k) to those that take images (TensorBoard's
    ``experiment.add_image``, or a ``log_image`` method such as Weights & Biases').

    ``data``: the training data as the attributors take it (a datamodule, Dataset or DataLoader),
    or its images over the whole index space (``N x C x H x W``)."""
    from wherefrom.target import as_data

    train_images = data if isinstance(data, Tensor) else as_data(data, "log_attribution").images
    idx, top = result.topk(top_k)
    prefix = f"wherefrom/{result.method}"
    log_scalars(loggers, {f"{prefix}/queries": float(len(top)), f"{prefix}/top1_score": float(top[:, 0].mean()),
                          f"{prefix}/topk_score": float(top.mean())}, step)  # fmt: skip
    grid = image_grid(beside_queries(result.queries, [train_images[i] for i in idx]), nrow=top.shape[1] + 1)
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(f"{prefix}/topk", grid, global_step=step)
        elif callable(getattr(logger, "log_image", None)):
            logger.log_image(key=f"{prefix}/topk", images=[grid.permute(1, 2, 0).numpy()], step=step)


def write_attribution(
    out: str | Path, result: Attribution, train_images: Tensor, top_k: int = 10, decode: Callable[[Tensor], Tensor] | None = None,
    group_ids: np.ndarray | None = None,
) -> Path:  # fmt: skip
    """Write ``scores.npy`` (float32, Q x N; averaged over models: ``scores_by_model.npy`` beside it), ``topk.json``, ``topk.png`` (each query beside
    its top-k training images, one row per query), every artifact of ``result`` and the browsable
    report ``index.html`` (:mod:`wherefrom.attribution.html`); images show ``decode(x)`` (a latent
    model's decoder) when given, the arrays stay what the model saw. ``group_ids``: one group per
    training index (a class, an artist, a source), whose summed scores are listed too."""
    show = decode or (lambda x: x)
    if result.scores.shape[1] != len(train_images):
        raise WherefromError(f"scores cover {result.scores.shape[1]} training images but the training set has {len(train_images)}")
    table = topk_table(result, top_k, group_ids)
    out = Path(out)
    write_npy(out / "scores.npy", result.scores)
    if result.by_model is not None:  # scores averaged over models: each model's own beside them
        write_npy(out / "scores_by_model.npy", result.by_model)
    write_json(out / "topk.json", table)
    idx = [row["indices"] for row in table["queries"]]
    queries = show(result.queries)
    save_grid(beside_queries(queries, [show(train_images[i]) for i in idx]), out / "topk.png", nrow=table["top_k"] + 1)
    for name, images in result.artifacts.items():
        write_npy(out / f"{name}.npy", images.float().cpu().numpy())
        save_grid(beside_queries(queries, [show(row) for row in images]), out / f"{name}.png", nrow=images.shape[1] + 1)
    write_run_report(out, table, result.queries, train_images, result.artifacts, show)
    return out


def view(result: Attribution, data: Any, top_k: int = 10) -> Report:
    """The browsable report of ``result`` (as ``wherefrom attribute`` writes it, with the data's
    group totals when it has groups) with its images embedded: a notebook cell shows it inline;
    ``.save("report.html")`` writes it. ``data``: the training data as the attributors take it
    (a datamodule, Dataset or DataLoader)."""
    from wherefrom.target import as_data

    data = as_data(data, "view")
    if result.scores.shape[1] != data.num_images:
        raise WherefromError(f"view: the scores cover {result.scores.shape[1]} training images but the data has {data.num_images}; pass the data the attribution used")
    table = topk_table(result, top_k, getattr(data, "group_ids", None))
    return Report(inline_report(table, result.queries.float().cpu(), data.images, result.artifacts, getattr(data, "decode", None) or (lambda x: x)))
