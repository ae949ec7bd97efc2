"""ingest: decode a domain once, quarantine what cannot be read, dedupe, split, store as uint8.

Source gets train/val; target gets train/val/test plus the k-shot labeled subset of train (the rest of
train is the unlabeled pool). An image's split, and whether it is labeled, follow from a hash of its decoded
pixels and ``seed`` (``splits.stable_split``), so new data moves no image already split (save in a class
too small to fill every split, which borrows): what was test stays test. A CSV manifest's ``split``
column, where given, decides instead. The domain is streamed: one image is decoded, preprocessed
(``imaging.prepare``, the same function the registered model runs), hashed and appended to the store at a
time, so memory is flat in N.

What can go wrong is answered, never hidden:

- a bad *file* (unreadable, truncated, empty, not an image, a decompression bomb) is quarantined: listed
  with its reason in the dataset card and in ``reports/ingest_<role>.json``, logged, and the run goes on;
- an exact duplicate (same preprocessed bytes) is dropped before splitting, so no image sits on both sides
  of a split; the report counts them, and duplicates whose given splits disagree (the first copy is kept).
  An image whose copies carry different labels is a *label conflict*: no label can be trusted, so every
  copy is excluded, listed and logged;
- a problem with the *domain* (missing path, empty folder, malformed manifest, a class too small for the
  requested splits and ``target.k``) raises :class:`DataError` before any training, naming the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from adaptflow import machine, outputs
from adaptflow.data import domains, store
from adaptflow.data.domains import DataError, Domain, check_exists, check_shared_classes, open_domain, parse_spec, resolve
from adaptflow.data.files import BadItem, describe
from adaptflow.data.splits import k_shot, min_class_size, stable_split, stratified_subset
from adaptflow.imaging import prepare, unreadable
from adaptflow.params import ROLES, Params

log = logging.getLogger(__name__)

REPORT_KEYS = ("role", "domain", "n_found", "n_images", "classes", "counts", "quarantined", "ignored", "duplicates", "data_hash")
_LOG_ITEMS = 20  # per-file log lines before "... and N more": the report has them all


def output_dir(params: Params, root: Path, role: str) -> Path:
    return Path(root) / params.paths.ingested / role


def report_path(params: Params, root: Path, role: str) -> Path:
    return Path(root) / params.paths.reports / f"ingest_{role}.json"


def check_run(params: Params, root: Path) -> None:
    """Before a pipeline run starts anything (``adaptflow run``, and every flow run: a scheduled one too): the
    inputs (:func:`check_inputs`), the weights file (at ``pretrain.epochs: 0`` as the source model itself, so
    its classifier must be the source's), and the MLflow server register will use. Raises bad input."""
    from adaptflow import orchestrate
    from adaptflow.models import check_weights

    classes = check_inputs(params, root)
    check_weights(params.pretrain.model, params.preprocess.channels, params.pretrain.weights, root,
                  as_is_for=classes["source"] if params.pretrain.epochs == 0 else None)
    why = orchestrate.mlflow_unreachable(root)
    if why:
        raise orchestrate.NoStore(why)


def check_domains(params: Params, root: Path) -> None:
    """Fail fast on a missing path in *either* role, before spending minutes ingesting the other one."""
    for r in ROLES:
        check_exists(getattr(params, r).domain, root, f"{r}.domain")


def check_listing(params: Params, role: str, domain: Domain) -> np.ndarray:
    """What the listing alone can refuse, before any image is decoded: fewer than two classes, or (where the
    data brings no splits of its own) a class with too few images for ``target.k`` and every split. Returns
    the items kept under ``<role>.limit``."""
    spec = getattr(params, role)
    if len(domain.classes) < 2:
        raise DataError(f"{role}.domain: {spec.domain} has {len(domain.classes)} class(es) {domain.classes}; a classifier needs at least two")
    keep_idx = stratified_subset(domain.labels, spec.limit, params.seed, domain.refs)  # keyed by the item's path (or index)
    if domain.splits is None:
        kept = domain.labels[keep_idx]
        check_class_sizes(per_class(kept, domain.classes), params, role, what="images listed (before any is decoded)",
                          before=per_class(domain.labels, domain.classes),
                          items=lambda c: [str(domain.refs[i]) for i in keep_idx[kept == domain.classes.index(c)]])
    return keep_idx


def check_inputs(params: Params, root: Path) -> dict[str, list[str]]:
    """Before a pipeline run starts anything: every data path exists, each role's listing passes
    :func:`check_listing` (a built-in dataset is read, a folder or manifest listed; no image is decoded),
    and, where something reads source images by target class (:func:`check_shared_classes`), the source
    knows at least one target class (augment checks it again on what ingest kept). Returns each role's
    classes, as listed."""
    check_domains(params, root)
    classes = {}
    for r in ROLES:
        domain = open_role(params, root, r)
        check_listing(params, r, domain)
        classes[r] = domain.classes
    check_shared_classes(params.finetune.strategies, classes["target"], classes["source"], params.finetune.selection)
    return classes


@dataclass
class Decoded:
    """What the streaming pass kept (domain indices, in store order) and what it turned away."""

    index: list[int] = field(default_factory=list)
    sha1: list[str] = field(default_factory=list)  # of the stored (prepared) pixels: what dedupes
    content: list[str] = field(default_factory=list)  # of the decoded pixels: what splits (content_key)
    quarantined: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    conflicts: list[dict] = field(default_factory=list)  # the first copy of each image whose copies' labels disagree
    conflict_log: list[dict] = field(default_factory=list)  # every copy excluded for a label conflict, with the reason
    sizes: list[tuple[int, int]] = field(default_factory=list)
    modes: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)


