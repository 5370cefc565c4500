"""The shared store: done-masks, resume, atomic manifest, and clear errors on mismatch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wherefrom.attribution.store import Store, check_store
from wherefrom.errors import FingerprintMismatchError, WherefromError


def test_array_rows_done_mask_and_reopen(tmp_path):
    store = Store(tmp_path, "fp")
    arr = store.array("features/model", (5, 3), {"k": 1})
    assert arr.missing().tolist() == [0, 1, 2, 3, 4] and not arr.complete
    arr.write([3, 1], torch.tensor([[1.0, 2, 3], [4, 5, 6]]))
    assert arr.missing().tolist() == [0, 2, 4]
    with pytest.raises(WherefromError, match="3 rows not computed"):
        arr.read()
    # reopening with the same config resumes: written rows survive
    again = Store(tmp_path, "fp").array("features/model", (5, 3), {"k": 1})
    assert again.missing().tolist() == [0, 2, 4]
    again.write([0, 2, 4], np.ones((3, 3)))
    out = Store.open(tmp_path).read_array("features/model")
    assert out.dtype == np.float32 and out[3].tolist() == [1, 2, 3] and out[1].tolist() == [4, 5, 6] and out[0].tolist() == [1, 1, 1]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["entries"]["features/model"] == {"kind": "array", "shape": [5, 3], "dtype": "float32", "config": {"k": 1}}
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_mismatches_raise_unless_overwrite(tmp_path):
    store = Store(tmp_path, "fp")
    store.array("a", (4, 2), {"proj_dim": 2}).write([0], np.ones((1, 2)))
    with pytest.raises(FingerprintMismatchError, match=r"config.proj_dim 2 \(stored\) vs 3"):
        Store(tmp_path, "fp").array("a", (4, 2), {"proj_dim": 3})
    with pytest.raises(FingerprintMismatchError, match="pass --overwrite"):
        Store(tmp_path, "other")
    with pytest.raises(FingerprintMismatchError):
        Store(tmp_path, "fp", codes_fingerprint="codes")
    with pytest.raises(FingerprintMismatchError, match=r"shape \[4, 2\] \(stored\) vs \[4, 3\]"):
        Store(tmp_path, "fp").array("a", (4, 3), {"proj_dim": 2})
    # overwrite drops the entry and starts it afresh
    fresh = Store(tmp_path, "fp", overwrite=True).array("a", (4, 2), {"proj_dim": 3})
    assert fresh.missing().tolist() == [0, 1, 2, 3]
    # a store for another split is replaced entirely
    Store(tmp_path, "other", overwrite=True)
    assert Store.open(tmp_path).entries() == {} and not (tmp_path / "a.npy").exists()
    with pytest.raises(FingerprintMismatchError, match="featurize this checkpoint"):
        check_store(Store.open(tmp_path), "fp")


def test_tensors_round_trip_and_missing(tmp_path):
    store = Store(tmp_path, "fp")
    store.save_tensors("weights/model@epoch1", {"w": torch.arange(6.0).reshape(2, 3)}, {"weights": "abc"})
    assert store.has("weights/model@epoch1", {"weights": "abc"}) and not store.has("weights/model@epoch1", {"weights": "x"})
    assert torch.equal(Store.open(tmp_path).load_tensors("weights/model@epoch1")["w"], torch.arange(6.0).reshape(2, 3))
    with pytest.raises(FingerprintMismatchError):
        store.save_tensors("weights/model@epoch1", {"w": torch.zeros(1)}, {"weights": "other"})
    with pytest.raises(WherefromError, match="no tensors"):
        store.load_tensors("nope")
    with pytest.raises(WherefromError, match="not a wherefrom store"):
        Store.open(tmp_path / "missing")
