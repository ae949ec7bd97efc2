"""Image preprocessing shared by ingest and by the registered model.

This module imports only numpy and Pillow on purpose: it is shipped inside every registered MLflow model
(``code_paths``) so a consumer preprocesses a raw image exactly as ingest did, without adaptflow installed.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


NO_PATHS = "this model reads no file paths when served; send base64-encoded image bytes"


def to_uint8(img: np.ndarray, sixteen_bit: bool = False) -> np.ndarray:
    """Bring an array to uint8 0–255. By its type first: uint8 as is; 16-bit unsigned (16-bit PNG/TIFF) by
    the fixed factor 255/65535, so every 16-bit image is scaled alike and agrees with its 8-bit version;
    booleans to 0/255. Other integers in 0–255 as is (``sixteen_bit``: as 16-bit, e.g. Pillow's 32-bit "I"
    images of 16-bit files), in 0–65535 as 16-bit. Floats in [0, 1] scaled by 255, in (16, 255] as is; any
    other range min–max scaled (per image). An empty array, or floats that are not all finite (NaN, ±inf),
    are no image: ValueError, not a picture made up from what is left."""
    arr = np.asarray(img)
    if not arr.size:
        raise ValueError(f"an empty image (shape {arr.shape})")
    if arr.dtype == object:  # e.g. JSON numbers with a null among them
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"pixel values that are not all numbers in an image of shape {arr.shape}") from None
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        raise ValueError(f"pixel values that are not finite numbers (NaN or ±inf) in a {arr.dtype} image of shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype.kind in "ui":
        lo, hi = int(arr.min()), int(arr.max())
        sixteen = (arr.dtype.kind == "u" and arr.dtype.itemsize == 2) or (sixteen_bit and 0 <= lo and hi <= 65535)
        if not sixteen and 0 <= lo and hi <= 255:
            return arr.astype(np.uint8)
        if sixteen or (0 <= lo and hi <= 65535):
            return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # rounded to the nearest
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        arr = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0 and hi > 16.0:
        pass
    else:
        arr = (arr - min(lo, 0.0)) / max(hi - min(lo, 0.0), 1e-12) * 255.0
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def to_pil(img: Any, read_paths: bool = True) -> Image.Image:
    """Accept a PIL image, a path, encoded bytes, a base64 string or an array (H×W, H×W×C).

    With ``read_paths=False`` (a served model: the caller is a remote client) a string is base64 only and
    no file is touched, so a client can neither read a server file nor learn whether a path exists: the
    error is the same for every string that is not a base64-encoded image."""
    if isinstance(img, Image.Image):
        return img
    if isinstance(img, (bytes, bytearray, memoryview)):
        return decode(io.BytesIO(bytes(img)))
    if isinstance(img, Path) and not read_paths:
        raise ValueError(f"{NO_PATHS}: got a path")
    if isinstance(img, Path) or (read_paths and isinstance(img, str) and _is_file(img)):
        return decode(Path(img))
    if isinstance(img, str):
        try:
            raw = base64.b64decode(img, validate=True)
        except ValueError:
            what = "not an existing path nor base64 image bytes" if read_paths else f"not base64 image bytes ({NO_PATHS})"
            raise ValueError(f"{what}: {img[:60]!r}") from None
        try:
            return decode(io.BytesIO(raw))
        except (ValueError, OSError) as exc:  # what it says depends on the string alone, never on the server's files
            what = "not an existing path, and base64 of no readable image" if read_paths else "base64 of no readable image"
            raise ValueError(f"{what} ({_why(exc)}): {img[:60]!r}") from None
    if np.ndim(img) == 0 and not isinstance(img, (str, bytes)):  # a DataFrame cell that holds no image
        import pandas as pd

        raise ValueError("a missing value (None/NaN), not an image" if pd.isna(img) else f"a number ({img!r}), not an image")
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # C×H×W → H×W×C
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"expected an H×W or H×W×C image with 1, 3 or 4 channels, got shape {arr.shape}")
    return Image.fromarray(to_uint8(arr))


def readable(files: list[Any]) -> tuple[list[Any], list[tuple[Any, str]]]:
    """The files that decode as images (as ingest and the served model decode them), and the others, each
    with the reason."""
    good, bad = [], []
    for f in files:
        try:
            im = to_pil(f)
            for channels in (1, 3):  # whatever the model takes
                _to_mode(im, channels)
            good.append(f)
        except UNREADABLE as exc:
            bad.append((f, unreadable(exc)))
    return good, bad


UNREADABLE = (OSError, ValueError, TypeError, Image.DecompressionBombError)  # TypeError: an array Pillow has no mode for


class EmptyFile(ValueError):
    """A file of 0 bytes (an upload cut off, a placeholder): said as such, not as a decoder's complaint."""