def _native(raw: object) -> dict:
    if hasattr(raw, "mode") and hasattr(raw, "size"):
        return describe(raw)  # type: ignore[arg-type]
    arr = np.asarray(raw)
    mode = "L" if arr.ndim == 2 or arr.shape[-1] == 1 else {3: "RGB", 4: "RGBA"}.get(arr.shape[-1], f"{arr.shape[-1]}ch")
    return {"h": int(arr.shape[0]), "w": int(arr.shape[1]), "mode": mode, "format": "array"}


def content_key(raw: object) -> str:
    """A hash of a decoded image's own pixels, before preprocessing: what places it in a split. The same
    image renamed, moved, or re-encoded losslessly keeps its split, and ``preprocess`` settings move none."""
    if hasattr(raw, "mode") and hasattr(raw, "tobytes"):  # a PIL image
        head, body = f"{raw.mode}:{raw.size}", raw.tobytes()  # type: ignore[attr-defined]
    else:
        arr = np.ascontiguousarray(raw)
        head, body = f"{arr.dtype}:{arr.shape}", arr.tobytes()
    h = hashlib.sha1(head.encode())
    h.update(body)
    return h.hexdigest()


def stored_digest(arr: np.ndarray) -> str:
    """The identity of an image as stored (prepared pixels): what ingest dedupes on and augment matches."""
    return hashlib.sha1(arr.tobytes()).hexdigest()


MAX_THREADS = 8  # the default's cap: each thread holds one image at its full decoded size


def decode_threads(domain: Domain) -> int:
    """How many images ingest decodes at once: for files, whose decoding runs without the GIL, one per core
    up to :data:`MAX_THREADS` (``ADAPTFLOW_THREADS`` where set, uncapped); one for a built-in dataset, whose
    items are array rows or rendered in Python (threads made synth_digits slower)."""
    return (machine.settings()["threads"] or min(machine.cores(), MAX_THREADS)) if domain.threaded else 1


TRIAL = 256  # items decoded one at a time, then as many on the threads, to choose how to decode the rest
MARGIN = 0.9  # the threads must take at most this share of the time one thread took: a noisy trial stays serial


