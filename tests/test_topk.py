"""Blockwise top-k equals the dense argsort of the full score matrix, for any block size and row subset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wherefrom.attribution.topk import blockwise_topk
from wherefrom.errors import WherefromError


@pytest.mark.parametrize("block", [1, 7, 64, 5000])
def test_blockwise_topk_equals_dense(tmp_path, block):
    rng = np.random.default_rng(0)
    features = np.lib.format.open_memmap(tmp_path / "phi.npy", mode="w+", dtype=np.float32, shape=(1000, 8))
    features[:] = rng.normal(size=(1000, 8))
    queries = torch.from_numpy(rng.normal(size=(3, 8)))
    rows = np.sort(rng.choice(1000, size=400, replace=False))
    dense = queries.numpy() @ features.astype(np.float64).T
    for subset in (None, rows):
        cols = np.arange(1000) if subset is None else rows
        want = cols[np.argsort(-dense[:, cols], axis=1, kind="stable")[:, :5]]
        got, scores = blockwise_topk(queries, features, k=5, block=block, rows=subset)
        assert np.array_equal(got, want)
        np.testing.assert_allclose(scores, np.take_along_axis(dense, want, 1), rtol=1e-12)
    with pytest.raises(WherefromError, match="same D"):
        blockwise_topk(queries[:, :4], features, k=5)
