"""adaptflow.data.synth: digits from matplotlib's fonts, varied, balanced, and byte-identical per seed."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptflow.data import synth


def test_fonts_are_matplotlibs_digit_faces():
    fonts = synth.digit_fonts()
    names = {p.name for p in fonts}
    assert len(fonts) >= 10
    assert all(p.parent == synth.font_dir() for p in fonts)
    assert {"DejaVuSans.ttf", "STIXGeneral.ttf", "cmr10.ttf"} <= names  # DejaVu, STIX, Computer Modern
    assert not names & {"cmex10.ttf", "cmsy10.ttf", "LastResortHE-Regular.ttf", "DejaVuSansDisplay.ttf"}  # no digit glyphs


@given(n=st.integers(10, 500), seed=st.integers(0, 2**31))
@settings(max_examples=30)
def test_labels_balanced_and_seeded(n, seed):
    lab = synth.labels(n, seed)
    counts = Counter(lab.tolist())
    assert set(counts) <= set(range(10)) and max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == n
    assert (lab == synth.labels(n, seed)).all()


def test_same_seed_same_bytes_in_any_order():
    forward = [synth.render(i, 7, 16, i % 10).tobytes() for i in range(12)]
    backward = [synth.render(i, 7, 16, i % 10).tobytes() for i in reversed(range(12))][::-1]
    assert forward == backward  # image i depends on (seed, i) only: lazy, streaming, parallel all agree
    assert synth.render(3, 8, 16, 3).tobytes() != forward[3]


def test_renders_vary_and_have_the_requested_size():
    ims = [np.asarray(synth.render(i, 0, 20, 5)) for i in range(20)]
    assert all(im.shape == (20, 20, 3) and im.dtype == np.uint8 for im in ims)
    assert len({im.tobytes() for im in ims}) == 20  # the same digit, twenty different renderings
    assert np.std([im.mean() for im in ims]) > 5  # colours and backgrounds vary


@pytest.mark.parametrize("digit", range(10))
def test_the_digit_is_drawn(digit):
    # Foreground differs from background: the rendered image is not flat.
    im = np.asarray(synth.render(digit, 0, 16, digit), np.float32)
    assert im.std() > 8


def test_fingerprint_is_stable():
    assert synth.fingerprint() == synth.fingerprint() and len(synth.fingerprint()) == 16
