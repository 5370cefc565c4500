"""Constant-weight codes of an encoded ensemble (Dai, Yew & Gifford, "Where did you learn that?").

Each training image ``x`` gets a bit vector of length ``n`` with exactly ``w``
ones; member ``i`` trains on the images whose bit ``i`` is set, so
``S(x) = {i : bits[x, i] = 1}`` is the set of members that saw ``x``.

*Encoded property* (the paper's condition for exact ablation): for all
``x != x'``, ``S(x) \\ S(x')`` is non-empty, i.e. no code is a subset of another.
Then dropping the members in ``S(x)`` removes ``x`` completely while every
other image keeps at least one member. Distinct codes of equal weight satisfy
it automatically (``S(x) subset of S(x')`` with ``|S(x)| = |S(x')|`` forces
``S(x) = S(x')``), so :func:`check_codes` only verifies constant weight and
distinctness, in ``O(N log N)`` by sorting the rows packed into integers.

*Balance*: every member trains on ``floor(N w / n)`` or ``ceil(N w / n)``
images, i.e. the max-min load gap is at most 1 (the best possible). Proof of
the repair step in :func:`_balance`: if member ``a`` has at least 2 more images
than member ``b``, the codes with ``a`` but not ``b`` outnumber those with
``b`` but not ``a``, so swapping ``a -> b`` in one of them yields a code that
is not yet used; each swap lowers the sum of squared loads.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wherefrom.errors import FingerprintMismatchError, WherefromError
from wherefrom.task import mix_seed

MAX_MEMBERS = 62  # codes are packed into int64 bit masks (sign bit unused)
_ENUMERATE_BELOW = 100_000  # enumerate all C(n, w) codes when there are this few


def smallest_n(num_images: int, w: int | None = None, spare: int = 0) -> int:
    """The smallest ``n`` with ``C(n, w) >= num_images + spare`` (``w = n // 2`` when not given):
    ``spare`` codes left unused, e.g. as controls (:meth:`Codes.controls`)."""
    n = 2 if w is None else w + 1
    while math.comb(n, n // 2 if w is None else w) < num_images + spare:
        n += 1
    return n


def code_weight(n: int, w: int | None = None) -> int:
    """Validate ``(n, w)``; returns ``w`` (default ``n // 2``)."""
    if not 2 <= n <= MAX_MEMBERS:
        raise WherefromError(f"the number of members n must be in [2, {MAX_MEMBERS}], got {n}")
    w = n // 2 if w is None else w
    if not 1 <= w < n:
        raise WherefromError(f"the code weight w must be in [1, n - 1] = [1, {n - 1}], got {w}")
    return w


def validate_codes(num_images: int, n: int, w: int | None) -> int:
    """The code weight for ``num_images`` images with ``n`` members; raise when C(n, w) codes are too few."""
    w = code_weight(n, w)
    if num_images < 1:
        raise WherefromError("codes need at least one training image")
    if num_images > math.comb(n, w):
        raise WherefromError(
            f"{num_images} training images need {num_images} distinct codes but n={n}, w={w} give only "
            f"C({n}, {w}) = {math.comb(n, w)}; use n >= {smallest_n(num_images, w)} with w={w} "
            f"(or n >= {smallest_n(num_images)} with the default w = n // 2; n >= {smallest_n(num_images, w, num_images)} "
            f"leaves as many unused codes as images, as controls), or train on a smaller subset"
        )
    return w


def _all_masks(n: int, w: int) -> np.ndarray:
    """Every weight-``w`` mask of length ``n``, in increasing order."""
    out = np.empty(math.comb(n, w), dtype=np.int64)
    v, k, top = (1 << w) - 1, 0, 1 << n
    while v < top:
        out[k], k = v, k + 1
        c = v & -v  # Gosper's hack: the next integer with the same popcount
        r = v + c
        v = (((r ^ v) >> 2) // c) | r
    return out


def _random_masks(n: int, w: int, count: int, rng: np.random.Generator, exclude: np.ndarray | None = None) -> np.ndarray:
    """``count`` distinct random weight-``w`` masks not in ``exclude`` (rejection sampling; at least
    ``2 count`` such masks exist)."""
    chosen = np.empty(0, dtype=np.int64)
    exclude = chosen if exclude is None else exclude
    weights = np.int64(1) << np.arange(n, dtype=np.int64)
    while chosen.size < count:
        need = count - chosen.size
        cols = np.argsort(rng.random((min(2 * need + 16, 1 << 16), n)), axis=1)[:, :w]
        masks = weights[cols].sum(1)
        _, first = np.unique(masks, return_index=True)  # drop repeats within the draw, keep draw order
        masks = masks[np.sort(first)]
        masks = masks[~np.isin(masks, chosen) & ~np.isin(masks, exclude)][:need]
        chosen = np.concatenate([chosen, masks])
    return chosen


def bits_from_masks(masks: np.ndarray, n: int) -> np.ndarray:
    """``N x n`` bool code rows from integer bit masks (bit ``i`` = member ``i``)."""
    return ((np.asarray(masks, dtype=np.int64)[:, None] >> np.arange(n, dtype=np.int64)) & 1).astype(bool)


def masks_from_bits(bits: np.ndarray) -> np.ndarray:
    """Integer bit masks (bit ``i`` = member ``i``) of ``N x n`` bool code rows; inverse of :func:`bits_from_masks`."""
    return (np.asarray(bits, dtype=np.int64) << np.arange(np.shape(bits)[1], dtype=np.int64)).sum(1)


def _loads(masks: np.ndarray, n: int) -> np.ndarray:
    return bits_from_masks(masks, n).sum(0)


def _balance(masks: np.ndarray, n: int) -> np.ndarray:
    """Swap bits until every member's load is within 1 of every other's (see the module docstring)."""
    masks = masks.copy()
    loads = _loads(masks, n)
    while loads.max() - loads.min() > 1:
        a, b = int(loads.argmax()), int(loads.argmin())
        k = int(loads[a] - loads[b]) // 2
        bit_a, bit_b = np.int64(1) << a, np.int64(1) << b
        cand = np.flatnonzero(((masks & bit_a) != 0) & ((masks & bit_b) == 0))
        swapped = masks[cand] ^ (bit_a | bit_b)
        free = cand[~np.isin(swapped, masks)][:k]  # at least load[a] - load[b] >= k are free
        masks[free] ^= bit_a | bit_b
        loads[a] -= len(free)
        loads[b] += len(free)
    return masks


def check_codes(bits: np.ndarray, w: int, groups: np.ndarray | None = None) -> None:
    """Raise unless every row has exactly ``w`` ones and all rows are distinct (which implies the
    encoded property, see the module docstring); with ``groups``, rows of one group must be equal
    and the groups' codes distinct (the encoded property between groups). ``O(N log N)``."""
    bits = np.asarray(bits, dtype=bool)
    weight = bits.sum(1)
    bad = np.flatnonzero(weight != w)
    if bad.size:
        raise WherefromError(f"code row {bad[0]} has weight {weight[bad[0]]}, expected {w}; the codes are corrupt")
    if groups is not None:
        _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
        mixed = np.flatnonzero((bits != bits[first][inverse]).any(1))
        if mixed.size:
            raise WherefromError(f"code row {mixed[0]} differs from the code of its group {groups[mixed[0]]}; the codes are corrupt")
        bits = bits[np.sort(first)]
    packed = np.packbits(bits, axis=1)  # N x ceil(n / 8) bytes, one void scalar per row
    rows = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).ravel()
    order = np.argsort(rows, kind="stable")
    dup = np.flatnonzero(rows[order][1:] == rows[order][:-1])
    if dup.size:
        i, j = sorted((int(order[dup[0]]), int(order[dup[0] + 1])))
        raise WherefromError(f"code rows {i} and {j} are equal, so ablating one cannot separate it from the other")


@dataclass(frozen=True, eq=False)
class Codes:
    """The codes of the training images ``indices`` (sorted global indices): ``bits[r]`` is the code of ``indices[r]``.

    Group-level codes (``groups``, a group id per row: class, artist, source): one code per group,
    shared by its images, so members train on whole groups and ablating any image of a group
    removes the whole group (the encoded property holds between groups).

    Build with :meth:`generate`; ``fingerprint`` hashes the codes together with the dataset fingerprint.
    """

    bits: np.ndarray  # N x n bool
    indices: np.ndarray  # N int64, sorted
    w: int
    data_fingerprint: str
    groups: np.ndarray | None = None  # N int64 group ids, or None: one code per image

    def __post_init__(self) -> None:
        if self.bits.ndim != 2 or self.bits.shape[0] != len(self.indices):
            raise WherefromError(f"codes of shape {self.bits.shape} do not match {len(self.indices)} indices")
        if np.any(np.diff(self.indices) <= 0):
            raise WherefromError("code indices must be sorted and unique")
        if self.groups is not None and len(self.groups) != len(self.indices):
            raise WherefromError(f"{len(self.groups)} group ids for {len(self.indices)} code rows")
        check_codes(self.bits, self.w, self.groups)

    @classmethod
    def generate(
        cls, indices: np.ndarray, n: int, w: int | None = None, seed: int = 0, data_fingerprint: str = "", groups: np.ndarray | None = None
    ) -> Codes:
        """Distinct, balanced, seeded weight-``w`` codes (default ``w = n // 2``) for the training ``indices``;
        with ``groups`` (a group id per index, in the order of ``indices``), one code per group."""
        indices = np.asarray(indices, dtype=np.int64)
        order = np.argsort(indices, kind="stable")
        indices = indices[order]
        if groups is not None:
            groups = np.asarray(groups, dtype=np.int64)
            if groups.shape != indices.shape:
                raise WherefromError(f"groups need one id per training index, got {groups.shape} for {indices.shape}")
            groups = groups[order]
        units, unit_of = (np.arange(len(indices)), np.arange(len(indices))) if groups is None else np.unique(groups, return_inverse=True)
        w = validate_codes(len(units), n, w)
        rng = np.random.default_rng(mix_seed(seed, n, w, len(units)))
        total = math.comb(n, w)
        if total <= max(_ENUMERATE_BELOW, 2 * len(units)):
            masks = rng.choice(_all_masks(n, w), size=len(units), replace=False)
        else:
            masks = _random_masks(n, w, len(units), rng)
        masks = _balance(masks, n)[unit_of]
        return cls(bits_from_masks(masks, n), indices, w, data_fingerprint, groups)

    # --- shape ---------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.bits.shape[1]

    @property
    def num_images(self) -> int:
        return self.bits.shape[0]

    @property
    def loads(self) -> np.ndarray:
        """Number of training images of each member."""
        return self.bits.sum(0)

    @property
    def fingerprint(self) -> str:
        """Hash of (n, w, indices, codes, dataset fingerprint); members of one ensemble share it."""
        h = hashlib.sha256(f"{self.n},{self.w},{self.data_fingerprint}".encode())
        h.update(np.ascontiguousarray(self.indices, dtype="<i8").tobytes())
        h.update(np.packbits(self.bits, axis=1).tobytes())
        if self.groups is not None:
            h.update(np.ascontiguousarray(self.groups, dtype="<i8").tobytes())
        return h.hexdigest()[:16]

    # --- lookups ---------------------------------------------------------------
    def rows(self, index: np.ndarray | Tensor | list[int] | int) -> np.ndarray:
        """Row of each global index in :attr:`bits`; raises for images outside the training split."""
        index = np.atleast_1d(np.asarray(index.cpu() if isinstance(index, Tensor) else index, dtype=np.int64))
        rows = np.searchsorted(self.indices, index).clip(max=self.num_images - 1)
        missing = index[self.indices[rows] != index]
        if missing.size:
            raise WherefromError(
                f"indices {missing[:5].tolist()} are not in the ensemble's training split "
                f"({self.num_images} images, global indices {self.indices[0]}..{self.indices[-1]})"
            )
        return rows

    def membership(self, index: Tensor) -> Tensor:
        """Boolean ``B x n`` matrix: ``[b, i]`` is True when member ``i`` trains on ``index[b]``."""
        return torch.from_numpy(self.bits[self.rows(index)]).to(index.device)

    def members_of(self, index: int) -> list[int]:
        """``S(x)``: the members that saw global index ``x``."""
        return np.flatnonzero(self.bits[self.rows(index)[0]]).tolist()

    def split(self, member: int) -> np.ndarray:
        """Global indices member ``member`` trains on."""
        if not 0 <= member < self.n:
            raise WherefromError(f"member must be in [0, {self.n}), got {member}")
        return self.indices[self.bits[:, member]]

    def kept_members(self, ablate: list[int] | np.ndarray) -> np.ndarray:
        """Members that saw none of ``ablate`` (exact ablation keeps exactly these)."""
        seen = self.bits[self.rows(ablate)].any(0)
        if seen.all():
            raise WherefromError(
                f"ablating {len(np.atleast_1d(ablate))} indices removes all {self.n} members; ablate fewer indices"
            )
        return np.flatnonzero(~seen)

    def controls(self, limit: int = 4096, seed: int = 0) -> np.ndarray:
        """Up to ``limit`` of the weight-``w`` codes no image (or group) carries, ``M x n`` bool, sorted:
        dropping a control's members removes no image entirely, so its effect on a query is the part of
        an ablation due to losing members (:mod:`wherefrom.ensemble.controls`). All unused codes when
        there are at most ``limit``, else a seeded sample of them."""
        used = np.unique(masks_from_bits(self.bits))
        total = math.comb(self.n, self.w)
        count = min(limit, total - len(used))
        rng = np.random.default_rng(mix_seed(seed, self.n, self.w, len(used)))
        if total <= _ENUMERATE_BELOW:
            free = np.setdiff1d(_all_masks(self.n, self.w), used)
            masks = free if count == len(free) else rng.choice(free, size=count, replace=False)
        else:
            masks = _random_masks(self.n, self.w, min(count, (total - len(used)) // 2), rng, exclude=used)
        return bits_from_masks(np.sort(masks), self.n)

    # --- persistence -------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Tensors and plain values for a checkpoint (loads with ``weights_only=True``)."""
        return {
            "bits": torch.from_numpy(self.bits.copy()),
            "indices": torch.from_numpy(self.indices.copy()),
            "w": self.w,
            "data_fingerprint": self.data_fingerprint,
            "fingerprint": self.fingerprint,
            **({} if self.groups is None else {"groups": torch.from_numpy(self.groups.copy())}),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Codes:
        groups = state["groups"].numpy().astype(np.int64) if "groups" in state else None
        codes = cls(state["bits"].numpy().astype(bool), state["indices"].numpy().astype(np.int64), int(state["w"]), state["data_fingerprint"], groups)
        if codes.fingerprint != state["fingerprint"]:
            raise FingerprintMismatchError("the stored codes do not match their fingerprint; the checkpoint is corrupt")
        return codes
