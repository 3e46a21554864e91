"""Image loading: EXIF orientation, 16-bit and float greyscale, alpha compositing, damaged files, NaN checks."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from models.imageio import BACKGROUND, check_finite, load_image, pil_to_tensor, tensor_to_pil

ORIENTATION = 0x0112


def _exif_rotated(path, fmt):
    """A 3 x 2 (w x h) image, red in the top-left corner, stored with EXIF orientation 6 (rotate 90 cw)."""
    a = np.zeros((2, 3, 3), np.uint8) if fmt == "PNG" else np.zeros((16, 24, 3), np.uint8)
    a[: a.shape[0] // 2, : a.shape[1] // 3] = (255, 0, 0)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(a).save(path, format=fmt, exif=exif, quality=95)
    return path


def test_exif_orientation_png_is_applied_exactly(tmp_path):
    path = _exif_rotated(tmp_path / "rot.png", "PNG")
    assert Image.open(path).size == (3, 2) and Image.open(path).getexif()[ORIENTATION] == 6
    im = load_image(path)
    assert im.size == (2, 3)  # upright: width and height swapped
    arr = np.asarray(im)
    assert tuple(arr[0, -1]) == (255, 0, 0)  # the stored top-left is now top-right
    assert tuple(arr[0, 0]) == (0, 0, 0) and tuple(arr[-1, -1]) == (0, 0, 0)
    x = pil_to_tensor(Image.open(path))  # a PIL image passed in is turned upright too
    assert x.shape == (1, 3, 3, 2) and torch.equal(x, pil_to_tensor(im))
    assert load_image(im) is im  # an upright RGB image passes through untouched


def test_exif_orientation_jpeg(tmp_path):
    im = load_image(_exif_rotated(tmp_path / "rot.jpg", "JPEG"))
    assert im.size == (16, 24)
    arr = np.asarray(im).astype(int)
    assert arr[1, -2, 0] > 200 and arr[1, -2, 1] < 60  # red in the top-right corner
    assert arr[1, 1].max() < 60 and arr[-2, -2].max() < 60


def test_sixteen_bit_greyscale_uses_its_full_range(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)[None].repeat(3, 0)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    opened = Image.open(tmp_path / "g16.png")
    assert opened.mode == "I;16"
    assert (np.asarray(opened.convert("RGB")) == 255).mean() > 0.99  # what a plain convert("RGB") does
    arr = np.asarray(load_image(tmp_path / "g16.png"))
    assert arr.shape == (3, 256, 3) and (arr == arr[..., :1]).all()  # grey RGB
    row = arr[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all()
    assert np.array_equal(row, np.arange(256))  # 65535 * i / 255 maps back to i
    big_endian = Image.frombytes("I;16B", (256, 3), ramp.astype(">u2").tobytes())
    for im in (big_endian, opened.convert("I")):
        assert np.array_equal(np.asarray(load_image(im))[0, :, 0], np.arange(256)), im.mode


def test_float_image_is_taken_as_zero_to_one_and_clipped():
    values = np.array([[-0.5, 0.0, 0.25, 0.5, 1.0, 1.5, np.nan, np.inf]], np.float32)
    arr = np.asarray(load_image(Image.fromarray(values, mode="F")))
    assert arr[0, :, 0].tolist() == [0, 0, 64, 128, 255, 255, 0, 255]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_alpha_is_composited_on_white_with_a_warning(tmp_path, mode):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 100
    rgba[0, 0, 3] = 255  # one opaque pixel, one half transparent, two fully transparent
    rgba[0, 1, 3] = 128
    im = Image.fromarray(rgba, "RGBA")
    if mode == "P":  # a palette image whose index 0 (red, everywhere but the top-left) is transparent
        im = Image.new("P", (2, 2), 0)
        im.putpalette([255, 0, 0, 100, 100, 100])
        im.putpixel((0, 0), 1)
        im.info["transparency"] = 0
    elif mode == "LA":
        im = im.convert("LA")
    im.save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == mode
    with pytest.warns(
        UserWarning, match=r"a.png has transparent pixels; .* white background \(255, 255, 255\)"
    ):
        out = load_image(tmp_path / "a.png")
    arr = np.asarray(out).astype(int)
    assert out.mode == "RGB" and tuple(arr[0, 0]) == (100, 100, 100) and tuple(arr[1, 1]) == BACKGROUND
    if mode != "P":
        assert 170 <= arr[0, 1, 0] <= 185  # half of 100, half of 255
    with pytest.warns(UserWarning, match="has transparent pixels") as record:
        pil_to_tensor(Image.open(tmp_path / "a.png"))
    assert record[0].filename == __file__  # stacklevel=2: the warning points at the caller


def test_opaque_alpha_is_dropped_silently():
    im = Image.new("RGBA", (2, 2), (10, 20, 30, 255))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.asarray(load_image(im))[0, 0].tolist() == [10, 20, 30]


def test_unreadable_files_raise_one_line_value_errors(tmp_path):
    (tmp_path / "text.png").write_text("this is not an image\n")
    with pytest.raises(
        ValueError, match=r"text.png is not a readable image: cannot identify image file"
    ) as e:
        load_image(tmp_path / "text.png")
    assert "\n" not in str(e.value)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        tmp_path / "ok.png"
    )
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    Image.open(tmp_path / "cut.png")  # the header alone still opens: only decoding finds the damage
    with pytest.raises(ValueError, match=r"cut.png is not a readable image: .*truncated") as e:
        load_image(tmp_path / "cut.png")
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_image(tmp_path / "absent.png")


def test_check_finite():
    check_finite(torch.zeros(2, 3), "latents")
    check_finite(torch.arange(3), "ids")  # integer tensors are always finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.zeros(1, 3, 2, 2)
        x[0, 1, 1, 0] = bad
        with pytest.raises(
            ValueError, match=r"^image contains NaN or infinite values \(shape \(1, 3, 2, 2\)"
        ):
            check_finite(x, "image")
    with pytest.raises(ValueError, match="image tensor contains NaN"):
        load_image(torch.full((3, 2, 2), float("nan")))
    x = torch.rand(3, 2, 2) * 2 - 1
    assert load_image(x) is x


def test_tensor_round_trip():
    im = Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 14)
    assert np.array_equal(np.asarray(tensor_to_pil(pil_to_tensor(im)[0])), np.asarray(im))
