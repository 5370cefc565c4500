"""Codes of an encoded ensemble: distinct, weight exactly w, balanced to within 1, encoded property, exact-ablation coverage."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from wherefrom.ensemble.codes import Codes, check_codes, masks_from_bits, smallest_n
from wherefrom.errors import FingerprintMismatchError, WherefromError


def encoded_property_brute(bits: np.ndarray) -> bool:
    """For all x != x': S(x) \\ S(x') is non-empty (the paper's condition), by brute force."""
    differs = (bits[:, None, :] & ~bits[None, :, :]).any(-1)
    np.fill_diagonal(differs, True)
    return bool(differs.all())


CASES = [(6, 4, 2), (20, 6, 3), (70, 8, 4), (50, 8, 4), (100, 10, 3), (300, 12, None), (9, 9, 1), (36, 9, 7)]


@pytest.mark.parametrize("num, n, w", CASES)
def test_codes_distinct_weight_balanced_encoded(num, n, w):
    codes = Codes.generate(np.arange(num), n, w, seed=3)
    w = n // 2 if w is None else w
    bits = codes.bits
    assert bits.shape == (num, n) and bits.dtype == bool and codes.w == w
    assert (bits.sum(1) == w).all()
    assert len({row.tobytes() for row in bits}) == num  # distinct
    # balanced as documented: every load is floor or ceil of N w / n
    ideal = num * w / n
    assert set(codes.loads.tolist()) <= {math.floor(ideal), math.ceil(ideal)}
    assert encoded_property_brute(bits)


@pytest.mark.parametrize("num, n, w", CASES[:4])
def test_removing_members_of_x_keeps_every_other_index(num, n, w):
    indices = np.arange(0, 3 * num, 3)  # global indices with gaps: the codes are keyed by index, not position
    codes = Codes.generate(indices, n, w, seed=0)
    for x in indices:
        kept = codes.kept_members([x])
        assert set(kept.tolist()).isdisjoint(codes.members_of(int(x)))
        covered = np.unique(np.concatenate([codes.split(int(i)) for i in kept]))
        assert covered.tolist() == [i for i in indices.tolist() if i != x]


def test_codes_are_seeded_and_fingerprinted():
    a = Codes.generate(np.arange(30), 8, 4, seed=1, data_fingerprint="d")
    assert np.array_equal(a.bits, Codes.generate(np.arange(30), 8, 4, seed=1, data_fingerprint="d").bits)
    assert not np.array_equal(a.bits, Codes.generate(np.arange(30), 8, 4, seed=2).bits)
    fps = {
        a.fingerprint,
        Codes.generate(np.arange(30), 8, 4, seed=2, data_fingerprint="d").fingerprint,
        Codes.generate(np.arange(30), 8, 4, seed=1, data_fingerprint="other split").fingerprint,
        Codes.generate(np.arange(1, 31), 8, 4, seed=1, data_fingerprint="d").fingerprint,
    }
    assert len(fps) == 4
    back = Codes.from_state(a.state())
    assert np.array_equal(back.bits, a.bits) and back.fingerprint == a.fingerprint
    state = a.state()
    state["bits"] = state["bits"].clone()
    state["bits"][[0, 1]] = state["bits"][[1, 0]]  # still valid codes, but not the ones fingerprinted
    with pytest.raises(FingerprintMismatchError, match="corrupt"):
        Codes.from_state(state)


def test_all_codes_used_when_n_choose_w_equals_n():
    codes = Codes.generate(np.arange(math.comb(8, 4)), 8, 4, seed=0)
    assert (codes.loads == 35).all()


def test_too_many_images_names_the_smallest_n():
    with pytest.raises(WherefromError, match=r"C\(8, 4\) = 70; use n >= 9 with w=4 \(or n >= 9 with the default"):
        Codes.generate(np.arange(71), 8, 4)
    with pytest.raises(WherefromError, match=r"n >= 16 with w=4 \(or n >= 14"):
        Codes.generate(np.arange(1797), 8, 4)
    for num in (2, 7, 70, 71, 1797, 50_000):
        for w in (None, 2, 4):
            n, lo = smallest_n(num, w), 2 if w is None else w + 1
            weight = (lambda m: m // 2) if w is None else (lambda m: w)
            assert math.comb(n, weight(n)) >= num
            assert all(math.comb(m, weight(m)) < num for m in range(lo, n))
            spared = smallest_n(num, w, spare=num)  # the n that leaves as many unused codes (controls) as images
            assert math.comb(spared, weight(spared)) >= 2 * num and all(math.comb(m, weight(m)) < 2 * num for m in range(lo, spared))
    with pytest.raises(WherefromError, match=r"n >= 19 leaves as many unused codes as images"):
        Codes.generate(np.arange(1797), 8, 4)  # C(18, 4) = 3060 < 2 x 1797 <= C(19, 4) = 3876


@pytest.mark.parametrize("num, n, w, limit", [(6, 6, 3, 4096), (300, 12, 6, 4096), (300, 12, 6, 50), (2000, 40, 5, 500)])  # C(40, 5) > 100,000: sampled
def test_controls_are_the_unused_codes(num, n, w, limit):
    """All unused weight-w codes (or a seeded sample of ``limit`` of them), never an image's code."""
    codes = Codes.generate(np.arange(num), n, w, seed=1)
    controls = codes.controls(limit=limit)
    masks, used = masks_from_bits(controls), set(masks_from_bits(codes.bits).tolist())
    assert controls.dtype == bool and (controls.sum(1) == w).all()
    assert len(set(masks.tolist())) == len(masks) and not used & set(masks.tolist()) and (np.diff(masks) > 0).all()
    assert len(masks) == min(limit, math.comb(n, w) - num)
    np.testing.assert_array_equal(controls, codes.controls(limit=limit))  # seeded
    if limit >= math.comb(n, w) - num:  # every unused code, enumerated
        every = {m for m in range(1 << n) if bin(m).count("1") == w}
        assert set(masks.tolist()) == every - used


@pytest.mark.parametrize("n, w, match", [(1, None, "n must be"), (63, None, "n must be"), (8, 0, "weight w"), (8, 8, "weight w")])
def test_bad_n_or_w(n, w, match):
    with pytest.raises(WherefromError, match=match):
        Codes.generate(np.arange(3), n, w)


def test_lookups_reject_indices_outside_the_split():
    codes = Codes.generate(np.array([2, 5, 9, 11]), 4, 2)
    assert codes.members_of(9) == np.flatnonzero(codes.bits[2]).tolist()
    for bad in (0, 6, 12):
        with pytest.raises(WherefromError, match="not in the ensemble's training split"):
            codes.members_of(bad)
    with pytest.raises(WherefromError, match="removes all 4 members"):
        codes.kept_members([2, 5, 9, 11])
    with pytest.raises(WherefromError, match="member must be"):
        codes.split(4)


@pytest.mark.parametrize("num, n, w", [(50_000, 20, 10), (20_000, 30, 15)])  # enumerated / rejection-sampled codes
def test_generation_and_check_scale_to_tens_of_thousands(num, n, w):
    start = time.perf_counter()
    codes = Codes.generate(np.arange(num), n, w, seed=0)  # runs check_codes
    assert time.perf_counter() - start < 10
    assert codes.loads.max() - codes.loads.min() <= 1
    start = time.perf_counter()
    check_codes(codes.bits, w)
    assert time.perf_counter() - start < 2
    # the check finds a planted duplicate and a planted wrong weight
    bits = codes.bits.copy()
    bits[num - 7] = bits[123]
    with pytest.raises(WherefromError, match=f"rows 123 and {num - 7} are equal"):
        check_codes(bits, w)
    bits = codes.bits.copy()
    bits[4567, ~bits[4567]] = True
    with pytest.raises(WherefromError, match=f"row 4567 has weight {n}"):
        check_codes(bits, w)


def test_check_agrees_with_brute_force_on_constant_weight_matrices():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n, w = 6, 3
        bits = np.zeros((12, n), dtype=bool)
        for row in bits:
            row[rng.choice(n, w, replace=False)] = True
        try:
            check_codes(bits, w)
            ok = True
        except WherefromError:
            ok = False
        assert ok == encoded_property_brute(bits)


# --- group-level codes -------------------------------------------------------------------


def test_group_codes_share_a_code_per_group_and_separate_groups():
    rng = np.random.default_rng(0)
    indices = rng.permutation(np.arange(100, 160))  # unsorted on purpose: groups follow their indices
    groups = indices % 10  # ten groups of six
    codes = Codes.generate(indices, n=5, w=2, seed=3, groups=groups)
    g = codes.groups
    assert np.array_equal(g, codes.indices % 10)
    for group in range(10):
        rows = codes.bits[g == group]
        assert (rows == rows[0]).all()
    firsts = codes.bits[[int(np.flatnonzero(g == k)[0]) for k in range(10)]]
    assert len({r.tobytes() for r in firsts}) == 10  # C(5, 2) = 10 distinct group codes
    # ablating one image of a group drops exactly that group's members, and every other group keeps one
    for group in range(10):
        kept = codes.kept_members([int(codes.indices[g == group][0])])
        assert not codes.bits[g == group][:, kept].any()
        assert codes.bits[g != group][:, kept].any(1).all()
    # persistence and fingerprint carry the groups
    again = Codes.from_state(codes.state())
    assert np.array_equal(again.groups, g) and again.fingerprint == codes.fingerprint
    with pytest.raises(WherefromError, match="C\\(5, 2\\) = 10"):
        Codes.generate(np.arange(20), 5, 2, groups=np.arange(20) % 11)
    bad = codes.bits.copy()
    bad[np.flatnonzero(g == 0)[1]] = codes.bits[np.flatnonzero(g == 1)[0]]
    with pytest.raises(WherefromError, match="differs from the code of its group"):
        check_codes(bad, 2, g)


def test_one_group_per_image_gives_the_per_image_codes():
    """Groups that are singletons reproduce the per-image codes bit for bit (same seeded draw)."""
    indices = np.arange(7, 77)
    plain = Codes.generate(indices, 8, 4, seed=1)
    singletons = Codes.generate(indices, 8, 4, seed=1, groups=indices * 3)
    assert np.array_equal(plain.bits, singletons.bits)
