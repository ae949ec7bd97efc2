"""The ingest stage: bad files quarantined and reported, duplicates dropped before splitting, problems with a
domain failing before any work with the fix in the message, a streamed store that equals the in-memory one."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from adaptflow import outputs
from adaptflow import params as P
from adaptflow.data import domains, store
from adaptflow.data.domains import DataError, Domain
from adaptflow.data.splits import min_class_size
from adaptflow.stages import ingest
from tests.datafiles import make_imagefolder, make_manifest, plant_broken


def params(target: str = "uci_digits", source: str = "uci_digits", **over) -> P.Params:
    data = {"preprocess": {"image_size": 8, "channels": 1},
            "source": {"domain": source, "synth": {"n": 60, "size": 12}},
            "target": {"domain": target, "k": 2}}
    for dotted, value in over.items():
        section, key = dotted.split("__")
        data.setdefault(section, {})[key] = value
    return P.from_dict(data)


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_imagefolder(tmp_path / "digits", per_class=10, classes=4)


def _meta_card(root: Path, role: str = "target"):
    d = root / "data" / "ingested" / role
    return store.read_meta(d), store.read_card(d), d


# --- bad files: quarantined, reported, logged; the run goes on ---------------------------------------------


def test_broken_files_are_quarantined_listed_and_logged(tmp_path, folder, monkeypatch, caplog):
    expected = plant_broken(folder)
    (folder / "2" / "dangling.png").symlink_to(folder / "2" / "never-there.png")
    Image.new("L", (64, 64), 9).save(folder / "1" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # the real digits (≤ 16×16) pass; 64×64 is refused
    expected |= {"2/dangling.png": "unreadable: No such file or directory", "1/bomb.png": "decompression bomb refused"}

    with caplog.at_level(logging.WARNING, logger="adaptflow.stages.ingest"):
        result = ingest.run(params(f"imagefolder:{folder}"), tmp_path, "target")
    assert result["quarantined"] == 5 and result["n_images"] == 40
    report = json.loads((tmp_path / "reports" / "ingest_target.json").read_text())
    got = {q["item"]: q["reason"] for q in report["quarantined"]}
    assert set(got) == set(expected)
    for item, why in expected.items():
        assert got[item].startswith(why), (item, got[item])
        assert any(item in r.getMessage() and "quarantined" in r.getMessage() for r in caplog.records), item
    meta, card, _ = _meta_card(tmp_path)
    assert card["quarantined"] == report["quarantined"] and card["n_found"] == 45 and card["n_images"] == 40
    assert not set(expected) & set(meta["item"])
    assert card["native"]["formats"].keys() >= {"PNG", "JPEG", "BMP", "GIF", "TIFF"}
    assert {"L", "RGB"} <= set(card["native"]["modes"])


def test_all_files_broken_fails_naming_the_reasons(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "f" / c).mkdir(parents=True)
        for i in range(8):
            (tmp_path / "f" / c / f"{i}.txt").write_text("x")
    with pytest.raises(DataError, match=r"^target\.domain: no usable images .*16 quarantined.*not an image Pillow can read"):
        ingest.run(params("imagefolder:f"), tmp_path, "target")


def test_cache_follows_the_files_and_restores_the_report(tmp_path, folder):
    p = params(f"imagefolder:{folder}")
    assert not ingest.run(p, tmp_path, "target")["cached"]
    report = tmp_path / "reports" / "ingest_target.json"
    report.unlink()
    assert ingest.run(p, tmp_path, "target")["cached"] and report.is_file()
    (folder / "0" / "notes.txt").write_text("new junk")  # a changed folder is a changed input
    again = ingest.run(p, tmp_path, "target")
    assert not again["cached"] and again["quarantined"] == 1


def test_a_current_builtin_output_is_reused_without_loading_the_dataset(tmp_path, monkeypatch):
    p = params()
    first = ingest.run(p, tmp_path, "target")
    monkeypatch.setattr("sklearn.datasets.load_digits", lambda *a, **k: pytest.fail("the dataset was loaded"))
    again = ingest.run(p, tmp_path, "target")
    assert again["cached"] and again["digest"] == first["digest"]


# --- splits: keyed by content, so new data moves no image already split ---------------------------------------


def test_new_images_move_no_image_already_split(tmp_path):
    folder = make_imagefolder(tmp_path / "digits", per_class=30, classes=4)
    held = tmp_path / "later"
    for c in range(4):  # a third of each class arrives later
        for f in sorted((folder / str(c)).iterdir())[20:]:
            (held / str(c)).mkdir(parents=True, exist_ok=True)
            f.rename(held / str(c) / f.name)
    p = params(f"imagefolder:{folder}", target__val_fraction=0.25, target__test_fraction=0.25)
    ingest.run(p, tmp_path, "target")
    before, _, _ = _meta_card(tmp_path)
    for f in held.rglob("*.*"):
        f.rename(folder / f.parent.name / f.name)
    first = folder / before.item[0]
    first.rename(first.with_name("renamed" + first.suffix))  # a renamed file is the same image
    assert not ingest.run(p, tmp_path, "target")["cached"]
    after, card, _ = _meta_card(tmp_path)
    assert card["n_images"] == 120 and len(before) == 80
    old = after.set_index("sha1").loc[before.sha1]
    assert (old.split.to_numpy() == before.split.to_numpy()).all()  # what was test stays test
    assert set(after.split[~after.sha1.isin(before.sha1)]) == {"train", "val", "test"}  # the new images join every split
    was, now = before.labeled.to_numpy(), old.labeled.to_numpy()
    assert not (now & ~was).any()  # no old image gains a label; a new one may take one (the k per class stay k)
    assert (was & ~now).sum() == (after.labeled & ~after.sha1.isin(before.sha1)).sum() < was.sum()


def test_limited_subset_takes_new_images_only_in_place_of_old_ones(tmp_path):
    """With ``limit`` set, arriving data changes the kept images only by new ones replacing old ones."""
    folder = make_imagefolder(tmp_path / "digits", per_class=30, classes=4)
    held = tmp_path / "later"
    for c in range(4):
        for f in sorted((folder / str(c)).iterdir())[20:]:
            (held / str(c)).mkdir(parents=True, exist_ok=True)
            f.rename(held / str(c) / f.name)
    p = params(f"imagefolder:{folder}", target__limit=48, target__val_fraction=0.25, target__test_fraction=0.25)
    ingest.run(p, tmp_path, "target")
    before = set(_meta_card(tmp_path)[0].item)
    late = {f"{f.parent.name}/{f.name}" for f in held.rglob("*.*")}
    for f in held.rglob("*.*"):
        f.rename(folder / f.parent.name / f.name)
    assert not ingest.run(p, tmp_path, "target")["cached"]
    after = set(_meta_card(tmp_path)[0].item)
    assert len(before) == len(after) == 48
    assert after - before <= late  # no old image left out before is kept now
    assert 0 < len(before - after) == len(after - before)  # each old image dropped made room for a new one


# --- duplicates: removed before splitting, counted, never straddling a split --------------------------------


def test_a_class_emptied_by_label_conflicts_names_its_copies_and_the_fix(tmp_path, folder, caplog):
    """Class '7' holds only copies of class-0 images (a mislabeled export): the error says to fix the labels,
    and the failed report lists every copy, as a successful ingest's card would."""
    files = sorted((folder / "0").iterdir())[:7]
    (folder / "7").mkdir()
    for i, f in enumerate(files):
        shutil.copy(f, folder / "7" / f"copy{i}{f.suffix}")
    with pytest.raises(DataError) as exc:
        ingest.run(params(f"imagefolder:{folder}"), tmp_path, "target")
    assert "'7': 0 (7 excluded for a label conflict)" in str(exc.value)
    assert "Give each conflicting image one label (the copies are listed with the label conflicts)" in str(exc.value)
    failed = json.loads((tmp_path / "reports" / "ingest_target.failed.json").read_text())
    copies = [f"7/copy{i}{f.suffix}" for i, f in enumerate(files)]
    assert sorted(c["item"] for c in failed["label_conflicts"] if c["item"].startswith("7/")) == copies
    assert {d["item"] for d in failed["duplicates"]} == set(copies)
    assert f"{copies[0]}: labeled '7', and copies of the same image are labeled '0'" in caplog.text


