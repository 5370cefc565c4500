"""The shared store: done-masks, resume, atomic manifest, and clear errors on mismatch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wherefrom.errors import FingerprintMismatchError, StoreDamagedError, WherefromError
from wherefrom.store import FORMAT, Store, check_store


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
    assert manifest["format"] == FORMAT
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_mismatches_raise_unless_overwrite(tmp_path):
    store = Store(tmp_path, "fp")
    store.array("a", (4, 2), {"proj_dim": 2}).write([0], np.ones((1, 2)))
    with pytest.raises(FingerprintMismatchError, match=r"config.proj_dim 2 \(stored\) vs 3"):
        Store(tmp_path, "fp").array("a", (4, 2), {"proj_dim": 3})
    with pytest.raises(FingerprintMismatchError, match=r"pass Store\(overwrite=True\)"):
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


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _filled(tmp_path, rows: int = 6) -> Store:
    store = Store(tmp_path, "fp")
    store.array("features/model", (rows, 4), {"k": 1}).write(np.arange(rows), np.arange(rows * 4.0).reshape(rows, 4))
    return store


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-20]), "truncated"),  # disk full / interrupted copy
        (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 16), "appended"),
        (lambda p: p.write_bytes(b"not an npy file"), "no valid .npy header"),
        (lambda p: np.save(p, np.zeros((6, 5), np.float32)), "not the manifest's"),
        (lambda p: p.unlink(), "is missing"),
    ],
)
def test_damaged_array_is_refused_read_only_and_repaired_exactly(tmp_path, damage, match):
    _filled(tmp_path)
    damage(tmp_path / "features" / "model.npy")
    before = _files(tmp_path)
    for reader in (lambda: Store.open(tmp_path).read_array("features/model"), lambda: Store(tmp_path, "fp").array("features/model", (6, 4), {"k": 1})):
        with pytest.raises(StoreDamagedError, match=match):
            reader()
        assert _files(tmp_path) == before  # refused without touching a byte
    # --repair keeps the rows that survived and marks exactly the others not done
    repaired = Store(tmp_path, "fp", repair=True).array("features/model", (6, 4), {"k": 1})
    missing = repaired.missing()
    # 20 bytes cut from 16-byte rows: row 5 and part of row 4 are gone
    assert set(missing) <= set(range(6)) and (match != "truncated" or missing.tolist() == [4, 5])
    kept = np.setdiff1d(np.arange(6), missing)
    assert np.array_equal(repaired.data[kept], np.arange(24.0).reshape(6, 4)[kept])
    repaired.write(missing, np.arange(24.0).reshape(6, 4)[missing])
    assert np.array_equal(Store.open(tmp_path).read_array("features/model"), np.arange(24.0).reshape(6, 4))


def test_flipped_bytes_in_a_done_row_fail_its_checksum(tmp_path):
    _filled(tmp_path)
    path = tmp_path / "features" / "model.npy"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # inside the last row
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreDamagedError, match=r"1 done rows fail their checksum \(e.g. rows \[5\]\)"):
        Store.open(tmp_path).read_array("features/model")
    assert Store(tmp_path, "fp", repair=True).array("features/model", (6, 4), {"k": 1}).missing().tolist() == [5]


def test_damaged_manifest_and_tensors_are_refused(tmp_path):
    store = _filled(tmp_path)
    store.save_tensors("factors/model", {"a": torch.ones(3)}, {"c": 1})
    tensors = tmp_path / "factors" / "model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-4])
    with pytest.raises(StoreDamagedError, match="hash mismatch"):
        Store.open(tmp_path).load_tensors("factors/model")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    before = _files(tmp_path)
    for opener in (lambda: Store.open(tmp_path), lambda: Store(tmp_path, "fp"), lambda: Store(tmp_path, "fp", overwrite=True)):
        with pytest.raises(StoreDamagedError, match="manifest .* is damaged"):
            opener()
    assert _files(tmp_path) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(WherefromError, match="is a file, not a folder"):
        Store(tmp_path / "file", "fp")


def test_open_is_read_only(tmp_path):
    _filled(tmp_path)
    before = _files(tmp_path)
    out = Store.open(tmp_path).read_array("features/model")
    assert not out.flags.writeable and _files(tmp_path) == before
