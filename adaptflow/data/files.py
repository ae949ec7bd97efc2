"""Domains a user brings as files: an ImageFolder tree or a CSV manifest, and the verdict on each file.

Both are *scanned* (paths and labels, no decoding) when the domain is opened, so labels are known before any
image is read and a structural problem — a missing path, an empty folder, a manifest without a ``label``
column, a path escaping its folder — fails at once with a message that names the fix. Bad *files* are a
different matter: one truncated PNG must not stop a 100,000-image ingest, so :func:`open_image` turns every
way a file can fail to decode into a :class:`BadItem` with a reason a person can act on, and ingest
quarantines it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from adaptflow import imaging

SPLIT_NAMES = ("train", "val", "test")
MANIFEST_COLUMNS = ("path", "label")


class DataError(ValueError):
    """A problem with a domain as a whole (not one file): reported before any work, naming the fix."""


class BadItem(Exception):
    """One image that cannot be used; ``str()`` is the reason recorded in the ingest report."""


# What operating systems leave in image folders: not images, so named as what they are rather than quarantined
SYSTEM_FILES = {"thumbs.db": "Windows thumbnail cache", "ehthumbs.db": "Windows thumbnail cache", "desktop.ini": "Windows folder settings"}
BAD_NAME = "its name is not valid UTF-8 (not read; rename it)"
BAD_FOLDER_NAME = "the folder's name is not valid UTF-8 (not read; rename it)"


def undecodable(name: str) -> bool:
    """Whether a name the OS handed over holds bytes that are not UTF-8 (Python keeps them as surrogates): a
    name from an old archive or a Windows share, which no table, report or model input can carry as text."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def shown(path: object) -> str:
    r"""A path as one line of text: bytes that are not UTF-8 as ``\xNN``, and tab, newline and carriage return
    escaped, so a message or a tab-separated line stays whole."""
    text = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.translate({9: "\\t", 10: "\\n", 13: "\\r"})