def test_duplicates_removed_counted_and_never_straddle(tmp_path, folder, caplog):
    pngs = sorted((folder / "0").glob("*.png"))
    shutil.copy(pngs[0], folder / "0" / "z_copy_same_class.png")
    shutil.copy(pngs[0], folder / "1" / "z_copy_other_class.png")
    with caplog.at_level(logging.INFO, logger="adaptflow"):
        ingest.run(params(f"imagefolder:{folder}"), tmp_path, "target")
    # the summary counts the three copies as one thing, not as one duplicate and two conflicts
    [summary] = [r.getMessage() for r in caplog.records if "exact duplicates removed" in r.getMessage()]
    assert "0 exact duplicates removed, 3 copies excluded for a label conflict" in summary, summary
    # copies whose labels disagree: no label can be trusted, so every copy is excluded, and said out loud
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "label conflict" in r.getMessage()]
    assert len(warned) == 3 and all("every copy is excluded; fix the labels to use it" in w for w in warned)
    assert f"0/{pngs[0].name}: labeled '0', and copies of the same image are labeled '1'" in warned[0]
    assert "0/z_copy_same_class.png: labeled '0', and copies of the same image are labeled '1'" in warned[1]  # the same label as the first
    assert "1/z_copy_other_class.png: labeled '1', and copies of the same image are labeled '0'" in warned[2]
    meta, card, _ = _meta_card(tmp_path)
    assert card["duplicates"]["removed"] == card["duplicates_removed"] == 2
    assert card["duplicates"]["conflicting_class"] == 2
    assert card["duplicates"]["items"] == [
        {"item": "0/z_copy_same_class.png", "duplicate_of": "0/" + pngs[0].name, "class": "0", "conflicting_class": "1"},
        {"item": "1/z_copy_other_class.png", "duplicate_of": "0/" + pngs[0].name, "class": "1", "conflicting_class": "0"}]
    [first] = card["duplicates"]["label_conflicts"]
    assert (first["item"], first["class"], first["other_classes"]) == ("0/" + pngs[0].name, "0", ["1"])
    assert f"0/{pngs[0].name}" not in set(meta.item) and len(meta) == card["n_images"] == 4 * 10 - 1
    assert len(np.load(tmp_path / "data/ingested/target" / store.IMAGES, mmap_mode="r")) == len(meta)
    assert meta.sha1.is_unique
    by_split = meta.groupby("split").sha1.apply(set)
    assert all(not (by_split[a] & by_split[b]) for a in by_split.index for b in by_split.index if a < b)


