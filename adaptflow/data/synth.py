"""synth_digits: digits rendered with the TrueType fonts matplotlib ships, with seeded nuisance variation.

The classic "synthetic source → real target" setting (SynDigits → SVHN in the DANN paper): labels are free,
the style is not the target's. Each image varies in font, size, stroke width, rotation and shear, position,
foreground and background colour (solid, gradient or texture), neighbouring distractor digits, blur and
pixel noise, so a source model learns the digit's shape rather than one rendering of it.

Every image is drawn from its own generator seeded by ``(seed, index)``: image ``i`` has the same bytes
whether it is rendered alone, in order, or lazily during a streaming ingest, and the whole domain costs
no memory until it is read. Only matplotlib's bundled fonts are used (never system fonts), so the same
seed gives the same bytes on any machine with the same matplotlib and Pillow.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = ["CLASSES", "digit_fonts", "labels", "render", "fingerprint"]

CLASSES = [str(d) for d in range(10)]
_GLYPH_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SUPERSAMPLE = 2  # render at 2× and downsample: smooth edges at 8–32 px


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=1)
def digit_fonts() -> tuple[Path, ...]:
    """matplotlib's bundled fonts whose glyphs for '0'–'9' really are digits.

    A font qualifies when its character map sends each of '0'–'9' to a glyph named after that digit
    ("zero", "zerooldstyle", …). That keeps DejaVu, STIX and Computer Modern text faces and drops the
    symbol fonts (cmex10, cmsy10, STIX size variants) and LastResort, whose '0' is a box or a delimiter.
    """
    from fontTools.ttLib import TTFont

    found = []
    for path in sorted(font_dir().glob("*.ttf")):
        try:
            cmap = TTFont(path, lazy=True).getBestCmap() or {}
        except Exception:  # a damaged font file is simply not used
            continue
        if all(str(cmap.get(ord(str(d)), "")).startswith(name) for d, name in enumerate(_GLYPH_NAMES)):
            found.append(path)
    if not found:
        raise RuntimeError(f"synth_digits: no digit fonts found in matplotlib's {font_dir()}")
    return tuple(found)


@functools.lru_cache(maxsize=2048)
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


def labels(n: int, seed: int) -> np.ndarray:
    """Balanced labels (counts differ by at most one) in a seeded order: known before any rendering."""
    return np.random.default_rng([seed, n]).permutation(np.arange(n) % len(CLASSES)).astype(np.int64)


def fingerprint() -> str:
    """What the rendered bytes depend on besides the params: the fonts and the rasteriser's version."""
    import PIL

    h = hashlib.sha256(PIL.__version__.encode())
    for p in digit_fonts():
        h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB with a luminance gap of at least 60 (the digit stays legible)."""
    weights = np.array([0.299, 0.587, 0.114])
    while True:
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if abs(float(weights @ fg) - float(weights @ bg)) >= 60:
            return fg.astype(np.float32), bg.astype(np.float32)


def _background(rng: np.random.Generator, side: int, bg: np.ndarray) -> np.ndarray:
    kind = rng.choice(3, p=[0.4, 0.3, 0.3])
    base = np.broadcast_to(bg, (side, side, 3)).astype(np.float32)
    if kind == 1:  # a linear gradient towards a second colour
        other = rng.integers(0, 256, 3).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:side, 0:side] / max(side - 1, 1)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)
        t = ((t - t.min()) / max(float(np.ptp(t)), 1e-6) * rng.uniform(0.3, 0.8))[..., None]
        base = base * (1 - t) + other * t
    elif kind == 2:  # low-frequency texture: upsampled noise
        coarse = rng.normal(0, rng.uniform(10, 35), (4, 4, 3)).astype(np.float32)
        tex = np.asarray(Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((side, side), Image.BICUBIC), np.float32)
        base = base + (tex - 128)
    return base


def _glyph_mask(rng: np.random.Generator, digit: int, side: int, font: Path, dx: float = 0.0) -> np.ndarray:
    """The digit's coverage in [0, 1] after a random size, stroke, rotation, shear and shift."""
    size = max(int(side * rng.uniform(0.55, 0.9)), 4)
    stroke = int(rng.integers(0, 3)) * max(side // 48, 1)
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).text((side / 2, side / 2), str(digit), fill=255, font=_font(font, size), anchor="mm", stroke_width=stroke, stroke_fill=255)
    theta = np.deg2rad(rng.uniform(-15, 15))
    shear = rng.uniform(-0.3, 0.3)
    tx, ty = rng.uniform(-0.12, 0.12, 2) * side + np.array([dx * side, 0.0])
    # Image.transform maps output → input: invert rotation·shear about the centre, then shift.
    fwd = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    inv = np.linalg.inv(fwd)
    c = np.array([side / 2, side / 2])
    offset = c - inv @ (c + np.array([tx, ty]))
    coeffs = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    mask = mask.transform((side, side), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    return np.asarray(mask, np.float32)[..., None] / 255.0


def render(index: int, seed: int, size: int, digit: int) -> Image.Image:
    """Image ``index`` of the domain (an RGB ``size``×``size`` image of ``digit``); pure in its arguments."""
    rng = np.random.default_rng([seed, index])
    fonts = digit_fonts()
    side = size * _SUPERSAMPLE
    fg, bg = _colours(rng)
    img = _background(rng, side, bg)
    if rng.random() < 0.3:  # SVHN-like neighbours cut by the frame: the label is the centred digit
        for dx in (-0.75, 0.75):
            if rng.random() < 0.6:
                m = _glyph_mask(rng, int(rng.integers(10)), side, fonts[rng.integers(len(fonts))], dx)
                img = img * (1 - m) + fg * m
    m = _glyph_mask(rng, digit, side, fonts[rng.integers(len(fonts))])
    img = img * (1 - m) + fg * m
    out = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    blur = rng.uniform(0, 1.2)
    if blur > 0.3:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    out = out.resize((size, size), Image.LANCZOS)
    sigma = rng.uniform(0, 10)
    noisy = np.asarray(out, np.float32) + rng.normal(0, sigma, (size, size, 3))
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")
