"""The ingested store: what training streams from.

One directory per role: ``images.npy`` (uint8, N×C×H×W, memory-mapped on read), ``meta.parquet``
(one row per image: label, class, split, labeled flag, content hash) and ``card.json`` (the dataset card).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

IMAGES = "images.npy"
META = "meta.parquet"
CARD = "card.json"


@dataclass
class Split:
    """Images and labels of one split (a view on the memory-mapped store)."""

    images: np.ndarray  # uint8 N×C×H×W
    labels: np.ndarray  # int64
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def write(directory: Path, images: np.ndarray, meta: pd.DataFrame, card: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / IMAGES, np.ascontiguousarray(images, dtype=np.uint8))
    meta.to_parquet(directory / META, index=False)
    (directory / CARD).write_text(json.dumps(card, indent=2, sort_keys=True))


def read_card(directory: Path) -> dict:
    return json.loads((Path(directory) / CARD).read_text())


def read_meta(directory: Path) -> pd.DataFrame:
    return pd.read_parquet(Path(directory) / META)


def load_split(directory: Path, split: str, labeled: bool | None = None) -> Split:
    """Rows of ``split`` (train/val/test); ``labeled`` filters target train into the k-shot set or the pool."""
    directory = Path(directory)
    meta = read_meta(directory)
    rows = meta["split"] == split
    if labeled is not None:
        rows &= meta["labeled"] == labeled
    idx = np.flatnonzero(rows.to_numpy())
    images = np.load(directory / IMAGES, mmap_mode="r")
    return Split(np.asarray(images[idx]), meta["label"].to_numpy()[idx].astype(np.int64), read_card(directory)["classes"])
