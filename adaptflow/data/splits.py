"""Content-keyed splits, the k-shot labeled subset and the stratified limit: pure functions over label arrays."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def positions(keys: Sequence[str], salt: str) -> np.ndarray:
    """Each key's fixed place in [0, 1): the top 53 bits of sha256(``salt``:key), so it depends on the key
    and the salt alone, never on which other items are present or in what order."""
    return np.array([int.from_bytes(hashlib.sha256(f"{salt}:{k}".encode()).digest()[:8], "big") >> 11 for k in keys],
                    dtype=np.float64) / 2.0**53


def stable_split(labels: np.ndarray, keys: Sequence[str], fractions: dict[str, float], seed: int,
                 rest: str = "train", rest_min: int = 1) -> np.ndarray:
    """Assign each item a split name by its content ``keys`` (and ``seed``), not by its position.

    An item's place in [0, 1) (:func:`positions`) falls in one named split's interval (``fractions`` laid
    end to end, in order) or beyond them all, in ``rest``. So adding or removing items moves no other item:
    new data joins the splits and what was test stays test. Per class the counts follow the fractions
    statistically, not exactly (binomial). The one exception keeps every class usable: where a class's
    items leave a named split empty, or ``rest`` below ``rest_min``, the items nearest that split's interval
    are borrowed from splits that can spare them (only classes a few times smaller than 1/fraction need it;
    as the class grows the borrowed items return). Returns an array of split names.
    """
    labels = np.asarray(labels)
    if len(keys) != len(labels):
        raise ValueError(f"{len(keys)} keys for {len(labels)} labels")
    u = positions(keys, f"split:{seed}")
    edges, lo = {}, 0.0
    for name, f in fractions.items():
        edges[name] = (lo, lo + f)
        lo += f
    edges[rest] = (lo, 1.0)
    need = {**{name: 1 for name in fractions}, rest: rest_min}
    out = np.full(len(labels), rest, dtype=object)
    for name, (a, b) in edges.items():
        if name != rest:
            out[(u >= a) & (u < b)] = name
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < sum(need.values()):
            raise ValueError(f"class {c} has {len(idx)} items, fewer than the {sum(need.values())} its splits need")
        _fill_minimums(out, idx, u, edges, need)
    return out


def _fill_minimums(out: np.ndarray, idx: np.ndarray, u: np.ndarray, edges: dict, need: dict[str, int]) -> None:
    """Within one class, move the nearest spare items into any split below its minimum."""
    while True:
        counts = {name: int((out[idx] == name).sum()) for name in edges}
        short = [name for name in edges if counts[name] < need[name]]
        if not short:
            return
        a, b = edges[short[0]]
        spare = np.array([counts[out[i]] > need[out[i]] for i in idx])
        cand = idx[spare]
        dist = np.maximum(a - u[cand], 0.0) + np.maximum(u[cand] - b, 0.0)
        out[cand[np.argmin(dist)]] = short[0]


def split_counts(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """A class's expected share of ``n`` items in each named split, rounded: :func:`min_class_size` sizes a
    class by it, so each split holds about its fraction, not only the one item :func:`stable_split` ensures."""
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


def k_shot(labels: np.ndarray, candidates: np.ndarray, k: int, keys: Sequence[str], seed: int) -> np.ndarray:
    """A boolean mask over ``labels``: per class the ``k`` candidates (a boolean mask) whose content ``keys``
    come first in the seed's order (:func:`positions`). New items change a class's pick only where one of
    them comes before a picked item; otherwise the labeled set stays as it was."""
    u = positions(keys, f"labeled:{seed}")
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):  # every class, including one with no candidates left
        idx = np.flatnonzero(candidates & (labels == c))
        if len(idx) < k:
            raise ValueError(f"class {c} has {len(idx)} train images, fewer than target.k={k}; lower target.k")
        mask[_first(idx, u, k)] = True
    return mask


def _first(idx: np.ndarray, u: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` of ``idx`` whose places ``u`` come first."""
    return idx[np.argsort(u[idx], kind="stable")[:n]]


def class_quota(counts: np.ndarray, limit: int) -> np.ndarray:
    """How many items of each class (``counts`` of them) a ``limit`` keeps: the class's share of it, the
    remainders going to the largest fractions (what :func:`stratified_subset` takes)."""
    counts = np.asarray(counts)
    if limit >= counts.sum():
        return counts.copy()
    quota = counts * (limit / counts.sum())
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[: limit - take.sum()]:
        take[i] += 1
    return take


def stratified_subset(labels: np.ndarray, limit: int | None, seed: int, keys: Sequence[str]) -> np.ndarray:
    """Indices of exactly ``min(limit, N)`` items keeping the class proportions (largest remainder).

    Within a class the items kept are the class's share of the limit taken in the seed's order of their
    ``keys`` (:func:`positions`), not by position. So while the class shares stay the same (data arriving in
    proportion), new data changes the subset only by new items taking the place of old ones that come after
    them. A class whose share grows takes more of its items, old ones included; one whose share shrinks
    keeps fewer."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    if len(keys) != len(labels):
        raise ValueError(f"{len(keys)} keys for {len(labels)} labels")
    u = positions(keys, f"limit:{seed}")
    classes, counts = np.unique(labels, return_counts=True)
    take = class_quota(counts, limit)
    picked = [_first(np.flatnonzero(labels == c), u, n) for c, n in zip(classes, take)]
    return np.sort(np.concatenate(picked))