def unreadable(exc: BaseException) -> str:
    """Why an image could not be used, in words a person can act on: as ingest's quarantine, ``adaptflow
    predict``, the served model and the incoming folder say it."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, EmptyFile):
        return "empty file (0 bytes)"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression bomb refused: {text}"  # the text holds the size and the limit
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read"
    if "truncated" in text.lower():
        return f"truncated image: {text}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"unreadable: {exc.strerror or text}"
    return f"not a readable image ({_why(exc)})"


def _is_file(s: str) -> bool:
    try:
        return Path(s).is_file()
    except (OSError, ValueError):  # too long for a path, or a NUL byte: not a path
        return False


def decode(src: Any, max_pixels: int | None = None) -> Image.Image:
    """Decode, turned upright as its EXIF orientation says (a phone photo is stored sideways, with a tag).
    ``max_pixels`` (default: Pillow's ``Image.MAX_IMAGE_PIXELS`` now): refuse a larger canvas
    (``DecompressionBombError``) from its header, before its pixels are allocated — ingest, ``predict`` and the
    served model alike. Pillow itself only warns below twice its limit, and a warnings filter is no guard where
    several threads decode (filters are process-wide). A file of 0 bytes is :class:`EmptyFile`."""
    if isinstance(src, (str, Path)) and Path(src).stat().st_size == 0:
        raise EmptyFile(f"{src}: empty file (0 bytes)")
    im = Image.open(src)
    max_pixels = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if max_pixels is not None and im.width * im.height > max_pixels:
        im.close()
        raise Image.DecompressionBombError(f"Image size ({im.width * im.height} pixels) exceeds limit of {max_pixels} "
                                           "pixels, could be decompression bomb DOS attack.")
    im.load()
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception:  # noqa: BLE001 — unreadable EXIF: the pixels are still the image, as stored
        pass
    return im


def _opaque(im: Image.Image) -> Image.Image:
    """``im`` without transparency: its visible pixels over a plain background, white behind dark content
    and black behind light (by the alpha-weighted mean luminance), so neither a dark stroke nor a light one
    on a transparent background vanishes into it. An image without transparency is returned as it is, and
    one whose alpha is 0 everywhere is taken as its colours (a writer that leaves alpha unset)."""
    if not (im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info):
        return im
    rgba = im.convert("RGBA")
    lo, hi = rgba.getchannel("A").getextrema()
    if lo == 255 or hi == 0:  # opaque; or alpha left at 0 everywhere (some TGA/BMP writers): the colours are the image
        return rgba.convert("RGB")
    small = rgba.copy()
    small.thumbnail((128, 128))  # enough to tell dark content from light, at any image size
    arr = np.asarray(small, dtype=np.float32)
    alpha = arr[..., 3] / 255.0
    lum = arr[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    seen = float(alpha.sum())
    dark = seen == 0.0 or float((lum * alpha).sum()) / seen < 128.0  # (0 only when the thumbnail lost every visible pixel)
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if dark else (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _tiff_bits(im: Image.Image) -> tuple[int, ...]:
    """A TIFF's bits per sample (tag 258), or () for any other file."""
    tags = getattr(im, "tag_v2", None)
    try:
        bits = tags.get(258) if tags is not None else None
        return tuple(int(b) for b in (bits if isinstance(bits, (tuple, list)) else [bits])) if bits is not None else ()
    except (TypeError, ValueError):
        return ()


def _to_mode(im: Image.Image, channels: int) -> Image.Image:
    """``im`` as 8-bit grey (1 channel) or RGB (3)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # "I": what Pillow opens 16-bit PGM/PPM (and older Pillows PNG) as
        # ... and a TIFF of 32-bit integers, which says so: its values keep to_uint8's ranges (0–255 as is)
        wide = im.mode == "I" and max(_tiff_bits(im), default=0) > 16
        im = Image.fromarray(to_uint8(np.asarray(im), sixteen_bit=im.mode != "F" and not wide))
    im = _opaque(im)
    mode = "L" if channels == 1 else "RGB"
    try:
        return im.convert(mode)
    except ValueError:  # a mode Pillow converts to RGB only (LAB)
        return im.convert("RGB").convert(mode)


def prepare(img: Any, size: int, channels: int, read_paths: bool = True) -> np.ndarray:
    """Decode and bring one image to the model's stored form: uint8 (channels, size, size)."""
    im = _to_mode(to_pil(img, read_paths), channels)
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if channels == 1 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def prepare_batch(images: Any, size: int, channels: int, read_paths: bool = True) -> np.ndarray:
    """:func:`prepare` for each image; one that cannot be used raises ``ValueError`` naming its position."""
    out = np.empty((len(images), channels, size, size), np.uint8)
    for n, im in enumerate(images):
        try:
            out[n] = prepare(im, size, channels, read_paths)
        except ValueError as exc:
            raise ValueError(f"image {n}: {exc}") from exc
        except UNREADABLE as exc:
            raise ValueError(f"image {n}: {unreadable(exc)}") from exc
    return out


def _why(exc: BaseException) -> str:
    """An exception as ``Type: message``, without the in-memory object's address Pillow puts in some."""
    return f"{type(exc).__name__}: {re.sub(r'<_io.BytesIO object at 0x[0-9a-fA-F]+>', 'the bytes given', str(exc))}"


def normalize(batch: Any) -> Any:
    """uint8 → float32 in [-1, 1], for numpy arrays and torch tensors alike: the one definition used in
    training, feature caching and serving."""
    if hasattr(batch, "float"):
        # true division of uint8 gives float32: the same values as ``float() / 127.5``, one kernel fewer
        return batch.div(127.5).sub_(1.0)
    return batch.astype(np.float32) / 127.5 - 1.0


def resize(x: Any, size: int | None = None) -> Any:
    """A normalised torch batch N×C×H×W → ``size``×``size`` on its own device (as is when it already has
    that side, or ``size`` is None). Bilinear, with antialiasing when shrinking; keeps the batch's dtype
    and memory format."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    import torch.nn.functional as F  # only torch batches get here; this module stays numpy + Pillow

    shrink = size < max(x.shape[-2:])
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def model_input(batch: Any, size: int | None = None) -> Any:
    """A uint8 torch batch N×C×H×W → the network's input: normalised, and resized to ``size``×``size`` on
    the batch's own device when the stored side differs (images are decoded once at ingest at
    ``preprocess.image_size``; a model may see them larger, e.g. a resnet at 224 px). The one definition
    used in training, feature caching and serving."""
    return resize(normalize(batch), size)
