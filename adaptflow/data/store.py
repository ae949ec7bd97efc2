"""The ingested store: what training streams from.

One directory per role: ``images.npy`` (uint8, N×C×H×W, memory-mapped on read), ``meta.parquet``
(one row per image: label, class, split, labeled flag, content hash) and ``card.json`` (the dataset card).
:class:`ImageWriter` writes ``images.npy`` one image at a time, so ingest's memory stays flat in N.
"""

from __future__ import annotations

import hashlib
import json
import shutil
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


class ImageWriter:
    """Append uint8 C×H×W images one by one; :meth:`finish` writes ``images.npy`` without holding them all.

    The count is only known at the end (bad files and duplicates are dropped on the way), and the ``.npy``
    header states the shape, so images go to a headerless staging file in batches of plain writes (no
    memory map, whose touched pages would count against the process) and are then streamed behind the
    header. The SHA-256 of the image bytes is accumulated on the way for the data hash.
    """

    def __init__(self, directory: Path, shape: tuple[int, int, int], batch: int = 1024, name: str = IMAGES) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shape = tuple(shape)
        self.name = name
        self.count = 0
        self.sha256 = hashlib.sha256()
        self._staging = self.directory / (name + ".staging")
        self._file = open(self._staging, "wb")
        self._buf = np.empty((batch, *self.shape), dtype=np.uint8)
        self._n = 0

    def append(self, image: np.ndarray) -> None:
        if image.shape != self.shape or image.dtype != np.uint8:
            raise ValueError(f"expected uint8 {self.shape}, got {image.dtype} {image.shape}")
        self._buf[self._n] = image
        self._n += 1
        self.count += 1
        if self._n == len(self._buf):
            self._flush()

    def _flush(self) -> None:
        data = self._buf[: self._n].tobytes()
        self.sha256.update(data)
        self._file.write(data)
        self._n = 0

    def finish(self) -> Path:
        self._flush()
        self._file.close()
        path = self.directory / self.name
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": (self.count, *self.shape)}
        with open(path, "wb") as out, open(self._staging, "rb") as staged:
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(staged, out, 1 << 22)
        self._staging.unlink()
        return path

    def abort(self) -> None:
        self._file.close()
        self._staging.unlink(missing_ok=True)


def write_tables(directory: Path, meta: pd.DataFrame, card: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    meta.to_parquet(directory / META, index=False)
    (directory / CARD).write_text(json.dumps(card, indent=2, sort_keys=True))


def write(directory: Path, images: np.ndarray, meta: pd.DataFrame, card: dict) -> None:
    """Write a whole store from arrays in memory (small stores, tests); ingest streams with ImageWriter."""
    writer = ImageWriter(directory, images.shape[1:])
    for im in np.ascontiguousarray(images, dtype=np.uint8):
        writer.append(im)
    writer.finish()
    write_tables(directory, meta, card)


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
