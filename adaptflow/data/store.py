"""The ingested store: what training streams from.

One directory per role: ``images.npy`` (uint8, N×C×H×W, memory-mapped on read), ``meta.parquet``
(one row per image: label, class, split, labeled flag, content hash) and ``card.json`` (the dataset card).
:class:`ImageWriter` writes ``images.npy`` one image at a time, so ingest's memory stays flat in N.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

IMAGES = "images.npy"
META = "meta.parquet"
CARD = "card.json"


RELEASE_BYTES = 64 << 20  # a Rows lets go of the store pages it has mapped after about this many bytes
FAULT_AROUND = 64 << 10  # a page fault on a file mapping maps up to this much around it (Linux: fault_around_bytes)


class Rows:
    """Rows ``idx`` of a memory-mapped uint8 store, read on demand a batch at a time: nothing is held. After
    about :data:`RELEASE_BYTES` of the store mapped by its reads it lets go of those pages (:func:`drop_pages`;
    they stay in the page cache), so that passes over a split larger than memory keep the process's memory
    flat in N. Mapped, not read: each fault maps up to :data:`FAULT_AROUND` around it, so a shuffled batch
    of small images maps far more than its own bytes (measured: 12,800 random 1 kB rows of a 194 MB store
    left all 194 MB resident). Indexable by slices, integer arrays and boolean masks like the array it
    stands for."""

    def __init__(self, mm: np.ndarray, idx: np.ndarray):
        self.mm, self.idx = mm, np.asarray(idx, dtype=np.int64)
        self._read = 0  # bytes mapped (at most) since the pages were last let go

    def __len__(self) -> int:
        return len(self.idx)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.idx),) + tuple(self.mm.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.mm.dtype

    def __getitem__(self, key: object) -> np.ndarray:
        sel = self.idx[key]
        if isinstance(key, np.ndarray) and key.dtype == bool or (isinstance(key, slice) and key.step not in (None, 1)):
            return Rows(self.mm, sel)  # a subset stays lazy
        return self._read_rows(sel if np.ndim(sel) else int(sel))

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        out = self._read_rows(self.idx)
        return out.astype(dtype) if dtype is not None else out

    def _read_rows(self, sel: np.ndarray | int) -> np.ndarray:
        out = np.asarray(self.mm[sel])
        row_bytes = int(np.prod(self.mm.shape[1:])) * self.mm.dtype.itemsize
        windows = np.unique(np.atleast_1d(sel) * row_bytes // FAULT_AROUND)  # where each row starts
        # an upper bound on what the reads mapped, which cannot exceed the store: a smaller store stays mapped
        self._read = min(self._read + len(windows) * FAULT_AROUND + out.nbytes, self.mm.nbytes)
        if self._read >= RELEASE_BYTES:
            self._read = 0
            drop_pages(self.mm)
        return out


def subset(images: np.ndarray | Rows, rows: slice) -> np.ndarray | Rows:
    """``images[rows]`` without reading it: a :class:`Rows` stays lazy (its plain slices are reads), an array
    (or memory map) gives a view."""
    return type(images)(images.mm, images.idx[rows]) if isinstance(images, Rows) else images[rows]


def concat(parts: list[np.ndarray | Rows]) -> np.ndarray | Rows:
    """The images of several splits one after the other: still lazy when every part is :class:`Rows` of the
    same store (e.g. the labeled set and the pool of target train), else read into one array."""
    if parts and all(isinstance(p, Rows) and p.mm is parts[0].mm for p in parts):
        return Rows(parts[0].mm, np.concatenate([p.idx for p in parts]))
    return np.concatenate([np.asarray(p) for p in parts])


def drop_pages(arr: object) -> None:
    """Let go of the pages a memory-mapped array (or :class:`Rows`) has touched so far: file-backed pages
    otherwise count in the process's RSS until the kernel needs them. Data is safe: a written map is
    flushed first; the page cache keeps what was read."""
    mm = arr.mm if isinstance(arr, Rows) else arr
    handle = getattr(mm, "_mmap", None)
    if handle is None or not hasattr(handle, "madvise"):
        return
    if getattr(mm, "mode", "r") != "r":
        mm.flush()
    handle.madvise(mmap.MADV_DONTNEED)


@dataclass
class Split:
    """Images and labels of one split (in memory, or :class:`Rows` read from the store on demand)."""

    images: np.ndarray | Rows  # uint8 N×C×H×W
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
        self._dropped: set[int] = set()

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

    def drop(self, positions: list[int]) -> None:
        """Leave out the images appended at ``positions`` (0-based, in append order) when :meth:`finish` writes."""
        self._dropped.update(int(p) for p in positions)

    def finish(self) -> Path:
        self._flush()
        self._file.close()
        path = self.directory / self.name
        count = self.count - len(self._dropped)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": (count, *self.shape)}
        with open(path, "wb") as out, open(self._staging, "rb") as staged:
            np.lib.format.write_array_header_1_0(out, header)
            if not self._dropped:
                shutil.copyfileobj(staged, out, 1 << 22)
            else:  # stream the kept images, and hash what is kept
                self.sha256 = hashlib.sha256()
                size = int(np.prod(self.shape))
                for pos in range(self.count):
                    image = staged.read(size)
                    if pos not in self._dropped:
                        self.sha256.update(image)
                        out.write(image)
        self.count = count
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


def read_meta(directory: Path, columns: list[str] | None = None) -> pd.DataFrame:
    return pd.read_parquet(Path(directory) / META, columns=columns)


def split_hash(directory: Path, split: str, by: str = "sha1") -> str:
    """Which images, with which labels, a split holds: a hash over its (image hash, label) pairs, in no
    particular order. Two stores agree on it exactly when their ``split`` sets are the same images. ``by``:
    ``sha1``, the stored pixels (which ``preprocess`` changes), or ``content``, the decoded pixels (which
    place an image in a split: the same test images at another image size or channel count agree)."""
    meta = read_meta(directory, ["split", by, "label"])
    rows = meta[meta["split"] == split]
    lines = sorted(f"{h}:{int(y)}" for h, y in zip(rows[by], rows["label"]))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def load_split(directory: Path, split: str, labeled: bool | None = None, lazy: bool = True) -> Split:
    """Rows of ``split`` (train/val/test); ``labeled`` filters target train into the k-shot set or the pool.
    Read from the store on demand by default (:class:`Rows`: a split of any size, memory flat in N; the
    page cache keeps what training revisits each epoch); ``lazy=False`` reads them into memory."""
    directory = Path(directory)
    meta = read_meta(directory, ["split", "labeled", "label"])  # not the per-image hashes and names: memory
    rows = meta["split"] == split
    if labeled is not None:
        rows &= meta["labeled"] == labeled
    idx = np.flatnonzero(rows.to_numpy())
    images = np.load(directory / IMAGES, mmap_mode="r")
    rows_ = Rows(images, idx) if lazy else np.asarray(images[idx])
    return Split(rows_, meta["label"].to_numpy()[idx].astype(np.int64), read_card(directory)["classes"])
