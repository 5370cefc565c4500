"""The on-disk store shared by featurisation, K-FAC factors and scorers.

Layout of a store directory::

    manifest.json            fingerprints, and each entry's kind, shape and config
    <name>.npy               a row-per-global-index array (memmap-able)
    <name>.crc.npy           the CRC-32 of each row's bytes (uint32)
    <name>.done.npy          its done-mask (uint8, one byte per row)
    <name>.safetensors       a group of tensors (e.g. Kronecker factors); its
                             SHA-256 is in the manifest entry

Crash safety: rows are written data first, then their checksums, then their
done-mask bytes (each flushed and fsynced). A kill at any point leaves rows
either done with final bytes or not done; a rerun recomputes exactly the rows
that are not done. The manifest and safetensors files are replaced atomically
(temp file, fsync, ``os.replace``).

Integrity: nothing is trusted before it is checked. Every array file's header
and size must match the manifest, every done row its checksum, every tensor
file its hash; a damaged entry raises :class:`StoreDamagedError` (never zero-
filled or resized), and ``repair=True`` marks exactly the damaged
rows not done so the writing command recomputes them. :meth:`Store.open` is
read-only: it memory-maps arrays with ``mode="r"`` and writes nothing.

Only one process (DDP global rank 0) may write a store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from wherefrom.errors import FingerprintMismatchError, StoreDamagedError, WherefromError
from wherefrom.io import atomic_path, check_out_dir, fsync_path, write_json

FORMAT = 3  # 3: features keyed by output function (features/<output>/<model_id>), stored influence
SUFFIXES = {"array": (".npy", ".crc.npy", ".done.npy"), "tensors": (".safetensors",)}


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    """Normalise a config through JSON (tuples -> lists) so comparisons are exact."""
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def on_disk(dtype: str) -> str:
    """The ``.npy`` dtype of an array of ``dtype``: bfloat16 rows are kept as their 16-bit patterns
    (numpy has no bfloat16)."""
    return "uint16" if dtype == "bfloat16" else dtype


def as_tensor(rows: np.ndarray, dtype: str) -> Tensor:
    """Rows of a store array of ``dtype`` as a tensor of that dtype, sharing memory when contiguous
    (read-only: a store opened read-only maps its files read-only)."""
    rows = np.ascontiguousarray(rows)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16) if dtype == "bfloat16" else torch.from_numpy(rows)


def row_crcs(rows: np.ndarray) -> np.ndarray:
    """CRC-32 of each row's bytes (uint32)."""
    rows = np.ascontiguousarray(rows)
    flat = rows.reshape(len(rows), int(np.prod(rows.shape[1:])))
    return np.fromiter((zlib.crc32(r) for r in flat), dtype=np.uint32, count=len(rows))  # each row in place (buffer protocol)