def _array_domain(images: np.ndarray, labels: np.ndarray) -> Domain:
    return Domain("test", ["a", "b", "c"], labels, [str(i) for i in range(len(labels))], images.__getitem__, "fp")


@given(data=st.data(), n=st.integers(1, 40))
@settings(max_examples=25)
def test_decode_accounts_for_every_item_and_keeps_unique_bytes(data, n):
    pool = np.random.default_rng(0).integers(0, 256, (6, 4, 4), dtype=np.uint8)  # few distinct images: many duplicates
    images = pool[data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))]
    labels = np.array(data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)), dtype=np.int64)
    with tempfile.TemporaryDirectory() as d:
        writer = store.ImageWriter(Path(d), (1, 4, 4))
        dec = ingest.decode(_array_domain(images, labels), np.arange(n), 4, 1, writer)
        writer.finish()
        stored = np.load(Path(d) / store.IMAGES)
    assert len(dec.index) + len(dec.duplicates) + len(dec.quarantined) + len(dec.conflicts) == n
    assert len(set(dec.sha1)) == len(dec.sha1) == len(stored)
    assert [im.tobytes() for im in stored] == [images[i][None].tobytes() for i in dec.index]
    kept, excluded = {str(i) for i in dec.index}, {c["item"] for c in dec.conflicts}
    for dup in dec.duplicates:  # every dropped copy points at a kept (or excluded) image with the same bytes
        assert dup["duplicate_of"] in kept | excluded and images[int(dup["item"])].tobytes() == images[int(dup["duplicate_of"])].tobytes()
    labels_of: dict[bytes, set[int]] = {}
    for i in range(n):
        labels_of.setdefault(images[i].tobytes(), set()).add(int(labels[i]))
    # an image is stored exactly when all its copies agree on the label; excluded exactly when they do not
    assert {images[int(i)].tobytes() for i in kept} == {b for b, ls in labels_of.items() if len(ls) == 1}
    assert {images[int(i)].tobytes() for i in excluded} == {b for b, ls in labels_of.items() if len(ls) > 1}


