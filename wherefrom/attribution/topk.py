"""Top-k training images per query at database scale, without a dense ``Q x N`` score matrix.

Every linear scorer here ends in inner products ``s(q, i) = <u_q, phi_i>`` with a
(preconditioned) query vector ``u_q``: TRAK's ``u_q = phi_q (Phi^T Phi + lambda I)^{-1}``,
K-FAC's projected mode ``u_q = P (F + lambda I)^{-1} grad m(q) / c``. The training
features ``phi_i`` (a memory-mapped store array) are read ``block`` rows at a time and
each block's scores are merged into a running top-k, so memory is
``O(Q (k + block) + block D)`` whatever N is.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from wherefrom.errors import WherefromError


def blockwise_topk(queries: Tensor, features: np.ndarray, k: int, block: int = 65536, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (``Q x k``, best first) and scores of the k largest ``queries @ features[i]``.

    ``features``: ``N x D`` (e.g. a memory-mapped store array); ``rows``: restrict to these row
    indices (e.g. the training split; default all). Scores are computed in the queries' dtype.
    """
    if queries.dim() != 2 or features.ndim != 2 or queries.shape[1] != features.shape[1]:
        raise WherefromError(f"queries ({tuple(queries.shape)}) and features ({features.shape}) must be Q x D and N x D with the same D")
    if k < 1 or block < 1:
        raise WherefromError(f"k and block must be >= 1, got {k} and {block}")
    rows = np.arange(len(features)) if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
    q = queries.shape[0]
    best_scores = queries.new_empty((q, 0))
    best_rows = torch.empty((q, 0), dtype=torch.long)
    for s in range(0, len(rows), block):
        idx = rows[s : s + block]
        chunk = features[idx] if len(idx) != idx[-1] - idx[0] + 1 else features[idx[0] : idx[-1] + 1]
        scores = queries @ torch.from_numpy(np.ascontiguousarray(chunk)).to(queries).T  # Q x block
        cand_scores = torch.cat([best_scores, scores], 1)
        cand_rows = torch.cat([best_rows, torch.from_numpy(idx).expand(q, -1)], 1)
        top = torch.topk(cand_scores, min(k, cand_scores.shape[1]), dim=1)
        best_scores, best_rows = top.values, cand_rows.gather(1, top.indices)
    return best_rows.numpy(), best_scores.cpu().numpy()


__all__ = ["blockwise_topk"]
