"""adaptflow.data.splits: stratified, seeded splits; the k-shot subset; the stratified limit."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from adaptflow.data.splits import k_shot, stratified_split, stratified_subset

label_arrays = st.lists(st.integers(0, 4), min_size=1, max_size=120).map(lambda xs: np.array(xs, dtype=np.int64))
fractions = st.tuples(st.floats(0.0, 0.45), st.floats(0.0, 0.45))


def test_stratified_split_deterministic_and_seed_dependent():
    labels = np.repeat(np.arange(3), 20)
    a = stratified_split(labels, {"val": 0.2, "test": 0.3}, seed=5)
    b = stratified_split(labels, {"val": 0.2, "test": 0.3}, seed=5)
    c = stratified_split(labels, {"val": 0.2, "test": 0.3}, seed=6)
    assert (a == b).all()
    assert not (a == c).all()


def test_stratified_split_exact_counts():
    labels = np.repeat([0, 1], [10, 20])
    out = stratified_split(labels, {"val": 0.1, "test": 0.3}, seed=0)
    counts = Counter(zip(labels.tolist(), out.tolist()))
    assert counts == {(0, "val"): 1, (0, "test"): 3, (0, "train"): 6, (1, "val"): 2, (1, "test"): 6, (1, "train"): 12}


def test_stratified_split_custom_rest_name():
    out = stratified_split(np.zeros(10, dtype=int), {"keep": 0.3}, seed=0, rest="drop")
    assert sorted(Counter(out.tolist()).items()) == [("drop", 7), ("keep", 3)]


@given(labels=label_arrays, fr=fractions, seed=st.integers(0, 2**32 - 1))
def test_stratified_split_partitions_and_keeps_proportions(labels, fr, seed):
    fracs = {"val": fr[0], "test": fr[1]}
    out = stratified_split(labels, fracs, seed=seed)
    assert out.shape == labels.shape
    assert set(out.tolist()) <= {"train", "val", "test"}  # every index gets exactly one split name
    for c in np.unique(labels):
        n_c = int((labels == c).sum())
        for name, f in fracs.items():
            got = int(((labels == c) & (out == name)).sum())
            assert abs(got - f * n_c) <= 0.5 + 1e-9, (c, name, got, f, n_c)
    assert (out == stratified_split(labels, fracs, seed=seed)).all()


# --- k_shot -------------------------------------------------------------------------------------------


def test_k_shot_exactly_k_per_class_among_candidates():
    labels = np.repeat(np.arange(4), 10)
    candidates = np.tile(np.arange(10) < 6, 4)  # first 6 of each class
    mask = k_shot(labels, candidates, k=3, seed=0)
    assert mask.dtype == bool and mask.shape == labels.shape
    assert not (mask & ~candidates).any()
    assert Counter(labels[mask].tolist()) == {0: 3, 1: 3, 2: 3, 3: 3}
    assert (mask == k_shot(labels, candidates, k=3, seed=0)).all()


def test_k_shot_k_equals_available_takes_all():
    labels = np.array([0, 0, 1, 1, 1])
    candidates = np.array([1, 1, 0, 1, 1], bool)
    assert (k_shot(labels, candidates, 2, seed=1) == candidates).all()


def test_k_shot_too_few_raises_naming_target_k():
    labels = np.array([0, 0, 0, 1, 1, 1])
    candidates = np.array([1, 1, 1, 1, 0, 0], bool)  # class 1 has one candidate
    with pytest.raises(ValueError, match=r"target\.k=2") as exc:
        k_shot(labels, candidates, k=2, seed=0)
    assert "class 1" in str(exc.value)


def test_k_shot_class_without_candidates_raises():
    labels = np.array([0, 0, 0, 1, 1, 1])
    candidates = np.array([1, 1, 1, 0, 0, 0], bool)  # class 1 entirely outside train
    with pytest.raises(ValueError, match=r"target\.k"):
        k_shot(labels, candidates, k=2, seed=0)


@given(labels=label_arrays, k=st.integers(1, 5), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_k_shot_property(labels, k, seed, data):
    candidates = np.array(data.draw(st.lists(st.booleans(), min_size=len(labels), max_size=len(labels))), dtype=bool)
    present = np.unique(labels)
    # a class with no candidate at all has its own test above; keep this property to the clear cases
    assume(all((candidates & (labels == c)).any() for c in present))
    short = [c for c in present if (candidates & (labels == c)).sum() < k]
    if short:
        with pytest.raises(ValueError, match="target.k"):
            k_shot(labels, candidates, k, seed)
        return
    mask = k_shot(labels, candidates, k, seed)
    assert not (mask & ~candidates).any()
    assert Counter(labels[mask].tolist()) == {int(c): k for c in present}


# --- stratified_subset --------------------------------------------------------------------------------


def test_subset_none_or_large_limit_keeps_everything():
    labels = np.array([0, 1, 1, 2])
    assert (stratified_subset(labels, None, 0) == np.arange(4)).all()
    assert (stratified_subset(labels, 4, 0) == np.arange(4)).all()
    assert (stratified_subset(labels, 100, 0) == np.arange(4)).all()


def test_subset_keeps_proportions_and_limit():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    idx = stratified_subset(labels, 10, seed=3)
    assert len(idx) == 10 and len(set(idx.tolist())) == 10
    assert Counter(labels[idx].tolist()) == {0: 5, 1: 3, 2: 2}
    assert (idx == stratified_subset(labels, 10, seed=3)).all()


@given(labels=label_arrays, limit=st.integers(1, 130), seed=st.integers(0, 1000))
def test_subset_proportions_property(labels, limit, seed):
    idx = stratified_subset(labels, limit, seed)
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
    assert len(stratified_subset(labels, limit, seed=0)) <= limit
