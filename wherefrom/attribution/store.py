"""The on-disk store shared by featurisation, K-FAC factors and scorers.

Layout of a store directory::

    manifest.json            fingerprints, and each entry's kind, shape and config
    <name>.npy               a row-per-global-index array (memmap-able)
    <name>.done.npy          its done-mask (uint8, one byte per row)
    <name>.safetensors       a group of tensors (e.g. Kronecker factors)

Crash safety: rows are written data first (flushed and fsynced), then their
done-mask bytes. A kill at any point leaves rows either done with final bytes or
not done; a rerun recomputes exactly the rows that are not done. The manifest
and safetensors files are replaced atomically (temp file, fsync, ``os.replace``).

Only one process (DDP global rank 0) may write a store.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file, save_file
from torch import Tensor

from wherefrom.errors import FingerprintMismatchError, WherefromError
from wherefrom.io import atomic_path, write_json

FORMAT = 1


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    """Normalise a config through JSON (tuples -> lists) so comparisons are exact."""
    return json.loads(json.dumps(config, sort_keys=True, default=str))


class StoreArray:
    """A row-per-index array in a store with a done-mask."""

    def __init__(self, base: Path, shape: tuple[int, ...], dtype: str) -> None:
        self.path = base
        self.data = np.lib.format.open_memmap(str(base) + ".npy", mode="r+")
        self.done = np.lib.format.open_memmap(str(base) + ".done.npy", mode="r+")
        if self.data.shape != shape or str(self.data.dtype) != dtype:
            raise WherefromError(f"store array {base.name} is {self.data.shape}/{self.data.dtype}, expected {shape}/{dtype}; rerun with overwrite")

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def missing(self) -> np.ndarray:
        """Rows (global indices) not written yet."""
        return np.flatnonzero(self.done == 0)

    def write(self, rows: np.ndarray | Tensor, values: np.ndarray | Tensor) -> None:
        """Write ``values`` at ``rows``; data reaches disk before the done-mask does."""
        rows = np.asarray(rows, dtype=np.int64)
        values = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
        self.data[rows] = values.astype(self.data.dtype, copy=False)
        self.data.flush()
        _fsync(self.data.filename)
        self.done[rows] = 1
        self.done.flush()
        _fsync(self.done.filename)

    def read(self) -> np.ndarray:
        """The whole array; raises if some rows are still missing."""
        if not self.complete:
            raise WherefromError(f"store array {self.path.name} has {len(self.missing())} rows not computed; rerun the command that writes it to resume")
        return np.asarray(self.data)


def _fsync(filename: str | os.PathLike) -> None:
    fd = os.open(filename, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """Open or create a store bound to a dataset split (and encoded-ensemble codes).

    Args:
        root: the store directory.
        fingerprint: the datamodule's dataset fingerprint.
        codes_fingerprint: the ensemble's codes fingerprint (``None`` for single models).
        overwrite: replace a store made for another split/codes, and entries made
            with another config, instead of raising.
    """

    def __init__(self, root: str | Path, fingerprint: str, codes_fingerprint: str | None = None, overwrite: bool = False) -> None:
        self.root = Path(root)
        self.overwrite = overwrite
        self.manifest = self._read_manifest()
        want = {"fingerprint": fingerprint, "codes_fingerprint": codes_fingerprint}
        if self.manifest is not None:
            have = {k: self.manifest.get(k) for k in want}
            if have != want:
                if not overwrite:
                    raise FingerprintMismatchError(
                        f"store {str(self.root)!r} was made for dataset/codes {have}, not {want}; "
                        "point --store at a new folder or pass --overwrite to replace it"
                    )
                self._clear()
                self.manifest = None
        if self.manifest is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self.manifest = {"format": FORMAT, **want, "entries": {}}
            self._save()

    @classmethod
    def open(cls, root: str | Path) -> Store:
        """Open an existing store read-only-ish, whatever its fingerprint."""
        path = Path(root) / "manifest.json"
        if not path.is_file():
            raise WherefromError(f"{str(root)!r} is not a wherefrom store (no manifest.json); create it with `wherefrom featurize`")
        m = json.loads(path.read_text())
        return cls(root, m["fingerprint"], m.get("codes_fingerprint"))

    # --- manifest ------------------------------------------------------------------
    def _read_manifest(self) -> dict[str, Any] | None:
        path = self.root / "manifest.json"
        if not path.is_file():
            return None
        m = json.loads(path.read_text())
        if m.get("format") != FORMAT:
            raise WherefromError(f"store {str(self.root)!r} has format {m.get('format')}, this wherefrom reads {FORMAT}")
        return m

    def _save(self) -> None:
        write_json(self.root / "manifest.json", self.manifest)

    def _clear(self) -> None:
        for child in self.root.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def codes_fingerprint(self) -> str | None:
        return self.manifest["codes_fingerprint"]

    def entries(self, kind: str | None = None) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.manifest["entries"].items() if kind is None or v["kind"] == kind}

    def config(self, name: str) -> dict[str, Any]:
        if name not in self.manifest["entries"]:
            raise WherefromError(f"store {str(self.root)!r} has no entry {name!r} (has {sorted(self.manifest['entries'])})")
        return self.manifest["entries"][name]["config"]

    def _check_entry(self, name: str, kind: str, config: dict[str, Any], **meta: Any) -> bool:
        """True if ``name`` exists with the same config; raise or drop it on mismatch."""
        entry = self.manifest["entries"].get(name)
        if entry is None:
            return False
        have = {"kind": entry["kind"], "config": entry["config"], **{k: entry.get(k) for k in meta}}
        want = {"kind": kind, "config": _jsonable(config), **_jsonable(meta)}
        if have == want:
            return True
        if not self.overwrite:
            diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
            if "config" in diff:
                old, new = diff.pop("config")
                diff.update({f"config.{k}": (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)})
            detail = ", ".join(f"{k} {a!r} (stored) vs {b!r}" for k, (a, b) in diff.items())
            raise FingerprintMismatchError(
                f"store entry {name!r} in {str(self.root)!r} was made with a different config: {detail}; "
                "use another --store folder or pass --overwrite to recompute it"
            )
        self.delete(name)
        return False

    def delete(self, name: str) -> None:
        entry = self.manifest["entries"].pop(name)
        self._save()
        base = self.root / name
        suffixes = (".npy", ".done.npy") if entry["kind"] == "array" else (".safetensors",)
        for s in suffixes:
            Path(str(base) + s).unlink(missing_ok=True)

    # --- arrays --------------------------------------------------------------------
    def array(self, name: str, shape: tuple[int, ...], config: dict[str, Any], dtype: str = "float32") -> StoreArray:
        """Create (or reopen, to resume) a row-per-index array."""
        shape = tuple(int(s) for s in shape)
        base = self.root / name
        if not self._check_entry(name, "array", config, shape=list(shape), dtype=dtype):
            base.parent.mkdir(parents=True, exist_ok=True)
            # files first, then the manifest entry: a crash in between just recreates them
            np.lib.format.open_memmap(str(base) + ".npy", mode="w+", dtype=dtype, shape=shape).flush()
            np.lib.format.open_memmap(str(base) + ".done.npy", mode="w+", dtype=np.uint8, shape=(shape[0],)).flush()
            self.manifest["entries"][name] = {"kind": "array", "shape": list(shape), "dtype": dtype, "config": _jsonable(config)}
            self._save()
        return StoreArray(base, shape, dtype)

    def read_array(self, name: str) -> np.ndarray:
        entry = self.manifest["entries"].get(name)
        if entry is None or entry["kind"] != "array":
            raise WherefromError(f"store {str(self.root)!r} has no array {name!r} (has {sorted(self.entries('array'))})")
        return self.array(name, tuple(entry["shape"]), entry["config"], entry["dtype"]).read()

    # --- tensor groups ---------------------------------------------------------------
    def save_tensors(self, name: str, tensors: dict[str, Tensor], config: dict[str, Any]) -> None:
        """Atomically write a group of tensors (``.safetensors``) with its config."""
        self._check_entry(name, "tensors", config)
        path = Path(str(self.root / name) + ".safetensors")
        with atomic_path(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        self.manifest["entries"][name] = {"kind": "tensors", "config": _jsonable(config)}
        self._save()

    def has(self, name: str, config: dict[str, Any] | None = None) -> bool:
        entry = self.manifest["entries"].get(name)
        return entry is not None and (config is None or entry["config"] == _jsonable(config))

    def load_tensors(self, name: str) -> dict[str, Tensor]:
        entry = self.manifest["entries"].get(name)
        if entry is None or entry["kind"] != "tensors":
            raise WherefromError(f"store {str(self.root)!r} has no tensors {name!r} (has {sorted(self.entries('tensors'))}); run `wherefrom factors` first")
        return load_file(str(self.root / name) + ".safetensors")


def check_store(store: Store, fingerprint: str, codes_fingerprint: str | None = None) -> None:
    """Raise if ``store`` belongs to another split or ensemble than the caller's."""
    if store.fingerprint != fingerprint or store.codes_fingerprint != codes_fingerprint:
        raise FingerprintMismatchError(
            f"store {str(store.root)!r} is for dataset {store.fingerprint} / codes {store.codes_fingerprint}, "
            f"but the checkpoint's data is {fingerprint} / codes {codes_fingerprint}; featurize this checkpoint into a new store"
        )


__all__ = ["Store", "StoreArray", "check_store"]