# --- files decoded on several threads: the same store as one at a time -------------------------------------


def test_files_decoded_on_threads_give_the_serial_store_and_quarantine(tmp_path, monkeypatch):
    folder = make_imagefolder(tmp_path / "digits", per_class=10, classes=4)
    plant_broken(folder)
    pngs = sorted((folder / "0").glob("*.png"))
    shutil.copy(pngs[0], folder / "0" / "z_copy.png")
    shutil.copy(pngs[1], folder / "1" / "z_conflict.png")
    Image.new("L", (40, 40), 9).save(folder / "1" / "bomb.png")  # 1,600 pixels: between Pillow's limit and twice it,
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # where Pillow itself only warns
    seen: set[str] = set()
    opener = domains.open_image

    def open_image(path):
        seen.add(threading.current_thread().name)
        return opener(path)

    monkeypatch.setattr(domains, "open_image", open_image)
    monkeypatch.setattr(ingest, "TRIAL", 8)  # 8 files one at a time, 8 on the threads, the rest the faster way
    got = {}
    for threads in ("1", "4"):
        monkeypatch.setenv("ADAPTFLOW_THREADS", threads)
        root = tmp_path / f"t{threads}"
        ingest.run(params(f"imagefolder:{folder}"), root, "target")
        meta, card, d = _meta_card(root)
        got[threads] = (meta, card, np.load(d / store.IMAGES).tobytes())
    assert any(name.startswith("ingest") for name in seen) and len(seen) > 2  # the main thread, then several others
    (meta1, card1, images1), (meta4, card4, images4) = got["1"], got["4"]
    assert images1 == images4 and card1 == card4
    pd.testing.assert_frame_equal(meta1, meta4)
    assert {q["item"]: q["reason"] for q in card4["quarantined"]}["1/bomb.png"].startswith("decompression bomb refused: Image size (1600 pixels)")
    assert card4["duplicates"]["removed"] == 2 and len(card4["duplicates"]["label_conflicts"]) == 1


def test_in_order_keeps_the_order_bounds_the_work_ahead_and_stops_on_close(monkeypatch):
    monkeypatch.setattr(ingest, "TRIAL", 5)
    monkeypatch.setattr(ingest, "MARGIN", float("inf"))  # after the trial, on the threads whatever it measured
    started, consumed, lock = [], [0], threading.Lock()
    delays = np.random.default_rng(0).uniform(0, 0.004, 60)

    def fn(i):
        with lock:
            started.append(i)
            assert len(started) - consumed[0] <= 3 * 2 + 1  # (fn runs before its result is consumed)
        time.sleep(delays[i])
        return i * i

    out = []
    for r in ingest.in_order(fn, list(range(60)), threads=3, ahead=2):
        out.append(r)
        consumed[0] += 1
    assert out == [i * i for i in range(60)]
    started.clear()
    consumed[0] = 0
    delays[30:] = 0.05  # from item 30 on, slow: when it is closed, 3 items run and 3 wait in the queue
    gen = ingest.in_order(fn, list(range(60)), threads=3, ahead=2)
    for i in range(30):  # past the trial (5 + 5 items)
        assert next(gen) == i * i
        consumed[0] += 1
    time.sleep(0.02)  # (the threads take up items 30-32)
    gen.close()  # cancels what has not started and waits for what has
    n = len(started)
    time.sleep(0.2)
    assert len(started) == n and 30 <= n <= 30 + 3  # at most the 3 running finished; the 3 waiting never started


def test_decode_threads_one_per_core_up_to_a_cap_for_files_only(monkeypatch):
    files = Domain("f", ["a"], np.zeros(1, np.int64), ["x"], lambda i: None, "fp", threaded=True)
    arrays = Domain("a", ["a"], np.zeros(1, np.int64), ["x"], lambda i: None, "fp")
    monkeypatch.delenv("ADAPTFLOW_THREADS", raising=False)
    for cores, want in ((2, 2), (64, ingest.MAX_THREADS)):
        monkeypatch.setattr(ingest.machine, "cores", lambda: cores)
        assert ingest.decode_threads(files) == want and ingest.decode_threads(arrays) == 1
    monkeypatch.setenv("ADAPTFLOW_THREADS", "12")
    assert ingest.decode_threads(files) == 12 and ingest.decode_threads(arrays) == 1


