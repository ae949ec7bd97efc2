"""cache_features: run the frozen source backbone once over every target split.

Features are keyed by the source weights' digest, the target data's digest and the preprocessing; a
re-run with the same three does no work. Heads (``linear_probe``) then train on these arrays instead of
pushing images through the backbone every epoch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from adaptflow import outputs
from adaptflow.data import store
from adaptflow.imaging import normalize
from adaptflow.models import features, load
from adaptflow.params import Params
from adaptflow.stages.ingest import output_dir as ingested_dir
from adaptflow.stages.pretrain import output_dir as source_model_dir
from adaptflow.training import device

log = logging.getLogger(__name__)

# name → (split, labeled filter)
SPLITS = {"labeled": ("train", True), "pool": ("train", False), "val": ("val", None), "test": ("test", None)}


def output_dir(params: Params, root: Path) -> Path:
    return Path(root) / params.paths.features


def load_features(d: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of one cached split (labeled, pool, val, test)."""
    outputs.digest(d)  # refuses an incomplete output
    return np.load(d / f"{name}.npy"), np.load(d / f"{name}_labels.npy")


@torch.no_grad()
def extract(model: torch.nn.Module, images: np.ndarray, batch_size: int, dev: torch.device) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch_size):
        x = normalize(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(dev))
        out.append(features(model, x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.num_features), np.float32)


def run(params: Params, root: Path = Path(".")) -> dict:
    out = output_dir(params, root)
    tgt, src_model = ingested_dir(params, root, "target"), source_model_dir(params, root)
    # batch_size changes no feature value, so it is not part of the key.
    key = outputs.input_key("cache_features", params.section_hash("preprocess"), [src_model, tgt])
    if outputs.is_current(out, key):
        log.info("cache_features: up to date (%s)", out)
        return {"path": str(out), "digest": outputs.digest(out), "cached": True}
    dev = device()
    model, _ = load(src_model, dev)
    counts = {}
    with outputs.atomic_dir(out, "cache_features", key) as tmp:
        for name, (split, labeled) in SPLITS.items():
            s = store.load_split(tgt, split, labeled)
            np.save(tmp / f"{name}.npy", extract(model, s.images, params.cache_features.batch_size, dev))
            np.save(tmp / f"{name}_labels.npy", s.labels)
            counts[name] = len(s)
    log.info("cache_features: %s → %s", counts, out)
    return {"path": str(out), "digest": outputs.digest(out), "cached": False, "counts": counts}
