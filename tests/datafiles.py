"""Tiny on-disk domains for the data tests: real UCI digits as image files, and the broken files we plant."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

MODES = ("L", "RGB", "RGBA", "P")
FORMATS = (("png", "PNG"), ("jpg", "JPEG"), ("bmp", "BMP"), ("gif", "GIF"), ("tif", "TIFF"))


def digits(per_class: int, classes: int = 10, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` UCI digits of each of the first ``classes`` classes, from the ``start``-th of each class on,
    uint8 8×8 (0–255)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.concatenate([np.flatnonzero(d.target == c)[start : start + per_class] for c in range(classes)])
    return np.clip(np.rint(d.images[idx] * 255 / 16), 0, 255).astype(np.uint8), d.target[idx]


def save_image(arr: np.ndarray, path: Path, i: int = 0, mixed: bool = True) -> Path:
    """Save one 8×8 digit; with ``mixed`` the mode, size and format rotate with ``i`` (what users really have)."""
    im = Image.fromarray(arr)
    if mixed:
        im = im.resize((8 + 4 * (i % 3), 8 + 4 * (i % 3)), Image.NEAREST).convert(MODES[i % len(MODES)])
        ext, fmt = FORMATS[i % len(FORMATS)]
        if fmt == "JPEG":
            im = im.convert("RGB")  # JPEG holds no alpha or palette
    else:
        ext, fmt = "png", "PNG"
    path = path.with_suffix(f".{ext}")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def make_imagefolder(folder: Path, per_class: int = 12, classes: int = 10, mixed: bool = True, start: int = 0) -> Path:
    """UCI digits as image files; ``start`` picks other digits (a source that shares no image with a target)."""
    images, labels = digits(per_class, classes, start)
    for i, (im, y) in enumerate(zip(images, labels)):
        save_image(im, folder / str(y) / f"img{i:04d}", i, mixed)
    return folder


def plant_broken(folder: Path, cls: str = "3") -> dict[str, str]:
    """A truncated PNG, an empty file and a text file in class ``cls``: file name → expected reason."""
    good = next(p for p in sorted((folder / cls).iterdir()) if p.suffix == ".png")
    data = good.read_bytes()
    (folder / cls / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / cls / "empty.png").write_bytes(b"")
    (folder / cls / "notes.txt").write_text("not an image\n")
    return {f"{cls}/truncated.png": "truncated image", f"{cls}/empty.png": "empty file (0 bytes)", f"{cls}/notes.txt": "not an image Pillow can read"}


def make_manifest(folder: Path, per_class: int = 12, classes: int = 10, splits: bool = False, name: str = "manifest.csv") -> Path:
    """Images under ``folder/img`` and a CSV manifest beside them (paths relative to the CSV)."""
    images, labels = digits(per_class, classes)
    rows = []
    for i, (im, y) in enumerate(zip(images, labels)):
        p = save_image(im, folder / "img" / f"{i:04d}", i, mixed=False)
        row = {"path": str(p.relative_to(folder)), "label": f"digit_{y}"}
        if splits:
            row["split"] = ["train", "train", "train", "train", "val", "test"][i % 6]
        rows.append(row)
    csv_path = folder / name
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return csv_path