def _npy_header(path: Path) -> tuple[tuple[int, ...], bool, str, int]:
    """``(shape, fortran_order, dtype, data offset)`` from a ``.npy`` file's header (raises ``ValueError``/``OSError``)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f) if version == (1, 0) else np.lib.format.read_array_header_2_0(f)
        return tuple(shape), fortran, str(dtype), f.tell()


def _npy_damage(path: Path, shape: tuple[int, ...], dtype: str) -> str | None:
    """Why the ``.npy`` file at ``path`` does not hold a C-order ``shape``/``dtype`` array, or ``None``."""
    if not path.is_file():
        return "is missing"
    try:
        have_shape, fortran, have_dtype, offset = _npy_header(path)
    except (ValueError, OSError, SyntaxError) as e:
        return f"has no valid .npy header ({e})"
    if have_shape != shape or have_dtype != dtype or fortran:
        return f"holds a {have_shape} {have_dtype} array, not the manifest's {shape} {dtype}"
    size, want = path.stat().st_size, offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    return None if size == want else f"has {size} bytes instead of {want} (truncated or appended to)"


def _salvage(path: Path, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The whole rows that survive in a damaged ``.npy`` with a matching header (flat; empty if none)."""
    try:
        have_shape, fortran, have_dtype, offset = _npy_header(path)
        if have_shape != shape or have_dtype != dtype or fortran:
            return np.zeros(0, dtype)
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.read()
    except (ValueError, OSError, SyntaxError):
        return np.zeros(0, dtype)
    row = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
    rows = min(len(raw) // row, shape[0])
    return np.frombuffer(raw[: rows * row], dtype=dtype)


class StoreArray:
    """A row-per-index array in a store with per-row checksums and a done-mask.

    Args:
        base: the path without suffix; ``shape``/``dtype``: the manifest's.
        read_only: memory-map read-only (``Store.open``).
        repair: rebuild damaged files and mark damaged rows not done instead of raising.
    """

    def __init__(
        self, base: Path, shape: tuple[int, ...], dtype: str, read_only: bool = False, repair: bool = False, repair_name: str = "Store(repair=True)"
    ) -> None:  # fmt: skip
        self.path, self.dtype = base, dtype
        files = {kind: Path(str(base) + suffix) for kind, suffix in zip(("data", "crc", "done"), SUFFIXES["array"])}
        specs = {"data": (shape, on_disk(dtype)), "crc": ((shape[0],), "uint32"), "done": ((shape[0],), "uint8")}
        damage = {kind: _npy_damage(files[kind], *specs[kind]) for kind in files}
        if any(damage.values()):
            kind, why = next((k, w) for k, w in damage.items() if w)
            if not repair:
                raise StoreDamagedError(
                    f"store array {base.name}: {files[kind].name} {why}; write it again with {repair_name} to recompute the damaged rows"
                )
            self._rebuild(files, specs, damage)
        mode = "r" if read_only else "r+"
        self.data, self.crc, self.done = (np.lib.format.open_memmap(str(files[k]), mode=mode) for k in ("data", "crc", "done"))
        bad = self._bad_rows()
        if bad.size:
            if not repair:
                raise StoreDamagedError(
                    f"store array {base.name}: {bad.size} done rows fail their checksum (e.g. rows {bad[:5].tolist()}); "
                    f"write it again with {repair_name} to recompute them"
                )
            self.done[bad] = 0
            self._sync(self.done)

    @staticmethod
    def _rebuild(files: dict[str, Path], specs: dict[str, tuple], damage: dict[str, str | None]) -> None:
        """Recreate damaged files at full size, keeping the bytes that survive; the checksums
        then mark every row whose bytes did not survive as not done."""
        for kind, why in damage.items():
            if not why:
                continue
            shape, dtype = specs[kind]
            kept = np.zeros(shape, dtype=dtype)
            salvaged = _salvage(files[kind], shape, dtype)
            kept.reshape(-1)[: salvaged.size] = salvaged
            if kind == "done":
                kept[:] = 1  # the checksums decide which rows are really done
            with atomic_path(files[kind]) as tmp:
                np.lib.format.open_memmap(str(tmp), mode="w+", dtype=dtype, shape=shape)[:] = kept

    def _bad_rows(self, block_bytes: int = 1 << 26) -> np.ndarray:
        """Done rows whose bytes do not match their checksum (read in blocks of at most ``block_bytes``;
        a block whose rows are all done is checked in place, without a copy)."""
        bad = []
        block = max(1, block_bytes // max(1, self.data[:1].nbytes))
        for s in range(0, len(self.done), block):
            done = np.flatnonzero(self.done[s : s + block]) + s
            if not done.size:
                continue
            rows = self.data[s : s + block] if done.size == len(self.done[s : s + block]) else self.data[done]
            bad.append(done[row_crcs(rows) != self.crc[done]])
        return np.concatenate(bad) if bad else np.zeros(0, np.int64)

    @staticmethod
    def _sync(array: np.memmap) -> None:
        array.flush()
        fsync_path(array.filename)

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def missing(self) -> np.ndarray:
        """Rows (global indices) not written yet."""
        return np.flatnonzero(self.done == 0)

    def write(self, rows: np.ndarray | Tensor, values: np.ndarray | Tensor) -> None:
        """Write ``values`` at ``rows``: data, then checksums, then the done-mask reach disk."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.dtype == "bfloat16":
            values = torch.as_tensor(values).detach().cpu().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        else:
            values = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
            values = np.ascontiguousarray(values.astype(self.data.dtype, copy=False))
        self.data[rows] = values
        self._sync(self.data)
        self.crc[rows] = row_crcs(values)
        self._sync(self.crc)
        self.done[rows] = 1
        self._sync(self.done)

    def read(self) -> np.ndarray:
        """The whole array (checked on open); raises if some rows are still missing."""
        if not self.complete:
            raise WherefromError(f"store array {self.path.name} has {len(self.missing())} rows not computed; rerun the command that writes it to resume")
        return self.data


class Entry:
    """The names of a store's entries, built here only: every method's entries of one model
    (``model_id``, e.g. ``model`` or an ensemble member's id) sit side by side in one store."""

    @staticmethod
    def features(output: str, model_id: str) -> str:
        """TRAK (``loss``) or D-TRAK (``square_norm``) features: ``features/<output>/<model_id>``."""
        return f"features/{output}/{model_id}"

    @staticmethod
    def weights(model_id: str) -> str:
        """The weights features of an intermediate checkpoint were made from: ``weights/<model_id>``."""
        return f"weights/{model_id}"

    @staticmethod
    def kfac(model_id: str) -> dict[str, str]:
        """K-FAC sums and counts, eigendecompositions and EK-FAC eigenvalues: ``factors|eigen|ekfac/<model_id>``."""
        return {k: f"{k}/{model_id}" for k in ("factors", "eigen", "ekfac")}

    @staticmethod
    def influence(model_id: str) -> str:
        """Stored influence rows (training gradients in the K-FAC eigenbasis): ``influence/<model_id>``."""
        return f"influence/{model_id}"


class Store:
    """Open or create a store bound to a dataset split (and encoded-ensemble codes).

    Args:
        root: the store directory.
        fingerprint: the datamodule's dataset fingerprint.
        codes_fingerprint: the ensemble's codes fingerprint (``None`` for single models).
        overwrite: replace a store made for another split/codes, and entries made
            with another config, instead of raising.
        repair: recompute damaged rows instead of refusing them.
        names: how the messages name the ``root``, ``overwrite`` and ``repair`` options to the user
            (the keyword arguments by default; the CLI passes its flags, a callback its own arguments).
    """

    def __init__(
        self, root: str | Path, fingerprint: str, codes_fingerprint: str | None = None, overwrite: bool = False, repair: bool = False,
        names: tuple[str, str, str] = ("Store(root=...)", "Store(overwrite=True)", "Store(repair=True)"),
    ) -> None:  # fmt: skip
        self.root = check_out_dir(root, names[0])
        self.overwrite, self.repair, self.read_only, self.names = overwrite, repair, False, names
        self.manifest = self._read_manifest()
        want = {"fingerprint": fingerprint, "codes_fingerprint": codes_fingerprint}
        if self.manifest is not None:
            have = {k: self.manifest.get(k) for k in want}
            if have != want:
                if not overwrite:
                    raise FingerprintMismatchError(
                        f"store {str(self.root)!r} was made for dataset/codes {have}, not {want}; "
                        f"point {names[0]} at a new folder or pass {names[1]} to replace it"
                    )
                self._clear()
                self.manifest = None
        if self.manifest is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self.manifest = {"format": FORMAT, **want, "entries": {}}
            self._save()

    @classmethod
    def open(cls, root: str | Path) -> Store:
        """Open an existing store read-only, whatever its fingerprint: nothing is written."""
        if not (Path(root) / "manifest.json").is_file():
            raise WherefromError(f"{str(root)!r} is not a wherefrom store (no manifest.json); featurise a model into it first")
        store = cls.__new__(cls)
        store.root, store.overwrite, store.repair, store.read_only = Path(root), False, False, True
        store.names = ("Store(root=...)", "Store(overwrite=True)", "Store(repair=True)")
        store.manifest = store._read_manifest()
        return store

    # --- manifest ------------------------------------------------------------------
    def _read_manifest(self) -> dict[str, Any] | None:
        path = self.root / "manifest.json"
        if not path.is_file():
            return None
        try:
            m = json.loads(path.read_text())
            if not isinstance(m, dict) or not isinstance(m.get("entries"), dict) or "fingerprint" not in m:
                raise ValueError("not a store manifest")
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreDamagedError(
                f"store manifest {str(path)!r} is damaged ({e}); it is only ever replaced atomically, so restore it from a backup or recompute into a new folder"
            ) from None
        if m.get("format") != FORMAT:
            raise WherefromError(f"store {str(self.root)!r} has format {m.get('format')}, this wherefrom reads {FORMAT}; recompute it into a new folder")
        return m

    def _save(self) -> None:
        if self.read_only:
            raise WherefromError(f"store {str(self.root)!r} was opened read-only")
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
                f"use another {self.names[0]} folder or pass {self.names[1]} to recompute it"
            )
        self.delete(name)
        return False

    def clash(self, name: str, config: dict[str, Any]) -> str | None:
        """How entry ``name``'s stored config differs from ``config`` on ``config``'s keys, e.g.
        ``"timesteps 10 (stored) vs 100"``; ``None`` when the entry is absent or agrees."""
        entry = self.manifest["entries"].get(name)
        if entry is None:
            return None
        want = _jsonable(config)
        diff = [f"{k} {entry['config'].get(k)!r} (stored) vs {v!r}" for k, v in sorted(want.items()) if entry["config"].get(k) != v]
        return ", ".join(diff) or None

    def delete(self, name: str) -> None:
        entry = self.manifest["entries"].pop(name)
        self._save()
        for suffix in SUFFIXES[entry["kind"]]:
            Path(str(self.root / name) + suffix).unlink(missing_ok=True)

    # --- arrays --------------------------------------------------------------------
    def array(self, name: str, shape: tuple[int, ...], config: dict[str, Any], dtype: str = "float32") -> StoreArray:
        """Create (or reopen, to resume) a row-per-index array."""
        shape = tuple(int(s) for s in shape)
        base = self.root / name
        if not self._check_entry(name, "array", config, shape=list(shape), dtype=dtype):
            base.parent.mkdir(parents=True, exist_ok=True)
            # files first, then the manifest entry: a crash in between just recreates them
            for suffix, (dt, sh) in zip(SUFFIXES["array"], [(on_disk(dtype), shape), (np.uint32, shape[:1]), (np.uint8, shape[:1])]):
                with atomic_path(str(base) + suffix) as tmp:
                    np.lib.format.open_memmap(str(tmp), mode="w+", dtype=dt, shape=sh).flush()
            self.manifest["entries"][name] = {"kind": "array", "shape": list(shape), "dtype": dtype, "config": _jsonable(config)}
            self._save()
        return StoreArray(base, shape, dtype, repair=self.repair, repair_name=self.names[2])

    def read_array(self, name: str, raw: bool = False) -> np.ndarray:
        """The checked, memory-mapped array ``name``. A bfloat16 array maps its 16-bit patterns and
        is read only with ``raw=True`` (decode blocks with :func:`as_tensor`)."""
        entry = self.manifest["entries"].get(name)
        if entry is None or entry["kind"] != "array":
            raise WherefromError(f"store {str(self.root)!r} has no array {name!r} (has {sorted(self.entries('array'))})")
        if entry["dtype"] == "bfloat16" and not raw:
            raise WherefromError(f"store array {name!r} holds bfloat16 rows, which this reader does not decode; write it in float32")
        if self.read_only:
            return StoreArray(self.root / name, tuple(entry["shape"]), entry["dtype"], read_only=True).read()
        return self.array(name, tuple(entry["shape"]), entry["config"], entry["dtype"]).read()

    # --- tensor groups ---------------------------------------------------------------
    def save_tensors(self, name: str, tensors: dict[str, Tensor], config: dict[str, Any]) -> None:
        """Atomically write a group of tensors (``.safetensors``) with its config."""
        self._check_entry(name, "tensors", config)
        path = Path(str(self.root / name) + ".safetensors")
        with atomic_path(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
            digest = _sha256(tmp)
        self.manifest["entries"][name] = {"kind": "tensors", "config": _jsonable(config), "sha256": digest}
        self._save()

    def annotate(self, name: str, key: str, value: Any) -> None:
        """Record ``value`` under ``key`` in entry ``name``'s manifest record (a measurement of the entry, e.g. its
        fidelity; never compared when the entry is reused). The manifest is replaced atomically."""
        if name not in self.manifest["entries"] or key in ("kind", "config", "sha256"):
            raise WherefromError(f"store {str(self.root)!r}: cannot annotate {name!r} with {key!r}")
        self.manifest["entries"][name][key] = _jsonable(value)
        self._save()

    def has(self, name: str, config: dict[str, Any] | None = None) -> bool:
        entry = self.manifest["entries"].get(name)
        return entry is not None and (config is None or entry["config"] == _jsonable(config))

    def load_tensors(self, name: str) -> dict[str, Tensor]:
        entry = self.manifest["entries"].get(name)
        if entry is None or entry["kind"] != "tensors":
            raise WherefromError(f"store {str(self.root)!r} has no tensors {name!r} (has {sorted(self.entries('tensors'))}); fit the factors into it first")
        path = Path(str(self.root / name) + ".safetensors")
        if not path.is_file() or _sha256(path) != entry["sha256"]:
            raise StoreDamagedError(
                f"store tensors {name!r} ({path.name}) are {'missing' if not path.is_file() else 'damaged (hash mismatch)'}; "
                f"recompute them, replacing the entry ({self.names[1]})"
            )
        return load_file(str(path))


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_store(store: Store, fingerprint: str, codes_fingerprint: str | None = None) -> None:
    """Raise if ``store`` belongs to another split or ensemble than the caller's."""
    if store.fingerprint != fingerprint or store.codes_fingerprint != codes_fingerprint:
        raise FingerprintMismatchError(
            f"store {str(store.root)!r} is for dataset {store.fingerprint} / codes {store.codes_fingerprint}, "
            f"but the checkpoint's data is {fingerprint} / codes {codes_fingerprint}; featurize this checkpoint into a new store"
        )


__all__ = [
    "Entry", "FORMAT", "Store", "StoreArray", "as_tensor", "check_store", "on_disk", "row_crcs"]
