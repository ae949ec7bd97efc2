"""Calibration and per-class metrics against hand-worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adaptflow.calibration import (
    expected_calibration_error,
    information_maximisation,
    nll,
    confusion,
    macro_f1,
    per_class_recall,
    reliability,
)


def two_class(conf: list[float], correct: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities whose top-label confidence is ``conf`` (class 0 on top) and labels that make each
    prediction right or wrong as asked."""
    p = np.array([[c, 1 - c] for c in conf])
    labels = np.array([0 if ok else 1 for ok in correct])
    return p, labels


def test_ece_hand_example():
    # bin [0.8, 0.9): two predictions at 0.8, one right → |0.5 - 0.8| = 0.3, weight 2/4
    # bin [0.6, 0.7): two predictions at 0.6, both right → |1.0 - 0.6| = 0.4, weight 2/4
    p, y = two_class([0.8, 0.8, 0.6, 0.6], [True, False, True, True])
    assert expected_calibration_error(p, y, n_bins=10) == pytest.approx(0.5 * 0.3 + 0.5 * 0.4)


def test_perfectly_calibrated_bins_give_zero():
    # 10 predictions at 0.7 with 7 right; 10 at 0.9 with 9 right
    p, y = two_class([0.7] * 10 + [0.9] * 10, [True] * 7 + [False] * 3 + [True] * 9 + [False])
    assert expected_calibration_error(p, y, n_bins=10) == pytest.approx(0.0, abs=1e-12)


def test_overconfident_model_has_large_ece():
    p, y = two_class([0.99] * 10, [True] * 5 + [False] * 5)
    assert expected_calibration_error(p, y) == pytest.approx(0.49)


def test_reliability_bins_edges_and_counts():
    # 1.0 belongs to the last bin; an inner edge (0.5) to the bin above it
    p = np.array([[1.0, 0.0], [0.5, 0.5], [0.55, 0.45], [0.95, 0.05]])
    y = np.array([0, 0, 1, 0])
    rel = reliability(p, y, n_bins=2)
    assert list(rel.edges) == [0.0, 0.5, 1.0]
    assert list(rel.count) == [0, 4]
    assert rel.accuracy[1] == pytest.approx(0.75)
    assert rel.confidence[1] == pytest.approx((1.0 + 0.5 + 0.55 + 0.95) / 4)
    assert math.isnan(rel.accuracy[0])
    rows = rel.rows()
    assert rows[0]["count"] == 0 and rows[0]["accuracy"] is None
    assert rows[1]["bin_center"] == pytest.approx(0.75)


def test_reliability_rejects_bad_shapes():
    with pytest.raises(ValueError):
        reliability(np.ones(3), np.zeros(3))
    with pytest.raises(ValueError):
        reliability(np.ones((3, 2)) / 2, np.zeros(2))
    with pytest.raises(ValueError):
        reliability(np.ones((3, 2)) / 2, np.zeros(3, int), n_bins=0)


def test_empty_input_has_nan_ece():
    assert math.isnan(expected_calibration_error(np.zeros((0, 3)), np.zeros(0, int)))


@given(st.lists(st.tuples(st.floats(0.34, 1.0), st.booleans()), min_size=1, max_size=50), st.integers(1, 20))
def test_ece_bounded_and_counts_add_up(rows, n_bins):
    conf = [c for c, _ in rows]
    p = np.stack([np.array(conf), (1 - np.array(conf)) / 2, (1 - np.array(conf)) / 2], axis=1)
    y = np.array([0 if ok else 1 for _, ok in rows])
    rel = reliability(p, y, n_bins)
    assert rel.count.sum() == len(rows)
    assert 0.0 <= rel.ece <= 1.0


def test_per_class_recall():
    y = np.array([0, 0, 1, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0, 0])
    r = per_class_recall(pred, y, 4)
    assert r[:3] == pytest.approx([0.5, 2 / 3, 0.0])
    assert math.isnan(r[3])  # no true example of class 3


def test_confusion_and_macro_f1_agree_with_scikit_learn():
    from sklearn.metrics import confusion_matrix, f1_score

    rng = np.random.default_rng(0)
    for n, size in ((2, 7), (5, 40), (10, 300)):
        y, pred = rng.integers(0, n, size), rng.integers(0, n - 1, size)  # class n-1 never predicted
        y[y == 0] = 1  # class 0 never true
        assert np.array_equal(confusion(pred, y, n), confusion_matrix(y, pred, labels=range(n)))
        assert macro_f1(pred, y, n) == pytest.approx(f1_score(y, pred, average="macro"))
    # classes 1, 2: neither true nor predicted (a split that holds none of them): not counted as 0
    assert macro_f1(np.array([0, 0]), np.array([0, 0]), 3) == 1.0
    assert macro_f1(np.array([1, 0]), np.array([0, 0]), 3) == pytest.approx((2 / 3 + 0) / 2)  # 1 predicted, never true: a 0
    assert np.isnan(macro_f1(np.array([], dtype=int), np.array([], dtype=int), 3))


def test_nll():
    p = np.array([[0.5, 0.5], [0.25, 0.75]])
    assert nll(p, np.array([0, 1])) == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2)
    assert nll(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(-math.log(1e-12))


def test_information_maximisation_prefers_confident_and_diverse():
    confident_diverse = np.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3]] * 0.97 + 0.01
    collapsed = np.eye(4)[[0] * 8] * 0.97 + 0.01
    unsure = np.full((8, 4), 0.25)
    a, b, c = (information_maximisation(x) for x in (confident_diverse, collapsed, unsure))
    assert a > b and a > c
    assert c == pytest.approx(0.0, abs=1e-9)
    assert -1.0 <= b <= 1.0 and a <= 1.0


def test_wilson_interval_matches_the_textbook_values():
    from adaptflow.calibration import wilson_interval

    lo, hi = wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = wilson_interval(1.0, 20)  # never above 1, and not a zero-width interval at a perfect score
    assert hi == 1.0 and lo == pytest.approx(0.8389, abs=1e-4)
    assert all(np.isnan(v) for v in wilson_interval(0.5, 0))
