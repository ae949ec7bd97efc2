"""adaptflow.imaging: any image input → uint8 (C, size, size); normalize maps [0, 255] → [-1, 1]."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from adaptflow.imaging import normalize, prepare, prepare_batch, readable, to_uint8

RNG = np.random.default_rng(0)
U8_2D = RNG.integers(0, 256, (10, 12), dtype=np.uint8)


def _pil(mode: str) -> Image.Image:
    if mode == "P":
        return Image.fromarray(U8_2D).convert("P")
    if mode == "RGBA":
        return Image.fromarray(RNG.integers(0, 256, (9, 7, 4), dtype=np.uint8), "RGBA")
    if mode == "LA":
        return Image.fromarray(U8_2D).convert("LA")
    if mode == "I;16":
        return Image.fromarray(U8_2D.astype(np.uint16) * 200)  # 16-bit grayscale
    if mode == "F":
        return Image.fromarray(U8_2D.astype(np.float32) / 255.0, "F")
    if mode == "1":
        return Image.fromarray(U8_2D > 128)
    return Image.fromarray(U8_2D).convert(mode)


INPUTS = {
    "uint8_2d": lambda: U8_2D,
    "float_0_16": lambda: RNG.integers(0, 17, (8, 8)).astype(np.float64),
    "float_0_1": lambda: RNG.random((8, 8)),
    "float32_0_255": lambda: RNG.integers(0, 256, (8, 8)).astype(np.float32),
    "int64_0_255": lambda: RNG.integers(0, 256, (8, 8)),
    "negative_floats": lambda: RNG.normal(size=(8, 8)),
    "rgb_hwc": lambda: RNG.integers(0, 256, (9, 11, 3), dtype=np.uint8),
    "rgba_hwc": lambda: RNG.integers(0, 256, (9, 11, 4), dtype=np.uint8),
    "gray_hw1": lambda: RNG.integers(0, 256, (9, 11, 1), dtype=np.uint8),
    "rgb_chw": lambda: RNG.integers(0, 256, (3, 9, 11), dtype=np.uint8),
    "gray_1hw": lambda: RNG.integers(0, 256, (1, 9, 11), dtype=np.uint8),
    "pil_L": lambda: _pil("L"),
    "pil_RGB": lambda: _pil("RGB"),
    "pil_RGBA": lambda: _pil("RGBA"),
    "pil_P": lambda: _pil("P"),
    "pil_LA": lambda: _pil("LA"),
    "pil_I16": lambda: _pil("I;16"),
    "pil_F": lambda: _pil("F"),
    "pil_1": lambda: _pil("1"),
}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 20])
@pytest.mark.parametrize("name", sorted(INPUTS))
def test_prepare_any_input(name, size, channels):
    out = prepare(INPUTS[name](), size, channels)
    assert out.dtype == np.uint8
    assert out.shape == (channels, size, size)
    assert out.flags["C_CONTIGUOUS"]


def test_prepare_grayscale_to_rgb_repeats_channel():
    out = prepare(U8_2D, 10, 3)
    assert (out[0] == out[1]).all() and (out[1] == out[2]).all()


@pytest.mark.parametrize("size", [8, 16])
def test_prepare_identity_at_target_size_gray(size):
    img = RNG.integers(0, 256, (size, size), dtype=np.uint8)
    out = prepare(img, size, 1)
    assert out.shape == (1, size, size)
    assert (out[0] == img).all()
    assert (prepare(img[None], size, 1) == out).all()  # (1, H, W) too


def test_prepare_identity_at_target_size_rgb():
    chw = RNG.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    assert (prepare(chw, 16, 3) == chw).all()
    assert (prepare(chw.transpose(1, 2, 0), 16, 3) == chw).all()


def test_prepare_is_idempotent():
    once = prepare(RNG.random((13, 9)), 12, 1)
    assert (prepare(once, 12, 1) == once).all()


def test_float_ranges_scaled_to_full_uint8():
    f01 = np.array([[0.0, 0.5], [1.0, 0.25]])
    assert to_uint8(f01).tolist() == [[0, 128], [255, 64]]
    f016 = np.array([[0.0, 8.0], [16.0, 4.0]])
    assert to_uint8(f016).tolist() == [[0, 128], [255, 64]]
    f0255 = np.array([[0.0, 100.0], [255.0, 17.0]])
    assert to_uint8(f0255).tolist() == [[0, 100], [255, 17]]
    u8 = np.array([[3, 4]], dtype=np.uint8)
    assert to_uint8(u8) is u8  # uint8 passes through untouched


def test_sixteen_bit_images_are_scaled_alike_and_agree_with_their_8_bit_version():
    """One fixed factor for 16-bit data (not each image's own range): a dark 16-bit image stays dark, and a
    16-bit PNG and the 8-bit PNG of the same picture are stored the same."""
    eight = np.array([[0, 10, 128], [200, 254, 255]], dtype=np.uint8)
    sixteen = eight.astype(np.uint16) * 257  # the same picture at 16 bits
    assert to_uint8(sixteen).tolist() == eight.tolist()
    assert to_uint8(sixteen.astype(">u2")).tolist() == eight.tolist()  # big-endian (I;16B)
    dark = np.array([[0, 300], [600, 1200]], dtype=np.uint16)
    assert to_uint8(dark).tolist() == [[0, 1], [2, 5]]  # not stretched to 255
    assert to_uint8(np.array([[0, 30000]], dtype=np.int32)).tolist() == [[0, 117]]  # Pillow's 32-bit "I" holding 16-bit data
    assert to_uint8(np.array([[0, 200]], dtype=np.int64)).tolist() == [[0, 200]]  # 8-bit values in a wide integer
    assert to_uint8(np.array([[False, True]])).tolist() == [[0, 255]]
    for image, fmt, mode in ((Image.fromarray(eight), "PNG", "L"), (Image.fromarray(sixteen), "PNG", "I;16"),
                             (Image.fromarray(sixteen), "PPM", "I")):  # Pillow opens a 16-bit PGM as 32-bit "I"
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        assert Image.open(io.BytesIO(buf.getvalue())).mode == mode
        assert (prepare(buf.getvalue(), 3, 1)[0] == prepare(eight, 3, 1)[0]).all(), (fmt, mode)


def test_a_tiff_of_32_bit_integers_keeps_its_values_ranges_not_the_16_bit_factor():
    """Pillow opens both a 16-bit PGM and a TIFF of 32-bit integers as "I"; the TIFF says its width (bits per
    sample 32), so its 0–255 values are stored as they are, not divided by 257 into a black image."""
    eight = np.array([[0, 10, 128], [200, 254, 255]], dtype=np.uint8)
    for values, want in ((eight.astype(np.int32), eight), (eight.astype(np.int32) * 257, eight)):  # 8-bit values; 16-bit values
        buf = io.BytesIO()
        Image.fromarray(values, mode="I").save(buf, format="TIFF")
        assert Image.open(io.BytesIO(buf.getvalue())).mode == "I"
        assert (prepare(buf.getvalue(), 3, 1)[0] == prepare(want, 3, 1)[0]).all()


def test_prepare_uci_like_digit_matches_255_scale():
    # an 8×8 float image in 0–16 (UCI digits) ends up 0–255 with its max at 255
    img = np.zeros((8, 8))
    img[2:6, 3:5] = 16.0
    out = prepare(img, 8, 1)[0]
    assert out.max() == 255 and out.min() == 0
    assert ((out == 255) == (img == 16)).all()


def test_prepare_path_str_path_bytes_and_base64_agree(tmp_path, png_bytes):
    f = tmp_path / "digit.png"
    f.write_bytes(png_bytes)
    ref = prepare(Image.open(io.BytesIO(png_bytes)), 16, 1)
    b64 = base64.b64encode(png_bytes).decode()
    for src in (f, str(f), png_bytes, bytearray(png_bytes), memoryview(png_bytes), b64):
        out = prepare(src, 16, 1)
        assert out.dtype == np.uint8 and out.shape == (1, 16, 16)
        assert (out == ref).all(), type(src)


def test_without_read_paths_no_file_is_touched_and_existence_does_not_show(tmp_path, png_bytes, monkeypatch):
    """A served model: a path string that names an image fails exactly as one that names nothing, and no
    file is opened or even stat-ed; base64, bytes and arrays still work."""
    f = tmp_path / "digit.png"
    f.write_bytes(png_bytes)
    touched = []
    monkeypatch.setattr(Path, "is_file", lambda self: touched.append(self) or True)
    messages = []
    for src in (str(f), str(tmp_path / "missing.png"), "/etc/passwd"):
        with pytest.raises(ValueError, match="reads no file paths when served") as exc:
            prepare(src, 16, 1, read_paths=False)
        messages.append(str(exc.value).replace(src[:60], "<input>"))
    assert len(set(messages)) == 1 and not touched
    with pytest.raises(ValueError, match="got a path"):
        prepare(f, 16, 1, read_paths=False)
    ref = prepare(png_bytes, 16, 1)
    for src in (base64.b64encode(png_bytes).decode(), png_bytes, np.asarray(Image.open(io.BytesIO(png_bytes)))):
        assert (prepare_batch([src], 16, 1, read_paths=False)[0] == ref).all()
    assert (prepare(str(f), 16, 1) == ref).all()  # the default still reads paths


def test_prepare_png_matches_array(png_bytes):
    arr = np.asarray(Image.open(io.BytesIO(png_bytes)))
    assert (prepare(png_bytes, 7, 1) == prepare(arr, 7, 1)).all()


@pytest.mark.parametrize("bad", ["not an image", "definitely/not/a/file.png", "abcd", "%%%%"])
def test_non_path_non_base64_string_raises_value_error(bad):
    with pytest.raises(ValueError):
        prepare(bad, 8, 1)


def _b64_png_with_long_slash_free_run() -> str:
    # A valid PNG whose base64 text holds a >255-character run without "/" (a tEXt chunk of "A"s encodes as "QUFB…").
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "A" * 600)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="PNG", pnginfo=info)
    text = base64.b64encode(buf.getvalue()).decode()
    assert len(text) < 4096 and max(len(s) for s in text.split("/")) > 255
    return text


def test_prepare_base64_with_long_component():
    # regression: Path(s).exists() raised OSError (ENAMETOOLONG) for such strings instead of trying base64
    assert prepare(_b64_png_with_long_slash_free_run(), 8, 1).shape == (1, 8, 8)


@pytest.mark.parametrize("bad", ["x" * 300, "a\x00b"])
def test_long_or_nul_garbage_string_raises_value_error(bad):
    # regression: a string too long for a path component raised OSError (File name too long)
    with pytest.raises(ValueError):
        prepare(bad, 8, 1)


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4, 5)])
def test_bad_array_shape_raises(shape):
    with pytest.raises(ValueError, match="shape"):
        prepare(np.zeros(shape, np.uint8), 8, 1)


@pytest.mark.parametrize("array, message", [
    (np.zeros((0, 0), np.uint8), "an empty image"), (np.zeros((5, 0), np.float32), "an empty image"),
    (np.zeros((0, 0, 3), np.uint8), "an empty image"), (np.full((8, 8), np.nan, np.float32), "not finite"),
    (np.array([[0.0, np.inf], [0.5, 1.0]]), "not finite"), (np.array([[0.0, -np.inf], [0.5, 1.0]]), "not finite"),
    ([[0.1, None], [0.5, 1.0]], "not finite"), (np.array([[0.1, "x"], [0.5, 1.0]], dtype=object), "not all numbers")])
def test_an_empty_or_non_finite_array_is_no_image(array, message):
    """Not a confident prediction for a picture made up from what is left."""
    with pytest.raises(ValueError, match=message):
        prepare(array, 8, 1)
    assert readable([array])[1][0][1].startswith("not a readable image")


def test_prepare_batch():
    out = prepare_batch([U8_2D, RNG.random((5, 5)), _pil("RGBA")], 6, 3)
    assert out.shape == (3, 3, 6, 6) and out.dtype == np.uint8
    empty = prepare_batch([], 6, 1)
    assert empty.shape == (0, 1, 6, 6) and empty.dtype == np.uint8


def test_normalize_numpy():
    x = np.array([[0, 127, 255]], dtype=np.uint8)
    y = normalize(x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    assert y[0, 0] == -1.0 and y[0, 2] == 1.0
    assert abs(y[0, 1]) < 0.01


def test_normalize_torch_matches_numpy():
    x = torch.from_numpy(RNG.integers(0, 256, (2, 1, 4, 4), dtype=np.uint8))
    y = normalize(x)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    assert y.min() >= -1.0 and y.max() <= 1.0
    assert np.allclose(y.numpy(), normalize(x.numpy()))
    assert normalize(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]
    every = np.arange(256, dtype=np.uint8)  # training (torch) and serving (numpy) agree bit for bit
    assert np.array_equal(normalize(torch.from_numpy(every)).numpy(), normalize(every))


def test_directory_path_string_raises_value_error(tmp_path):
    with pytest.raises(ValueError):
        prepare(str(tmp_path), 8, 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_prepare_converts_modes_pillow_only_takes_to_rgb(tmp_path, channels):
    """A LAB TIFF: Pillow converts LAB to RGB but not to L; prepare goes through RGB, so the file is usable."""
    path = tmp_path / "lab.tif"
    Image.new("LAB", (6, 6), (60, 40, 20)).save(path)
    out = prepare(path, 4, channels)
    assert out.shape == (channels, 4, 4) and out.dtype == np.uint8
    good, bad = readable([path, tmp_path / "missing.png"])
    assert good == [path] and bad == [(tmp_path / "missing.png", "unreadable: No such file or directory")]


def test_readable_converts_as_the_model_does(tmp_path, monkeypatch, png_bytes):
    """A file that opens but will not convert is not readable: predict skips and lists it."""
    from adaptflow import imaging

    path = tmp_path / "a.png"
    path.write_bytes(png_bytes)
    assert readable([path]) == ([path], [])

    def no_conversion(im, channels):
        raise ValueError(f"conversion from {im.mode} not supported")

    monkeypatch.setattr(imaging, "_to_mode", no_conversion)
    good, bad = readable([path])
    assert good == [] and "conversion from" in bad[0][1]


@pytest.mark.parametrize("stroke", [0, 255])
@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_a_stroke_on_a_transparent_background_stays_visible(stroke, mode):
    """Alpha is composited over a background that contrasts with the visible pixels, not dropped: a dark or
    light digit drawn on transparency would otherwise come out as one flat colour."""
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = stroke  # the hidden pixels share the stroke's colour, as drawing tools leave them
    rgba[6:10, 2:14, 3] = 255
    im = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        im = im.convert("LA")
    elif mode == "P":
        im = Image.fromarray(np.where(rgba[..., 3] > 0, stroke, 255 - stroke).astype(np.uint8)).convert("P")
        im.info["transparency"] = im.getpixel((0, 0))
    out = prepare(im, 16, 1)[0].astype(int)
    assert abs(out[7, 5] - out[0, 0]) == 255  # stroke against background, full contrast
    assert out[7, 5] == stroke


def test_alpha_at_zero_everywhere_is_taken_as_unset():
    """Some writers (TGA, 32-bit BMP) leave alpha at 0: the colours are the image, not a blank canvas."""
    rgb = RNG.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.zeros((9, 7, 1), np.uint8)], axis=-1)
    assert (prepare(Image.fromarray(rgba, "RGBA"), 8, 3) == prepare(rgb, 8, 3)).all()


def test_opaque_alpha_changes_nothing():
    rgb = RNG.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((9, 7, 1), 255, np.uint8)], axis=-1)
    assert (prepare(Image.fromarray(rgba, "RGBA"), 8, 3) == prepare(rgb, 8, 3)).all()


def test_exif_orientation_is_applied(tmp_path):
    """A phone stores a portrait photo sideways with an Orientation tag; viewers, ingest and the served
    model all turn it upright."""
    im = Image.new("L", (20, 10), 0)
    im.paste(255, (0, 2, 20, 4))  # a bar along the top of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90° clockwise: the bar runs down the right-hand side
    path = tmp_path / "phone.jpg"
    im.save(path, "JPEG", exif=exif)
    out = prepare(path, 10, 1)[0]
    assert (out[:, 6:8] > 128).all() and (out[:, :5] < 64).all()
    assert (prepare(path.read_bytes(), 10, 1) == out).all()


def test_ingest_and_predict_say_alike_why_a_file_is_no_image(tmp_path):
    """One wording for the quarantine report, ``adaptflow predict`` and the incoming folder."""
    from adaptflow.data.files import BadItem, open_image

    good = tmp_path / "good.png"
    Image.new("L", (12, 12), 128).save(good)
    cases = {"empty.png": (b"", "empty file (0 bytes)"), "notes.png": (b"not an image", "not an image Pillow can read"),
             "cut.png": (good.read_bytes()[:60], "truncated image")}
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    _, bad = readable([tmp_path / name for name in cases])
    for (path, said), (name, (_, expected)) in zip(bad, cases.items()):
        assert path.name == name and said.startswith(expected), (name, said)
        with pytest.raises(BadItem) as exc:
            open_image(path)
        assert str(exc.value) == said


@pytest.mark.parametrize("value, message", [(None, "a missing value (None/NaN), not an image"), (float("nan"), "a missing value (None/NaN), not an image"),
                                            (5, "a number (5), not an image"), (np.float32(0.5), "a number")])
def test_a_missing_value_or_a_number_is_said_as_such(value, message):
    """A DataFrame cell left empty, or a number, is not 'an image of shape ()'."""
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare(value, 8, 1)


def test_predict_and_the_served_model_refuse_what_ingest_refuses_as_a_bomb(tmp_path, monkeypatch):
    """One limit, Pillow's, for every reader; under twice it Pillow alone would only warn and decode it all."""
    from adaptflow.data.files import BadItem, open_image

    Image.new("L", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4,096 px: over the limit, under twice it
    [(_, said)] = readable([tmp_path / "big.png"])[1]
    assert said == "decompression bomb refused: Image size (4096 pixels) exceeds limit of 3000 pixels, could be decompression bomb DOS attack."
    with pytest.raises(BadItem) as exc:
        open_image(tmp_path / "big.png")
    assert str(exc.value) == said
    encoded = base64.b64encode((tmp_path / "big.png").read_bytes()).decode()
    with pytest.raises(Image.DecompressionBombError, match="exceeds limit of 3000"):  # served: base64 (imaging.UNREADABLE)
        prepare(encoded, 8, 1, read_paths=False)