def in_order(fn: Callable[[Any], Any], items: list, threads: int, ahead: int = 4, label: str = "ingest") -> Iterator[Any]:
    """``map(fn, items)``, results in the items' order, on up to ``threads`` threads. Threads pay only where
    ``fn`` runs mostly without the GIL (decoding large JPEGs: 1.4x on 2 cores); for small files the threads'
    contention for the GIL costs more than they gain (32 px PNGs: half the speed). So the first
    :data:`TRIAL` items run one at a time and the next :data:`TRIAL` on the threads, each timed with what
    the caller does with them, and the rest go on the threads only where they took at most :data:`MARGIN` of
    the time. At most ``ahead`` items per thread are computed before they are consumed (memory stays flat in
    N); closing it cancels what has not started."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="ingest") as pool:
        start = time.perf_counter()
        yield from map(fn, items[:TRIAL])
        one = time.perf_counter() - start
        start = time.perf_counter()
        yield from _pooled(pool, fn, items[TRIAL:2 * TRIAL], threads * ahead)
        many = time.perf_counter() - start
        rest = items[2 * TRIAL:]
        threaded = many < MARGIN * one
        if rest:
            log.info("%s: decoding the rest %s (%.0f images/s on %d threads, %.0f on one)", label,
                     f"on {threads} threads" if threaded else "one at a time", TRIAL / max(many, 1e-9), threads, TRIAL / max(one, 1e-9))
        yield from _pooled(pool, fn, rest, threads * ahead) if threaded else map(fn, rest)


def _pooled(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: list, ahead: int) -> Iterator[Any]:
    """``fn`` over ``items`` on ``pool``, in order, at most ``ahead`` submitted before they are consumed."""
    pending: deque = deque()
    rest = iter(items)
    try:
        for item in itertools.islice(rest, ahead):
            pending.append(pool.submit(fn, item))
        while pending:
            done = pending.popleft().result()
            for item in itertools.islice(rest, 1):
                pending.append(pool.submit(fn, item))
            yield done
    finally:
        for f in pending:
            f.cancel()


def _read(domain: Domain, i: int, size: int, channels: int) -> tuple[dict, str, np.ndarray, str] | str:
    """Item ``i`` decoded and prepared: (native facts, content key, stored pixels, their digest), or the
    reason it cannot be used."""
    try:
        raw = domain.load(i)
        native = _native(raw)
        content = content_key(raw)
        arr = prepare(raw, size, channels)
    except BadItem as exc:
        return str(exc)
    except MemoryError:  # the machine's problem, not the file's: a store must not depend on memory pressure
        raise
    except Exception as exc:  # a decoder failure in prepare is still this item's problem, not the run's
        return unreadable(exc)
    return native, content, arr, stored_digest(arr)


def decode(domain: Domain, indices: np.ndarray, size: int, channels: int, writer: store.ImageWriter, label: str = "ingest") -> Decoded:
    """Stream ``indices`` of ``domain`` into ``writer``: prepare, hash, drop bad files and exact duplicates,
    and exclude every copy of an image whose copies are labeled differently (``writer`` drops the one kept)."""
    out = Decoded()
    first: dict[str, int] = {}  # sha1 → domain index of the copy kept
    natives: list[tuple[str, str]] = []  # (mode, format) of each kept image
    conflicted: dict[str, set[str]] = {}  # sha1 → every label its copies carry, where they disagree
    dup_sha1: list[str] = []  # of each entry of out.duplicates
    start, every = time.perf_counter(), max(len(indices) // 10, 5000)
    order = indices.tolist()
    with contextlib.closing(in_order(lambda i: _read(domain, i, size, channels), order, decode_threads(domain), label=label)) as items:
        for n, (i, item) in enumerate(zip(order, items), 1):
            if isinstance(item, str):
                out.quarantined.append({"item": domain.refs[i], "class": domain.classes[domain.labels[i]], "reason": item})
                continue
            native, content, arr, digest = item
            if digest in first:
                j = first[digest]
                dup = {"item": domain.refs[i], "duplicate_of": domain.refs[j], "class": domain.classes[domain.labels[i]]}
                if domain.labels[i] != domain.labels[j]:
                    conflicted.setdefault(digest, {domain.classes[domain.labels[j]]}).add(dup["class"])
                if domain.splits is not None and domain.splits[i] != domain.splits[j]:
                    dup["given_splits"] = [str(domain.splits[j]), str(domain.splits[i])]
                out.duplicates.append(dup)
                dup_sha1.append(digest)
                continue
            first[digest] = i
            out.index.append(i)
            out.sha1.append(digest)
            out.content.append(content)
            out.sizes.append((native["h"], native["w"]))
            natives.append((native["mode"], native["format"]))
            writer.append(arr)
            if n % every == 0:
                log.info("%s: %d/%d items (%.0f images/s)", label, n, len(indices), n / (time.perf_counter() - start))

    def excluded(item: str, cls: str, digest: str) -> list[str]:  # the other labels; logged with the reason
        others = sorted(conflicted[digest] - {cls})
        out.conflict_log.append({"item": item, "reason": f"labeled {cls!r}, and copies of the same image are labeled "
                                                         f"{', '.join(repr(c) for c in others)}: every copy is excluded; fix the labels to use it"})
        return others

    drop = [pos for pos, digest in enumerate(out.sha1) if digest in conflicted]
    for pos in drop:
        i, digest = out.index[pos], out.sha1[pos]
        cls = domain.classes[domain.labels[i]]
        out.conflicts.append({"item": domain.refs[i], "class": cls, "other_classes": excluded(domain.refs[i], cls, digest), "sha1": digest})
    for dup, digest in zip(out.duplicates, dup_sha1):
        if digest in conflicted:  # every copy, also one labeled as the first copy is
            dup["conflicting_class"] = ", ".join(excluded(dup["item"], dup["class"], digest))
    if drop:
        writer.drop(drop)
        gone = set(drop)
        keep = [pos for pos in range(len(out.index)) if pos not in gone]
        out.index, out.sha1, out.content, out.sizes = ([lst[pos] for pos in keep] for lst in (out.index, out.sha1, out.content, out.sizes))
        natives = [natives[pos] for pos in keep]
    out.modes.update(m for m, _ in natives)
    out.formats.update(f for _, f in natives)
    return out


def _native_card(d: Decoded) -> dict:
    if not d.sizes:
        return {}
    hw = np.array(d.sizes)
    common = Counter(f"{h}x{w}" for h, w in d.sizes).most_common(3)
    return {
        "size_min": hw.min(0).tolist(),
        "size_max": hw.max(0).tolist(),
        "size_median": np.median(hw, 0).astype(int).tolist(),
        "sizes_most_common": dict(common),
        "native_size": int(np.median(hw.min(1))),  # median shorter side: the resolution to Downsample to
        "modes": dict(d.modes),
        "formats": dict(d.formats),
    }


def _fractions(params: Params, role: str) -> dict[str, float]:
    spec = getattr(params, role)
    return {"val": spec.val_fraction, **({"test": params.target.test_fraction} if role == "target" else {})}


def class_size_needed(params: Params, role: str) -> int:
    """The fewest images a class of ``role`` needs: one in every split, and ``target.k`` labeled in train."""
    return min_class_size(_fractions(params, role), train_min=max(params.target.k if role == "target" else 0, 1))


def _limit_note(params: Params, role: str, short: list[str], before: dict[str, int] | None, need: int) -> str:
    """The fix to name first when ``<role>.limit`` is what left a class short: ``before`` holds each class's
    images before the limit (or, for a manifest's own splits, its train images)."""
    limit = getattr(params, role).limit
    cut = [c for c in short if before and before.get(c, 0) >= need]
    if not limit or not cut:
        return ""
    return f"raise or remove {role}.limit={limit} (before it, {', '.join(repr(c) for c in cut)} had enough), "


def per_class(labels: np.ndarray, classes: list[str]) -> dict[str, int]:
    """How many of ``labels`` each class has, by name."""
    return {c: int((labels == i).sum()) for i, c in enumerate(classes)}


def check_class_sizes(counts: dict[str, int], params: Params, role: str, lost: dict[str, Counter] | None = None,
                      what: str = "usable images", before: dict[str, int] | None = None,
                      items: Callable[[str], list[str]] | None = None) -> None:
    """Every class must fill every split (train keeping ``target.k`` for the labeled subset). ``what`` the
    counts are: usable images after decoding, or the files listed before (some may turn out unreadable);
    ``before``: each class's images before ``<role>.limit``; ``items``: a class's files, named for a class of
    at most three (a label typo makes a class of one: the file says where to fix it)."""
    fractions = _fractions(params, role)
    k = params.target.k if role == "target" else 0
    need = class_size_needed(params, role)
    short = {c: n for c, n in counts.items() if n < need}
    if not short:
        return
    lost = lost or {}
    detail = []
    for c, n in short.items():
        why = ", ".join(f"{m} {what}" for what, m in lost.get(c, Counter()).items() if m)
        named = items(c) if items and 0 < (before or {}).get(c, n) <= 3 else []  # all of its files (before any limit cut it)
        detail.append(f"{c!r}: {n}" + (f" ({why})" if why else "") + (f" ({', '.join(named)})" if named else ""))
    asks = ", ".join(f"{name}_fraction={f}" for name, f in fractions.items())
    k_txt = f"target.k={k} labeled train images, " if role == "target" else ""
    conflicted = any(lost.get(c, Counter())["excluded for a label conflict"] for c in short)
    fixes = (_limit_note(params, role, list(short), before, need)
             + ("give each conflicting image one label (the copies are listed with the label conflicts), " if conflicted else "")
             + "add images to those classes"
             + (", lower target.k" if role == "target" and k > 1 else "") + ", or remove the classes.")
    raise DataError(
        f"{role}.domain: class(es) with too few {what} — {'; '.join(detail)}. Each class needs at least {need} "
        f"({k_txt}at least one image in every split at {asks}). {fixes[0].upper()}{fixes[1:]}"
    )


def _given_splits(split: np.ndarray, labels: np.ndarray, classes: list[str], params: Params, role: str,
                  all_labels: np.ndarray | None = None, all_splits: np.ndarray | None = None) -> None:
    """A manifest's own splits: every class needs train images (k of them for the target), and val/test exist."""
    k = max(params.target.k if role == "target" else 0, 1)
    train = per_class(labels[split == "train"], classes)
    short = [c for c, n in train.items() if n < k]
    if short:
        before = per_class(all_labels[all_splits == "train"], classes) if all_splits is not None else None
        raise DataError(f"{role}.domain: the manifest's split column leaves class(es) with fewer than {k} train images "
                        f"({'; '.join(f'{c!r}: {train[c]}' for c in short)}); {_limit_note(params, role, short, before, k)}move rows to train" + (", lower target.k" if role == "target" else "") + ", or drop the split column to split by fractions.")
    for name in ["val"] + (["test"] if role == "target" else []):
        if not (split == name).any():
            limited = getattr(params, role).limit and all_splits is not None and (all_splits == name).any()
            raise DataError(f"{role}.domain: the manifest's split column has no {name!r} rows"
                            + (f" left by {role}.limit; raise or remove it, or " if limited else "; ") + "add some, or drop the split column to split by fractions.")
        missing = [c for c, n in per_class(labels[split == name], classes).items() if n == 0]
        if missing:  # allowed (the split column is the user's), said: that class is not measured there
            log.warning("ingest %s: the manifest's split column gives class(es) %s no %s images: %s", role, missing, name,
                        "checkpoints and strategies are chosen without them" if name == "val"
                        else "their test accuracy cannot be measured, and the comparison and the registry gate go without them")


def _log_items(role: str, what: str, items: list[dict], path: Path) -> None:
    for it in items[:_LOG_ITEMS]:
        log.warning("ingest %s: %s %s: %s", role, what, it["item"], it["reason"])
    if len(items) > _LOG_ITEMS:
        log.warning("ingest %s: … and %d more %s (all listed in %s)", role, len(items) - _LOG_ITEMS, what, path)


def unwatched(path: Path, key: str, watched: str, fix: str, root: Path) -> str | None:
    """In a DVC project, why ``dvc repro`` would not notice a change to ``path`` (None if it would): it is
    outside the path ``key`` names (``watched``), the stage's dependency in dvc.yaml."""
    if not (Path(root) / ".dvc").is_dir():
        return None
    data, dep = Path(path).resolve(), (Path(root) / watched).resolve()
    if data == dep or dep in data.parents:
        return None
    return f"{data} is outside {key} ({watched}): `dvc repro` will not notice changes to it; set {key}: {fix}"


def role_unwatched(params: Params, root: Path, role: str) -> str | None:
    """DVC re-runs ingest when ``<role>.raw`` changes: why it would not notice a change to the role's data."""
    spec = getattr(params, role)
    parsed = parse_spec(spec.domain)
    return unwatched(resolve(parsed, root), f"{role}.raw", spec.raw, parsed.path, root) if parsed.is_path else None


def _warn_unwatched(params: Params, root: Path, role: str) -> None:
    why = role_unwatched(params, root, role)
    if why:
        log.warning("ingest %s: %s", role, why)


def dropped(card: dict) -> dict[str, int]:
    """What ingest left out of a dataset, by why (a dataset card's counts): what its summary line and the
    evaluation report say. A label conflict's copies count together (the first copy and the later ones)."""
    dup = card["duplicates"]
    return {"quarantined": len(card["quarantined"]), "exact duplicates removed": dup["removed"] - dup["conflicting_class"],
            "copies excluded for a label conflict": len(dup["label_conflicts"]) + dup["conflicting_class"],
            "ignored": len(card["ignored"])}


def write_report(params: Params, root: Path, role: str, card: dict) -> Path:
    path = report_path(params, root, role)
    report = {k: card.get(k) for k in REPORT_KEYS}
    report["store"] = str(output_dir(params, root, role))
    outputs.atomic_write_text(path, json.dumps(report, indent=2))
    return path


def _check_decoded(dec, domain, index: np.ndarray, labels: np.ndarray, params: Params, role: str) -> np.ndarray:
    """After decoding: enough usable images for the splits (raises ``DataError``); returns each image's split."""
    lost: dict[str, Counter] = {}
    for it in dec.quarantined:
        lost.setdefault(it["class"], Counter())["quarantined"] += 1
    for it in dec.duplicates:
        lost.setdefault(it["class"], Counter())["duplicates removed" if "conflicting_class" not in it else "excluded for a label conflict"] += 1
    for it in dec.conflicts:
        lost.setdefault(it["class"], Counter())["excluded for a label conflict"] += 1
    if not len(index):
        reasons = Counter(q["reason"].split(":")[0] for q in dec.quarantined).most_common(3)
        raise DataError(f"{role}.domain: no usable images in {getattr(params, role).domain} ({len(dec.quarantined)} quarantined: "
                        f"{dict(reasons)}); check the files are images Pillow can read")
    if domain.splits is not None:
        split = domain.splits[index].astype(object)
        _given_splits(split, labels, domain.classes, params, role, domain.labels, domain.splits.astype(object))
        return split
    check_class_sizes(per_class(labels, domain.classes), params, role, lost, before=per_class(domain.labels, domain.classes))
    k = params.target.k if role == "target" else 0
    return stable_split(labels, dec.content, _fractions(params, role), seed=params.seed, rest_min=max(k, 1))


def _failed_path(report: Path) -> Path:
    return report.with_name(report.stem + ".failed.json")


def _failed_report(params: Params, root: Path, role: str, dec, domain, exc: DataError) -> Path:
    """A failed ingest's own report beside the report of the store it left in place: the error and every
    file it left out, with its reason: quarantined, ignored, duplicates and label conflicts."""
    path = _failed_path(report_path(params, root, role))
    outputs.atomic_write_text(path, json.dumps({"role": role, "domain": getattr(params, role).domain, "error": str(exc),
                                                "quarantined": dec.quarantined, "ignored": domain.ignored,
                                                "label_conflicts": dec.conflict_log, "duplicates": dec.duplicates}, indent=2))
    return path


def open_role(params: Params, root: Path, role: str, opener: Callable[..., Any] = open_domain):
    """The role's domain, checked: a folder or manifest is listed and fingerprinted, no image read; a built-in
    dataset is loaded (rendered lazily for synth_digits). With ``opener=domains.fingerprint``, its
    fingerprint alone, no built-in dataset loaded."""
    check_domains(params, root)
    spec = getattr(params, role)
    allowed = ("train", "val", "test") if role == "target" else ("train", "val")
    return opener(spec.domain, spec, root, f"{role}.domain", allowed)


def raw_fingerprint(params: Params, root: Path, role: str) -> str:
    """The fingerprint of the role's raw data now (a built-in dataset is not loaded for it)."""
    return open_role(params, root, role, domains.fingerprint)


def input_key(params: Params, root: Path, role: str, domain=None) -> outputs.Key:
    """This stage's identity for ``role``: its params sections and the fingerprint of the raw data."""
    raw = domain.fingerprint if domain is not None else raw_fingerprint(params, root, role)
    return outputs.input_key(f"ingest:{role}", params.sections(role, "preprocess", "seed"), raw=raw)


def run(params: Params, root: Path = Path("."), role: str = "target") -> dict:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    spec = getattr(params, role)
    out = output_dir(params, root, role)
    # a dataset shipped as a file is not loaded to find its output current; a folder is listed once
    domain = None if domains.ships_as_file(spec.domain) else open_role(params, root, role)
    key = input_key(params, root, role, domain)
    if outputs.is_current(out, key):
        log.info("ingest %s: up to date (%s)", role, out)
        if not report_path(params, root, role).is_file():
            write_report(params, root, role, store.read_card(out))
        _failed_path(report_path(params, root, role)).unlink(missing_ok=True)  # a failure of other data or params
        return {"role": role, "path": str(out), "digest": outputs.digest(out), "cached": True}
    domain = domain or open_role(params, root, role)
    _warn_unwatched(params, root, role)
    keep_idx = check_listing(params, role, domain)
    size, channels = params.preprocess.image_size, params.preprocess.channels
    with outputs.atomic_dir(out, "ingest", key) as tmp:
        writer = store.ImageWriter(tmp, (channels, size, size))
        try:
            dec = decode(domain, keep_idx, size, channels, writer, f"ingest {role}")
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        index = np.array(dec.index, dtype=np.int64)
        labels = domain.labels[index]
        try:
            split = _check_decoded(dec, domain, index, labels, params, role)
        except DataError as exc:  # what was quarantined is listed even though nothing is stored
            failed = _failed_report(params, root, role, dec, domain, exc)
            _log_items(role, "quarantined", dec.quarantined, failed)
            _log_items(role, "label conflict", dec.conflict_log, failed)
            raise DataError(f"{exc} (every file left out, with its reason: {failed})") from None
        labeled = np.zeros(len(labels), dtype=bool)
        if role == "target" and params.target.k > 0:
            labeled = k_shot(labels, split == "train", params.target.k, dec.content, seed=params.seed)
        meta = pd.DataFrame({
            "source_index": index,
            "item": [domain.refs[i] for i in dec.index],
            "label": labels,
            "class_name": [domain.classes[c] for c in labels],
            "split": split.astype(str),
            "labeled": labeled,
            "sha1": dec.sha1,
            "content": dec.content,
        })
        counts = {s: {c: int(((split == s) & (labels == i)).sum()) for i, c in enumerate(domain.classes)} for s in sorted(set(split.tolist()))}
        writer.sha256.update(labels.astype(np.int64).tobytes())
        card = {
            "role": role,
            "domain": spec.domain,
            "classes": domain.classes,
            "class_order": "natural sort of the class names (folder names / manifest labels); built-ins 0–9",
            "image_size": size,
            "channels": channels,
            "n_found": len(domain),
            "n_selected": int(len(keep_idx)),
            "n_images": int(len(labels)),
            "splits_given": domain.splits is not None,
            "counts": counts,
            "counts_per_class": per_class(labels, domain.classes),
            "native": _native_card(dec),
            "quarantined": dec.quarantined,
            "ignored": domain.ignored,
            "duplicates": {
                "removed": len(dec.duplicates),
                "conflicting_class": sum("conflicting_class" in d for d in dec.duplicates),
                "label_conflicts": dec.conflicts,  # the first copies, excluded with the others
                "across_given_splits": sum("given_splits" in d for d in dec.duplicates),
                "items": dec.duplicates,
            },
            "duplicates_removed": len(dec.duplicates),
            "labeled_per_class": params.target.k if role == "target" else None,
            "unlabeled_pool": int(((meta.split == "train") & ~meta.labeled).sum()) if role == "target" else None,
            "data_hash": writer.sha256.hexdigest()[:16],
            "raw_fingerprint": domain.fingerprint,
            "domain_info": domain.info,
        }
        store.write_tables(tmp, meta, card)
    report = write_report(params, root, role, card)
    _failed_path(report).unlink(missing_ok=True)  # an earlier failure's list no longer applies
    _log_items(role, "quarantined", dec.quarantined, report)
    _log_items(role, "ignored", domain.ignored, report)
    _log_items(role, "label conflict", dec.conflict_log, report)
    log.info("ingest %s: %d images of %s → %s (%s; report %s)", role, len(labels), spec.domain, out,
             ", ".join(f"{n} {what}" for what, n in dropped(card).items()), report)
    return {"role": role, "path": str(out), "digest": outputs.digest(out), "cached": False, "n_images": card["n_images"],
            "quarantined": len(dec.quarantined), "duplicates_removed": len(dec.duplicates), "report": str(report)}