def natural_key(name: str) -> tuple:
    """Sort key that orders "2" before "10": class order is this, stable and recorded in the card."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)


@dataclass
class FileListing:
    """What a scan found: files (relative to ``root``) with their class names, and what it skipped."""

    root: Path
    files: list[str]
    class_names: list[str]
    splits: list[str] | None = None
    ignored: list[dict] = field(default_factory=list)  # {"item", "reason"}: seen, deliberately not read

    def fingerprint(self, extra: bytes = b"") -> str:
        """Cheap identity of the files' current state (path, size, mtime): a change re-runs ingest."""
        h = hashlib.sha256(extra)
        for rel in self.files:
            name = os.fsencode(rel)  # the name's bytes as the OS has them, UTF-8 or not
            try:
                st = os.stat(self.root / rel)
                h.update(name + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(name + b"\0missing\n")
        return h.hexdigest()[:16]


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def walk(folder: Path, skip_hidden_folders: bool = False) -> Iterator[tuple[Path, str | None]]:
    """Every file below ``folder``, at any depth (sorted within each folder), with why it is not an image to
    read, or None: a hidden file, or one in a hidden folder; a system file (``Thumbs.db``); a name that is not
    UTF-8 (:data:`BAD_NAME`). A symlinked folder comes with its reason too, and is not followed (no cycles); so
    does a folder whose name is not UTF-8, and a hidden folder with ``skip_hidden_folders`` (``.git``,
    ``.venv``: named once, not file by file). What ingest takes from a class folder, and predict from a folder."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for sub in list(dirnames):
            if os.path.islink(os.path.join(dirpath, sub)):
                yield Path(dirpath, sub), "symlinked folder (not followed)"
            elif undecodable(sub):
                dirnames.remove(sub)
                yield Path(dirpath, sub), BAD_FOLDER_NAME
            elif skip_hidden_folders and sub.startswith("."):
                dirnames.remove(sub)
                yield Path(dirpath, sub), "hidden folder (not read)"
        for fname in sorted(filenames):
            path = Path(dirpath, fname)
            system = SYSTEM_FILES.get(fname.lower())
            yield path, ("hidden file" if _hidden(path.relative_to(folder)) else BAD_NAME if undecodable(fname)
                         else f"{system} (not an image)" if system else None)


def scan_imagefolder(root: Path, key: str) -> FileListing:
    """One subfolder per class (its name is the class); every file below it, at any depth, is an item.

    Hidden files and folders (``.DS_Store``, editor droppings), at any level, and files directly in ``root``
    are not items: they are listed under ``ignored`` so nothing disappears unexplained.
    """
    if not root.exists():
        raise DataError(f"{key}: imagefolder path {root} does not exist; fix the path (relative paths are resolved against the project root)")
    if not root.is_dir():
        raise DataError(f"{key}: imagefolder path {root} is a file, not a folder; point imagefolder: at a folder with one subfolder per class (use csv: for a manifest)")
    files, names, ignored = [], [], []
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and not undecodable(d.name)),
                        key=lambda d: natural_key(d.name))
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            ignored.append({"item": shown(entry.name), "reason": "hidden folder (not a class)" if entry.is_dir() else "hidden file"})
        elif undecodable(entry.name) and entry.is_dir():
            ignored.append({"item": shown(entry.name), "reason": "the folder's name is not valid UTF-8 (not a class; rename it)"})
        elif not entry.is_dir():
            ignored.append({"item": shown(entry.name), "reason": "not inside a class folder"})
    if not class_dirs:
        raise DataError(f"{key}: imagefolder {root} has no class subfolders; put each class's images in a subfolder named after the class (e.g. {root}/3/img.png)")
    empty = []
    for d in class_dirs:
        found = 0
        for path, why in walk(d):
            rel = path.relative_to(root)
            if why:
                ignored.append({"item": shown(rel), "reason": why})
                continue
            files.append(str(rel))
            names.append(d.name)
            found += 1
        if not found:
            empty.append(d.name)
    if empty:
        raise DataError(f"{key}: imagefolder {root}: class folder(s) {empty} hold no files; add images or remove the folder(s)")
    return FileListing(root, files, names, None, ignored)


def read_manifest(path: Path, key: str, allowed_splits: tuple[str, ...] = SPLIT_NAMES) -> FileListing:
    """A CSV with ``path,label`` (optional ``split``); paths relative to the CSV's folder, never outside it."""
    import pandas as pd

    if not path.exists():
        raise DataError(f"{key}: csv manifest {path} does not exist; fix the path (relative paths are resolved against the project root)")
    if path.is_dir():
        raise DataError(f"{key}: csv: expects a manifest file, but {path} is a folder; use imagefolder:{path} for a folder of class subfolders")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{key}: csv manifest {path} is not a readable CSV ({exc}); it needs a header row `path,label` (optional `split`)") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{key}: csv manifest {path} lacks column(s) {missing} (found {list(df.columns)}); it needs a header row `path,label` (optional `split`)")
    if df.empty:
        raise DataError(f"{key}: csv manifest {path} has no rows; list one image per row as `path,label`")
    rows = lambda mask: ", ".join(str(i + 2) for i in df.index[mask][:5]) + (" …" if mask.sum() > 5 else "")  # noqa: E731 (line 1 is the header)
    for col in MANIFEST_COLUMNS:
        blank = df[col].str.strip() == ""
        if blank.any():
            raise DataError(f"{key}: csv manifest {path}: empty `{col}` on line(s) {rows(blank)}; give every row a {col}")
    folder = os.path.normpath(path.parent.resolve())
    rel = []
    for p in df["path"].str.strip():
        if "\\" in p and os.sep == "/" and not os.path.lexists(os.path.join(folder, p)):
            p = p.replace("\\", "/")  # written on Windows (3\a.png): a name holding a backslash is rarer than that
        full = os.path.normpath(os.path.join(folder, p))  # lexical: a symlink inside the folder is the user's choice
        rel.append(os.path.relpath(full, folder) if full.startswith(folder + os.sep) else None)
    escaping = pd.Series([r is None for r in rel], index=df.index)
    if escaping.any():
        raise DataError(f"{key}: csv manifest {path}: path(s) on line(s) {rows(escaping)} point outside its folder {folder} (e.g. {df['path'][escaping].iloc[0]!r}); "
                        "move the images under the CSV's folder and use relative paths")
    splits = None
    if "split" in df.columns:
        s = df["split"].str.strip().str.lower()
        bad = ~s.isin(allowed_splits)
        if bad.any():
            values = list(dict.fromkeys(df["split"][bad]))
            said = ", ".join(map(repr, values[:5])) + (f" and {len(values) - 5} more" if len(values) > 5 else "")
            raise DataError(f"{key}: csv manifest {path}: split value(s) {said} on line(s) {rows(bad)} not one of {list(allowed_splits)}; "
                            "fix them, or drop the `split` column to let ingest split by target/source fractions")
        splits = s.tolist()
    return FileListing(Path(folder), rel, df["label"].str.strip().tolist(), splits, [])


def describe(im: Image.Image) -> dict:
    """Native facts about one decoded file, aggregated into the dataset card."""
    return {"h": im.height, "w": im.width, "mode": im.mode, "format": im.format or "in-memory"}


def open_image(path: Path) -> Image.Image:
    """Decode a file fully, or raise :class:`BadItem` saying why not (:func:`imaging.unreadable`).

    Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) is enforced as a refusal, not a
    warning: a file that claims a huge canvas is quarantined before its pixels are allocated.
    """
    try:
        return imaging.decode(Path(path))  # refused above Pillow's limit, from the header
    except Exception as exc:  # every decoder failure is this file's problem, never the run's
        raise BadItem(imaging.unreadable(exc)) from None
