"""adaptflow.data.splits: content-keyed splits; the k-shot subset; the stratified limit."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from adaptflow.data.splits import k_shot, positions, stable_split, stratified_subset

label_arrays = st.lists(st.integers(0, 4), min_size=1, max_size=120).map(lambda xs: np.array(xs, dtype=np.int64))
fractions = st.tuples(st.floats(0.0, 0.45), st.floats(0.0, 0.45))


def _keys(n: int, tag: str = "img") -> list[str]:
    return [f"{tag}{i}" for i in range(n)]


def test_stable_split_deterministic_and_seed_dependent():
    labels = np.repeat(np.arange(3), 20)
    a = stable_split(labels, _keys(60), {"val": 0.2, "test": 0.3}, seed=5)
    b = stable_split(labels, _keys(60), {"val": 0.2, "test": 0.3}, seed=5)
    c = stable_split(labels, _keys(60), {"val": 0.2, "test": 0.3}, seed=6)
    assert (a == b).all()
    assert not (a == c).all()


def test_stable_split_follows_the_key_not_the_position():
    labels = np.repeat(np.arange(2), 50)
    keys = _keys(100)
    out = stable_split(labels, keys, {"val": 0.1, "test": 0.3}, seed=0)
    order = np.random.default_rng(1).permutation(100)
    shuffled = stable_split(labels[order], [keys[i] for i in order], {"val": 0.1, "test": 0.3}, seed=0)
    assert (shuffled == out[order]).all()


def test_stable_split_new_items_move_no_old_item():
    labels = np.repeat(np.arange(3), 40)
    fracs = {"val": 0.1, "test": 0.3}
    before = stable_split(labels, _keys(120), fracs, seed=0)
    grown = np.concatenate([labels, np.repeat(np.arange(3), 30)])
    after = stable_split(grown, _keys(120) + _keys(90, "new"), fracs, seed=0)
    assert (after[:120] == before).all()
    assert set(after[120:].tolist()) == {"train", "val", "test"}  # the new items join every split


def test_stable_split_fractions_hold_on_large_classes():
    labels = np.repeat(np.arange(2), 5000)
    out = stable_split(labels, _keys(10_000), {"val": 0.1, "test": 0.3}, seed=0)
    for c in (0, 1):
        got = Counter(out[labels == c].tolist())
        # binomial: 4 standard deviations of 5000 draws at p = 0.1 / 0.3 are 85 / 130 items
        assert abs(got["val"] - 500) < 85 and abs(got["test"] - 1500) < 130, got


def test_stable_split_custom_rest_name():
    out = stable_split(np.zeros(1000, dtype=int), _keys(1000), {"keep": 0.3}, seed=0, rest="drop")
    assert set(out.tolist()) == {"keep", "drop"} and 230 < (out == "keep").sum() < 370


def test_stable_split_small_class_still_fills_every_split():
    labels = np.zeros(4, dtype=int)
    for seed in range(50):  # four items at val 0.1, test 0.1 rarely land in both: the nearest are borrowed
        out = stable_split(labels, _keys(4), {"val": 0.1, "test": 0.1}, seed=seed, rest_min=2)
        assert sorted(Counter(out.tolist()).items()) == [("test", 1), ("train", 2), ("val", 1)], (seed, out)


def test_stable_split_class_too_small_raises():
    with pytest.raises(ValueError, match="class 1 has 2 items"):
        stable_split(np.array([0, 0, 0, 1, 1]), _keys(5), {"val": 0.2, "test": 0.2}, seed=0)


@given(labels=label_arrays, fr=fractions, seed=st.integers(0, 2**32 - 1), rest_min=st.integers(1, 3))
def test_stable_split_partitions_and_meets_minimums(labels, fr, seed, rest_min):
    fracs = {"val": fr[0], "test": fr[1]}
    keys = _keys(len(labels))
    sizes = Counter(labels.tolist())
    if min(sizes.values()) < 2 + rest_min:
        with pytest.raises(ValueError, match="fewer than"):
            stable_split(labels, keys, fracs, seed=seed, rest_min=rest_min)
        return
    out = stable_split(labels, keys, fracs, seed=seed, rest_min=rest_min)
    assert out.shape == labels.shape
    assert set(out.tolist()) <= {"train", "val", "test"}  # every index gets exactly one split name
    for c in sizes:
        got = Counter(out[labels == c].tolist())
        assert got["val"] >= 1 and got["test"] >= 1 and got["train"] >= rest_min, (c, got)
    assert (out == stable_split(labels, keys, fracs, seed=seed, rest_min=rest_min)).all()


# --- k_shot -------------------------------------------------------------------------------------------


def test_k_shot_exactly_k_per_class_among_candidates():
    labels = np.repeat(np.arange(4), 10)
    candidates = np.tile(np.arange(10) < 6, 4)  # first 6 of each class
    mask = k_shot(labels, candidates, k=3, keys=_keys(len(labels)), seed=0)
    assert mask.dtype == bool and mask.shape == labels.shape
    assert not (mask & ~candidates).any()
    assert Counter(labels[mask].tolist()) == {0: 3, 1: 3, 2: 3, 3: 3}
    assert (mask == k_shot(labels, candidates, k=3, keys=_keys(len(labels)), seed=0)).all()


def test_k_shot_k_equals_available_takes_all():
    labels = np.array([0, 0, 1, 1, 1])
    candidates = np.array([1, 1, 0, 1, 1], bool)
    assert (k_shot(labels, candidates, 2, _keys(len(labels)), seed=1) == candidates).all()


def test_k_shot_too_few_raises_naming_target_k():
    labels = np.array([0, 0, 0, 1, 1, 1])
    candidates = np.array([1, 1, 1, 1, 0, 0], bool)  # class 1 has one candidate
    with pytest.raises(ValueError, match=r"target\.k=2") as exc:
        k_shot(labels, candidates, k=2, keys=_keys(len(labels)), seed=0)
    assert "class 1" in str(exc.value)


def test_k_shot_class_without_candidates_raises():
    labels = np.array([0, 0, 0, 1, 1, 1])
    candidates = np.array([1, 1, 1, 0, 0, 0], bool)  # class 1 entirely outside train
    with pytest.raises(ValueError, match=r"target\.k"):
        k_shot(labels, candidates, k=2, keys=_keys(len(labels)), seed=0)


@given(labels=label_arrays, k=st.integers(1, 5), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_k_shot_property(labels, k, seed, data):
    candidates = np.array(data.draw(st.lists(st.booleans(), min_size=len(labels), max_size=len(labels))), dtype=bool)
    present = np.unique(labels)
    # a class with no candidate at all has its own test above; keep this property to the clear cases
    assume(all((candidates & (labels == c)).any() for c in present))
    short = [c for c in present if (candidates & (labels == c)).sum() < k]
    if short:
        with pytest.raises(ValueError, match="target.k"):
            k_shot(labels, candidates, k, _keys(len(labels)), seed)
        return
    mask = k_shot(labels, candidates, k, _keys(len(labels)), seed)
    assert not (mask & ~candidates).any()
    assert Counter(labels[mask].tolist()) == {int(c): k for c in present}


def test_k_shot_keeps_its_picks_when_later_items_come_after_them():
    labels = np.repeat(np.arange(2), 30)
    keys = _keys(60)
    before = k_shot(labels, np.ones(60, bool), 3, keys, seed=0)
    grown = np.concatenate([labels, np.repeat(np.arange(2), 30)])
    after = k_shot(grown, np.ones(120, bool), 3, keys + _keys(60, "new"), seed=0)
    u = positions(keys + _keys(60, "new"), "labeled:0")
    for c in (0, 1):  # a picked item is replaced only by a new one that comes before it
        old, new = np.flatnonzero(before & (labels == c)), np.flatnonzero(after & (grown == c))
        dropped = set(old.tolist()) - set(new.tolist())
        added = set(new.tolist()) - set(old.tolist())
        assert all(i >= 60 for i in added) and len(dropped) == len(added)
        assert all(u[a] < u[d] for a in added for d in dropped)


# --- stratified_subset --------------------------------------------------------------------------------

KEYS4 = ["a", "b", "c", "d"]


def test_subset_none_or_large_limit_keeps_everything():
    labels = np.array([0, 1, 1, 2])
    assert (stratified_subset(labels, None, 0, KEYS4) == np.arange(4)).all()
    assert (stratified_subset(labels, 4, 0, KEYS4) == np.arange(4)).all()
    assert (stratified_subset(labels, 100, 0, KEYS4) == np.arange(4)).all()


def test_subset_keeps_proportions_and_limit():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    idx = stratified_subset(labels, 10, 3, _keys(len(labels)))
    assert len(idx) == 10 and len(set(idx.tolist())) == 10
    assert Counter(labels[idx].tolist()) == {0: 5, 1: 3, 2: 2}
    assert (idx == stratified_subset(labels, 10, 3, _keys(len(labels)))).all()


@given(labels=label_arrays, limit=st.integers(1, 130), seed=st.integers(0, 1000))
def test_subset_proportions_property(labels, limit, seed):
    idx = stratified_subset(labels, limit, seed, _keys(len(labels)))
    assert len(set(idx.tolist())) == len(idx)
    assert ((idx >= 0) & (idx < len(labels))).all()
    if limit >= len(labels):
        assert len(idx) == len(labels)
        return
    assert len(idx) == limit  # exactly the limit: largest-remainder apportionment
    frac = limit / len(labels)
    for c in np.unique(labels):
        n_c = int((labels == c).sum())
        assert abs(int((labels[idx] == c).sum()) - frac * n_c) < 1.0


UCI_DIGITS_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.mark.parametrize("counts, limit", [([3, 3, 3], 5), (UCI_DIGITS_CLASS_COUNTS, 16)])
def test_subset_never_exceeds_limit(counts, limit):
    labels = np.repeat(np.arange(len(counts)), counts)
    assert len(stratified_subset(labels, limit, 0, _keys(len(labels)))) <= limit


def test_subset_follows_keys_not_positions():
    """The same items are kept however the listing is ordered: the choice is by key."""
    labels = np.repeat([0, 1], 40)
    keys = _keys(len(labels))
    kept = {keys[i] for i in stratified_subset(labels, 20, 5, keys)}
    order = np.random.default_rng(0).permutation(len(labels))
    shuffled = {keys[order[i]] for i in stratified_subset(labels[order], 20, 5, [keys[j] for j in order])}
    assert kept == shuffled
    assert kept != {keys[i] for i in stratified_subset(labels, 20, 6, keys)}  # the seed picks another subset


def test_subset_with_new_data_swaps_old_items_only_for_new_ones():
    """Same limit, more data: each old item dropped makes room for a new item, never for another old one."""
    labels = np.repeat([0, 1, 2], 30)
    keys = _keys(len(labels))
    before = {keys[i] for i in stratified_subset(labels, 30, 0, keys)}
    more = np.concatenate([labels, np.repeat([0, 1, 2], 10)])
    more_keys = _keys(len(more))
    after = {more_keys[i] for i in stratified_subset(more, 30, 0, more_keys)}
    old = set(keys)
    assert len(after) == 30
    assert (after & old) <= before  # no old item joins
    assert len(before - after) == len(after - old)  # what left was replaced by new items
    assert before & after  # and most of the subset stays (bottom-k of the same order)


def test_subset_when_class_shares_change_only_the_quotas_move():
    """Data arriving unevenly moves the quotas: a class keeps its own first items by key, more or fewer."""
    labels = np.repeat([0, 1], 10)
    keys = _keys(len(labels))
    before = set(stratified_subset(labels, 10, 0, keys).tolist())
    more = np.concatenate([labels, [0, 0, 0, 0]])
    more_keys = _keys(len(more))
    after = set(stratified_subset(more, 10, 0, more_keys).tolist())
    u = positions(more_keys, "limit:0")
    for c, n in ((0, 6), (1, 4)):  # 14 : 10 of 24 → 5.83 : 4.17 → 6 and 4
        idx = np.flatnonzero(more == c)
        assert {i for i in after if more[i] == c} == set(idx[np.argsort(u[idx])[:n]].tolist())
    assert {i for i in before if labels[i] == 1} >= {i for i in after if more[i] == 1}  # class 1's share shrank


def test_subset_needs_a_key_per_item():
    with pytest.raises(ValueError, match="keys"):
        stratified_subset(np.array([0, 1, 1]), 2, 0, ["a"])
