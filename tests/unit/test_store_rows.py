"""Lazy rows of the ingested store: the same images as the in-memory split, read a batch at a time, and
pages released without losing data."""

from __future__ import annotations

import numpy as np

from adaptflow.data.store import Rows, drop_pages


def _store(tmp_path, n=50):
    arr = np.lib.format.open_memmap(tmp_path / "images.npy", mode="w+", dtype=np.uint8, shape=(n, 1, 4, 4))
    arr[:] = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
    arr.flush()
    return np.load(tmp_path / "images.npy", mmap_mode="r")


def test_rows_index_like_the_array(tmp_path):
    mm = _store(tmp_path)
    idx = np.array([3, 7, 8, 20, 41, 42])
    rows, want = Rows(mm, idx), np.asarray(mm[idx])
    assert len(rows) == 6 and rows.shape == (6, 1, 4, 4) and rows.dtype == np.uint8
    assert np.array_equal(rows[1:4], want[1:4])
    assert np.array_equal(rows[np.array([0, 5])], want[[0, 5]])
    assert np.array_equal(rows[2], want[2])
    sub = rows[np.array([True, False, True, False, False, True])]
    assert isinstance(sub, Rows) and np.array_equal(np.asarray(sub), want[[0, 2, 5]])
    assert np.array_equal(np.asarray(rows), want)


def test_drop_pages_keeps_written_data(tmp_path):
    out = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float32, shape=(1000, 8))
    out[:500] = 1.5
    drop_pages(out)  # flushed, then released
    out[500:] = 2.5
    drop_pages(out)
    drop_pages(Rows(_store(tmp_path), np.arange(10)))  # read-only maps too
    drop_pages(np.zeros(3))  # an in-memory array: nothing to do
    del out
    back = np.load(tmp_path / "f.npy")
    assert (back[:500] == 1.5).all() and (back[500:] == 2.5).all()
