"""Writing attribution results: ``scores.npy``, ``topk.json`` and ``topk.png``.

Every method (ablation, TRAK, D-TRAK, K-FAC, EK-FAC) returns an
:class:`Attribution`; :func:`write_attribution` writes the same three files
for all of them, so reports and evaluation read one format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wherefrom.errors import WherefromError
from wherefrom.io import save_grid, write_json, write_npy


@dataclass
class Attribution:
    """Scores of Q queries against all N training indices (larger = more influential).

    ``extra`` holds method-specific per-query results that go into ``topk.json``
    (e.g. exact-ablation distances for the top-k), one dict per query.
    """

    scores: np.ndarray
    queries: Tensor
    method: str
    extra: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float32)
        if self.scores.ndim != 2 or self.scores.shape[0] != len(self.queries):
            raise ValueError(f"scores must be Q x N with Q = {len(self.queries)} queries, got {self.scores.shape}")

    def topk(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices (Q x k) and scores of the k most influential training images per query."""
        k = min(k, self.scores.shape[1])
        idx = np.argsort(-self.scores, axis=1, kind="stable")[:, :k]
        return idx, np.take_along_axis(self.scores, idx, axis=1)


def write_attribution(out: str | Path, result: Attribution, train_images: Tensor, top_k: int = 10) -> Path:
    """Write ``scores.npy`` (float32, Q x N), ``topk.json`` and ``topk.png`` (each
    query beside its top-k training images, one row per query)."""
    if top_k < 1:
        raise WherefromError(f"--top-k must be >= 1, got {top_k}")
    if result.scores.shape[1] != len(train_images):
        raise WherefromError(f"scores cover {result.scores.shape[1]} training images but the training set has {len(train_images)}")
    out = Path(out)
    idx, top = result.topk(top_k)
    write_npy(out / "scores.npy", result.scores)
    rows = []
    for q in range(len(idx)):
        row = {"query": q, "indices": idx[q].tolist(), "scores": top[q].tolist()}
        if result.extra:
            row.update(result.extra[q])
        rows.append(row)
    write_json(out / "topk.json", {"method": result.method, "top_k": int(idx.shape[1]), "queries": rows})
    grid = torch.cat([torch.cat([result.queries[q : q + 1].float().cpu(), train_images[idx[q]].float()]) for q in range(len(idx))])
    save_grid(grid, out / "topk.png", nrow=idx.shape[1] + 1)
    return out