def test_running_out_of_memory_while_decoding_is_raised_not_quarantined():
    def load(i):
        raise MemoryError("no room")

    domain = Domain("f", ["a", "b"], np.array([0, 1]), ["x", "y"], load, "fp", threaded=True)
    with tempfile.TemporaryDirectory() as d, pytest.raises(MemoryError):
        ingest.decode(domain, np.arange(2), 4, 1, store.ImageWriter(Path(d), (1, 4, 4)))


@pytest.mark.parametrize("slow_on", ["threads", "main"])
def test_in_order_goes_on_the_faster_way(monkeypatch, slow_on):
    """Timed on the trial items: the rest run on the threads only where that was faster."""
    monkeypatch.setattr(ingest, "TRIAL", 10)
    where = []

    def fn(i):
        on_main = threading.current_thread() is threading.main_thread()
        time.sleep(0.02 if on_main == (slow_on == "main") else 0.0005)
        where.append((i, on_main))
        return i

    assert list(ingest.in_order(fn, list(range(40)), threads=4)) == list(range(40))
    ran = dict(where)
    assert all(ran[i] for i in range(10)) and not any(ran[i] for i in range(10, 20))
    assert all(not ran[i] if slow_on == "main" else ran[i] for i in range(20, 40))


# --- problems with the domain: one clear message, before any work ------------------------------------------


def test_class_too_small_for_the_splits(tmp_path, folder):
    for p in sorted((folder / "2").iterdir())[3:]:
        p.unlink()
    with pytest.raises(DataError) as exc:
        ingest.run(params(f"imagefolder:{folder}"), tmp_path, "target")
    msg = str(exc.value)
    need = min_class_size({"val": 0.1, "test": 0.3}, train_min=2)
    kept = ", ".join(f"2/{p.name}" for p in sorted((folder / "2").iterdir()))  # a class this small: its files, to find a typo
    assert msg.startswith(f"target.domain: class(es) with too few images listed (before any is decoded) — '2': 3 ({kept}).")
    assert f"at least {need} (target.k=2 labeled train images, at least one image in every split at val_fraction=0.1, test_fraction=0.3)" in msg
    assert "Add images to those classes, lower target.k, or remove the classes." in msg
    assert not (tmp_path / "data" / "ingested" / "target").exists()


def test_classes_left_short_by_limit_name_the_limit_first(tmp_path, folder):
    with pytest.raises(DataError) as exc:
        ingest.run(params(f"imagefolder:{folder}", target__limit=12), tmp_path, "target")
    assert "Raise or remove target.limit=12 (before it, '0', '1', '2', '3' had enough), add images to those classes" in str(exc.value)
    assert "'0': 3;" in str(exc.value)  # cut by the limit: no files named
    for p in sorted((folder / "2").iterdir())[3:]:  # a class short with or without the limit: the limit is not blamed
        p.unlink()
    with pytest.raises(DataError) as exc:
        ingest.run(params(f"imagefolder:{folder}", target__limit=36), tmp_path, "target")
    assert "'2': 3 (2/" in str(exc.value) and "limit" not in str(exc.value)


def test_class_emptied_by_quarantine_counts_what_was_lost(tmp_path, folder, caplog):
    broken = sorted((folder / "2").iterdir())[4:]
    for p in broken:
        p.write_bytes(b"")
    with pytest.raises(DataError, match=r"'2': 4 \(6 quarantined\).*every file left out, with its reason: .*ingest_target\.failed\.json"):
        ingest.run(params(f"imagefolder:{folder}"), tmp_path, "target")
    # nothing is stored, but every quarantined file is listed with its reason: in a report and on the console
    failed = json.loads((tmp_path / "reports" / "ingest_target.failed.json").read_text())
    assert sorted(Path(q["item"]).name for q in failed["quarantined"]) == sorted(p.name for p in broken)
    assert all(q["reason"] for q in failed["quarantined"]) and "too few usable images" in failed["error"]
    assert all(p.name in caplog.text for p in broken)
    assert not (tmp_path / "reports" / "ingest_target.json").exists()
    # once the data is fixed, a successful ingest drops the stale list
    make_imagefolder(folder, per_class=10, classes=4)  # as the fixture wrote it
    ingest.run(params(f"imagefolder:{folder}"), tmp_path, "target")
    assert (tmp_path / "reports" / "ingest_target.json").is_file()
    assert not (tmp_path / "reports" / "ingest_target.failed.json").exists()
    # other data fails, and the data before is asked for again: its store is current, the other's list goes
    other = tmp_path / "other"
    for c in ("a", "b"):
        (other / c).mkdir(parents=True)
        for i in range(12):
            (other / c / f"{i}.png").write_bytes(b"")
    with pytest.raises(DataError):
        ingest.run(params(f"imagefolder:{other}"), tmp_path, "target")
    assert (tmp_path / "reports" / "ingest_target.failed.json").exists()
    assert ingest.run(params(f"imagefolder:{folder}"), tmp_path, "target")["cached"]
    assert not (tmp_path / "reports" / "ingest_target.failed.json").exists()


