"""Stratified, seeded splits and the k-shot labeled subset: pure functions over label arrays."""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int, rest: str = "train") -> np.ndarray:
    """Assign each index a split name; every class is divided by the same fractions (rounded per class).

    Returns an array of split names. ``rest`` receives what the fractions leave.
    """
    rng = np.random.default_rng(seed)
    out = np.full(len(labels), rest, dtype=object)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for name, n in split_counts(len(idx), fractions).items():
            out[idx[start : start + n]] = name
            start += n
    return out


def split_counts(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """How many of a class's ``n`` items each named split receives (the rest stays in train)."""
    return {name: int(round(frac * n)) for name, frac in fractions.items()}


def min_class_size(fractions: dict[str, float], train_min: int = 1, limit: int = 100_000) -> int:
    """The fewest items a class needs so every named split gets at least one and train keeps ``train_min``.

    Checked at ingest, before any training: a class below it would be missing from val or test (its
    accuracy silently unmeasured) or could not give ``target.k`` labeled train images.
    """
    for n in range(1, limit + 1):
        counts = split_counts(n, fractions)
        if min(counts.values(), default=1) >= 1 and n - sum(counts.values()) >= train_min:
            return n
    raise ValueError(f"no class size up to {limit} satisfies fractions {fractions} with {train_min} train items")


def k_shot(labels: np.ndarray, candidates: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A boolean mask over ``labels``: k seeded picks per class among ``candidates`` (a boolean mask)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):  # every class, including one with no candidates left
        idx = np.flatnonzero(candidates & (labels == c))
        if len(idx) < k:
            raise ValueError(f"class {c} has {len(idx)} train images, fewer than target.k={k}; lower target.k")
        mask[rng.choice(idx, size=k, replace=False)] = True
    return mask


def stratified_subset(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Indices of exactly ``min(limit, N)`` items keeping the class proportions (largest remainder)."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (limit / len(labels))
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[: limit - take.sum()]:
        take[i] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in zip(classes, take)]
    return np.sort(np.concatenate(picked))
