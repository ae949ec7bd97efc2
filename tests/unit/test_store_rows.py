"""Lazy rows of the ingested store: the same images as the in-memory split, read a batch at a time, and
pages released without losing data."""

from __future__ import annotations

import sys

import numpy as np
import pytest

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


def _resident_kb(path) -> int:
    """Resident size (kB) of this process's mappings of ``path`` (Linux /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        first = line.split(None, 1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and first == "Rss:":
            total += int(line.split()[1])
    return total


def _one_pass(path, monkeypatch, release: int, batches) -> int:
    """Read ``batches`` (row indices) through :class:`Rows` with pages let go every ``release`` bytes; the kB of
    the store then resident in this process."""
    from adaptflow.data import store

    monkeypatch.setattr(store, "RELEASE_BYTES", release)
    mm = np.load(path, mmap_mode="r")
    rows = Rows(mm, np.arange(len(mm)))
    for idx in batches:
        assert (rows[idx] == 7).all()
    kb = _resident_kb(path)
    del rows, mm
    return kb


def _store_of_sevens(tmp_path, n: int):
    arr = np.lib.format.open_memmap(tmp_path / "images.npy", mode="w+", dtype=np.uint8, shape=(n, 1, 32, 32))  # 1 kB each
    arr[:] = 7
    arr.flush()
    del arr
    return tmp_path / "images.npy"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_sequential_pass_keeps_resident_memory_bounded(tmp_path, monkeypatch):
    """A pass in order over a 4 MB store leaves at most about one release of its pages resident; without
    releases every page read stays (the same pass, the same file)."""
    path = _store_of_sevens(tmp_path, 4096)
    in_order = [slice(i, i + 128) for i in range(0, 4096, 128)]
    assert _one_pass(path, monkeypatch, 1 << 40, in_order) >= 3500  # nothing let go: the whole file
    assert _one_pass(path, monkeypatch, 256 << 10, in_order) <= 600


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_shuffled_batches_keep_resident_memory_bounded(tmp_path, monkeypatch):
    """Training's shuffled batches of small images: each read maps far more than its bytes (the kernel maps
    around every fault), and the release counts that, not just the bytes read."""
    path = _store_of_sevens(tmp_path, 32768)  # 32 MB
    rng = np.random.default_rng(0)
    shuffled = [np.sort(rng.choice(32768, 16, replace=False)) for _ in range(200)]  # 3,200 rows: 3 MB read
    assert _one_pass(path, monkeypatch, 1 << 40, shuffled) >= 16 << 10  # mapped: most of the file
    assert _one_pass(path, monkeypatch, 1 << 20, shuffled) <= 4 << 10  # let go every ~1 MB mapped


def test_concat_stays_lazy_over_one_store(tmp_path):
    from adaptflow.data.store import concat

    mm = _store(tmp_path)
    a, b = Rows(mm, np.array([1, 2, 3])), Rows(mm, np.array([10, 11]))
    both = concat([a, b])
    assert isinstance(both, Rows) and np.array_equal(np.asarray(both), np.asarray(mm[[1, 2, 3, 10, 11]]))
    mixed = concat([a, np.asarray(mm[[40]])])  # not all rows of one store: read into one array
    assert isinstance(mixed, np.ndarray) and np.array_equal(mixed, np.asarray(mm[[1, 2, 3, 40]]))


def test_a_store_smaller_than_the_release_stays_mapped(tmp_path, monkeypatch):
    """Pass after pass over a store smaller than RELEASE_BYTES: nothing to bound, so nothing is let go and
    faulted in again (the estimate of what reads mapped is capped at the store's size)."""
    from adaptflow.data import store

    released = []
    monkeypatch.setattr(store, "drop_pages", lambda arr: released.append(arr))
    path = _store_of_sevens(tmp_path, 4096)  # 4 MB
    rng = np.random.default_rng(0)
    shuffled = [np.sort(rng.choice(4096, 128, replace=False)) for _ in range(320)]  # ten passes' worth
    _one_pass(path, monkeypatch, 8 << 20, shuffled)
    assert released == []
    _one_pass(path, monkeypatch, 2 << 20, shuffled)  # a release below the store's size: let go now and then
    assert len(released) > 100


def test_split_hash_names_the_images_and_labels_of_a_split(tmp_path):
    import pandas as pd

    from adaptflow.data import store

    def write(d, sha1, labels, splits):
        n = len(sha1)
        store.write(tmp_path / d, np.zeros((n, 1, 2, 2), np.uint8), pd.DataFrame({"sha1": sha1, "label": labels, "split": splits}), {})
        return tmp_path / d

    a = write("a", ["h1", "h2", "h3", "h4"], [0, 1, 0, 1], ["test", "test", "val", "train"])
    b = write("b", ["h4", "h2", "h1", "h5"], [1, 1, 0, 0], ["train", "test", "test", "train"])  # same test set, other rows and order
    c = write("c", ["h1", "h2"], [0, 0], ["test", "test"])  # same images, a label differs
    d = write("d", ["h1", "h2", "h3"], [0, 1, 0], ["test", "test", "test"])  # one image more
    assert store.split_hash(a, "test") == store.split_hash(b, "test")
    assert len({store.split_hash(x, "test") for x in (a, c, d)}) == 3
    assert store.split_hash(a, "val") != store.split_hash(a, "test")


def test_split_hash_by_content_is_the_same_test_set_at_another_image_size(tmp_path):
    """The champion's test set, by decoded content: another preprocess (other stored pixels) is the same set."""
    import pandas as pd

    from adaptflow.data import store

    def write(d, sha1):
        meta = pd.DataFrame({"sha1": sha1, "content": ["c1", "c2", "c3"], "label": [0, 1, 0], "split": ["test", "test", "val"]})
        store.write(tmp_path / d, np.zeros((3, 1, 2, 2), np.uint8), meta, {})
        return tmp_path / d

    small, large = write("28px", ["s1", "s2", "s3"]), write("32px", ["l1", "l2", "l3"])
    assert store.split_hash(small, "test") != store.split_hash(large, "test")
    assert store.split_hash(small, "test", by="content") == store.split_hash(large, "test", by="content")