def test_k_larger_than_a_class_allows(tmp_path, folder):
    with pytest.raises(DataError, match=r"target\.k=9 labeled train images"):
        ingest.run(params(f"imagefolder:{folder}", target__k=9), tmp_path, "target")


def test_source_needs_train_and_val_per_class(tmp_path):
    make_imagefolder(tmp_path / "s", per_class=1, classes=3, mixed=False)
    with pytest.raises(DataError, match=r"^source\.domain: class\(es\) with too few images listed \(before any is decoded\) .* at least 6 \(at least one image in every split at val_fraction=0\.1\)"):
        ingest.run(params(source="imagefolder:s"), tmp_path, "source")


def test_single_class_is_refused(tmp_path):
    make_imagefolder(tmp_path / "one", per_class=10, classes=1, mixed=False)
    with pytest.raises(DataError, match=r"has 1 class\(es\) \['0'\]; a classifier needs at least two"):
        ingest.run(params("imagefolder:one"), tmp_path, "target")


def test_missing_path_in_the_other_role_fails_fast(tmp_path):
    with pytest.raises(DataError, match=r"^target\.domain: imagefolder path .*nowhere does not exist"):
        ingest.run(params("imagefolder:nowhere"), tmp_path, "source")


# --- manifests ----------------------------------------------------------------------------------------------


def test_csv_given_splits_are_kept(tmp_path):
    m = make_manifest(tmp_path / "m", per_class=12, classes=3, splits=True)
    ingest.run(params(f"csv:{m}"), tmp_path, "target")
    meta, card, _ = _meta_card(tmp_path)
    assert card["splits_given"] and card["classes"] == ["digit_0", "digit_1", "digit_2"]
    expected = {f"img/{i:04d}.png": ["train", "train", "train", "train", "val", "test"][i % 6] for i in range(36)}
    assert dict(zip(meta["item"], meta["split"])) == expected
    assert meta[meta.labeled].groupby("class_name").size().to_dict() == {"digit_0": 2, "digit_1": 2, "digit_2": 2}
    assert not meta[meta.labeled].split.ne("train").any()


def test_csv_given_splits_that_leave_a_class_out_of_test_are_kept_and_said(tmp_path, caplog):
    m = make_manifest(tmp_path / "m", per_class=12, classes=3, splits=True)
    rows = m.read_text().splitlines()
    rows = [r.replace(",test", ",train") if ",digit_2," in r else r for r in rows]  # class 2 has no test row now
    m.write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="adaptflow.stages.ingest"):
        ingest.run(params(f"csv:{m}"), tmp_path, "target")
    meta, _, _ = _meta_card(tmp_path)
    assert not ((meta.class_name == "digit_2") & (meta.split == "test")).any()
    warned = [r.getMessage() for r in caplog.records if "split column gives class(es)" in r.getMessage()]
    assert warned == ["ingest target: the manifest's split column gives class(es) ['digit_2'] no test images: their test "
                      "accuracy cannot be measured, and the comparison and the registry gate go without them"]


def test_csv_given_splits_too_few_train(tmp_path):
    m = make_manifest(tmp_path / "m", per_class=12, classes=3, splits=True)
    with pytest.raises(DataError, match=r"split column leaves class\(es\) with fewer than 9 train images"):
        ingest.run(params(f"csv:{m}", target__k=9), tmp_path, "target")


# --- the store --------------------------------------------------------------------------------------------


