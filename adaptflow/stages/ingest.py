"""ingest: decode a domain once, dedupe, split, and store it as uint8 for training to stream from.

Source gets train/val; target gets train/val/test plus the k-shot labeled subset of train (the rest of
train is the unlabeled pool). Splits are stratified and seeded; exact duplicates (same preprocessed bytes)
are dropped before splitting, so no image can sit on both sides of a split.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from adaptflow import outputs
from adaptflow.data import store
from adaptflow.data.domains import load_domain
from adaptflow.data.splits import k_shot, stratified_split, stratified_subset
from adaptflow.imaging import prepare
from adaptflow.params import ROLES, Params

log = logging.getLogger(__name__)


def output_dir(params: Params, root: Path, role: str) -> Path:
    return Path(root) / params.paths.ingested / role


def run(params: Params, root: Path = Path("."), role: str = "target") -> dict:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    out = output_dir(params, root, role)
    key = outputs.input_key(f"ingest:{role}", params.section_hash(role, "preprocess", "seed"))
    if outputs.is_current(out, key):
        log.info("ingest %s: up to date (%s)", role, out)
        return {"role": role, "path": str(out), "digest": outputs.digest(out), "cached": True}

    spec = getattr(params, role)
    raw = load_domain(spec.domain)
    size, channels = params.preprocess.image_size, params.preprocess.channels
    keep_idx = stratified_subset(raw.labels, spec.limit, seed=params.seed)
    images = np.empty((len(keep_idx), channels, size, size), dtype=np.uint8)
    for i, j in enumerate(keep_idx):
        images[i] = prepare(raw.images[j], size, channels)
    labels = raw.labels[keep_idx]
    hashes = np.array([hashlib.sha1(im.tobytes()).hexdigest() for im in images])
    keep = ~pd.Series(hashes).duplicated().to_numpy()
    images, labels, hashes, source_index = images[keep], labels[keep], hashes[keep], keep_idx[keep]

    fractions = {"val": spec.val_fraction}
    if role == "target":
        fractions["test"] = params.target.test_fraction
    split = stratified_split(labels, fractions, seed=params.seed)
    labeled = np.zeros(len(labels), dtype=bool)
    if role == "target":
        labeled = k_shot(labels, split == "train", params.target.k, seed=params.seed)
    meta = pd.DataFrame(
        {"source_index": source_index, "label": labels, "class_name": [raw.classes[i] for i in labels], "split": split.astype(str), "labeled": labeled, "sha1": hashes}
    )
    card = {
        "role": role,
        "domain": spec.domain,
        "classes": raw.classes,
        "image_size": size,
        "channels": channels,
        "n_images": int(len(labels)),
        "duplicates_removed": int((~keep).sum()),
        "quarantined": raw.quarantined,
        "counts": {
            s: {c: int(n) for c, n in meta[meta.split == s].class_name.value_counts().sort_index().items()}
            for s in sorted(meta.split.unique())
        },
        "labeled_per_class": params.target.k if role == "target" else None,
        "unlabeled_pool": int(((meta.split == "train") & ~meta.labeled).sum()) if role == "target" else None,
        "data_hash": hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16],
    }
    with outputs.atomic_dir(out, "ingest", key) as tmp:
        store.write(tmp, images, meta, card)
    log.info("ingest %s: %d images of %s → %s (%d duplicates removed)", role, len(labels), spec.domain, out, card["duplicates_removed"])
    return {"role": role, "path": str(out), "digest": outputs.digest(out), "cached": False, "n_images": card["n_images"]}