def test_streamed_store_matches_the_in_memory_definition(tmp_path):
    ingest.run(params(target="uci_digits", target__limit=200), tmp_path, "target")
    meta, card, d = _meta_card(tmp_path)
    images = np.load(d / store.IMAGES)
    assert images.shape == (card["n_images"], 1, 8, 8) and images.dtype == np.uint8
    labels = meta.label.to_numpy().astype(np.int64)
    assert card["data_hash"] == hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]
    assert [hashlib.sha1(im.tobytes()).hexdigest() for im in images] == list(meta.sha1)
    assert card["counts_per_class"] == {str(c): int((labels == c).sum()) for c in range(10)}
    assert sum(sum(v.values()) for v in card["counts"].values()) == card["n_images"]
    assert outputs.read_manifest(d) is not None and not list(d.glob("*.staging"))


def test_synth_ingest_is_deterministic(tmp_path):
    a = ingest.run(params(source="synth_digits"), tmp_path / "a", "source")
    b = ingest.run(params(source="synth_digits"), tmp_path / "b", "source")
    c = ingest.run(params(source="synth_digits", source__synth={"n": 60, "size": 12, "seed": 1}), tmp_path / "c", "source")
    card = lambda r: store.read_card(Path(r["path"]))  # noqa: E731
    assert card(a)["data_hash"] == card(b)["data_hash"] != card(c)["data_hash"]
    assert card(a)["counts_per_class"] == {str(d): 6 for d in range(10)}
    assert card(a)["domain_info"]["synth"]["fonts"]


def test_image_writer_rejects_wrong_shape(tmp_path):
    w = store.ImageWriter(tmp_path, (1, 4, 4))
    with pytest.raises(ValueError, match="expected uint8"):
        w.append(np.zeros((1, 5, 5), np.uint8))
    w.abort()
    assert not list(tmp_path.iterdir())


def test_image_writer_drops_what_it_is_told_and_hashes_what_it_keeps(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 1, 4, 4), dtype=np.uint8)
    plain = store.ImageWriter(tmp_path / "plain", (1, 4, 4), batch=3)
    for i in (0, 2, 3, 6):
        plain.append(images[i])
    plain.finish()
    dropping = store.ImageWriter(tmp_path / "dropping", (1, 4, 4), batch=3)
    for im in images:
        dropping.append(im)
    dropping.drop([1, 4, 5])
    dropping.finish()
    assert np.array_equal(np.load(tmp_path / "dropping" / store.IMAGES), images[[0, 2, 3, 6]])
    assert dropping.count == 4 and dropping.sha256.hexdigest() == plain.sha256.hexdigest()
    assert sorted(p.name for p in (tmp_path / "dropping").iterdir()) == [store.IMAGES]


def test_the_pre_check_refuses_source_only_when_the_source_knows_no_target_class(tmp_path):
    """What `adaptflow run` and every flow run check before any stage (augment's own check is skipped when
    Prefect reuses it): from the listings, nothing decoded."""
    folder = make_imagefolder(tmp_path / "letters", per_class=10, classes=2, mixed=False)
    for digit, name in (("0", "zero"), ("1", "one")):
        (folder / digit).rename(folder / name)
    p = params(f"imagefolder:{folder}")
    with pytest.raises(DataError, match=r"source_only: the source knows none of the target classes \['one', 'zero'\]"):
        ingest.check_inputs(P.from_dict({**p.to_dict(), "finetune": {"strategies": ["scratch", "source_only"]}}), tmp_path)
    no_source_only = {"evaluate": {"baselines": ["scratch"]}, "register": {"require_baselines": False}}
    ingest.check_inputs(P.from_dict({**p.to_dict(), "finetune": {"strategies": ["scratch", "finetune"]}, **no_source_only}), tmp_path)
    # an objective aligning source and target trains on source images by target class, and source_val chooses
    # on them: with no class shared there are none (an alignment step once waited forever for a batch)
    for finetune, says in (({"strategies": ["scratch", "finetune", "dann+fixmatch", "coral"]}, "dann+fixmatch, coral"),
                           ({"strategies": ["scratch", "finetune"], "selection": "source_val"}, "finetune.selection: source_val")):
        with pytest.raises(DataError, match=rf"^{re.escape(says)}: the source knows none of the target classes"):
            ingest.check_inputs(P.from_dict({**p.to_dict(), "finetune": finetune, **no_source_only}), tmp_path)
    assert not (tmp_path / "data").exists()
