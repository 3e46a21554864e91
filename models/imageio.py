"""Image <-> tensor conversion shared by the editors: [0, 255] uint8 images <-> [-1, 1] float tensors.

Every image becomes 8-bit RGB the same way, whether it comes as a path or as a PIL image:

* the EXIF orientation tag (0x0112) is applied, so the pixels are upright as a viewer shows them;
* 16-bit greyscale (PIL modes ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` and ``I``, which PIL uses for 16-bit
  PNG and TIFF) is scaled by ``255 / 65535``; 32-bit float (``F``) is taken as [0, 1], clipped, times 255;
* transparency (an alpha band, or a ``transparency`` entry of ``P``/``L``/``RGB`` images) is composited onto
  :data:`BACKGROUND` (white); when some pixel is not fully opaque a one-line :class:`UserWarning` says so.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

BACKGROUND = (255, 255, 255)  # RGB that transparent pixels are composited onto
_ORIENTATION = 0x0112  # EXIF tag
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image(image: Image.Image | str | os.PathLike | Tensor) -> Image.Image | Tensor:
    """A path or a PIL image as an upright 8-bit RGB PIL image (see the module docstring); tensors pass
    through after :func:`check_finite`.

    A path that is not a decodable image (wrong content, truncated data) raises a one-line ValueError naming
    the file; the whole image is decoded here, so damage shows up now rather than later.
    """
    if isinstance(image, Tensor):
        check_finite(image, "image tensor")
        return image
    if isinstance(image, (str, os.PathLike)):
        image = _open(os.fspath(image))
    if not isinstance(image, Image.Image):
        return image
    rgb, composited = _to_rgb(image)
    if composited:
        warnings.warn(_alpha_notice(image), stacklevel=2)
    return rgb


def pil_to_tensor(image: Image.Image) -> Tensor:
    """PIL image -> (1, 3, H, W) float32 in [-1, 1], converted to upright 8-bit RGB as :func:`load_image` does."""
    rgb, composited = _to_rgb(image)
    if composited:
        warnings.warn(_alpha_notice(image), stacklevel=2)
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2 - 1


def tensor_to_pil(image: Tensor) -> Image.Image | list[Image.Image]:
    """(3, H, W) or (b, 3, H, W) tensor in [-1, 1] -> PIL image(s); values are clamped."""
    batch = image.ndim == 4
    x = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    x = x if batch else x[None]
    out = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in x]
    return out if batch else out[0]


def resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """LANCZOS resize, as the official pipelines do for VAE inputs."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def check_finite(t: Tensor, name: str) -> None:
    """Raise a one-line ValueError when ``t`` holds a NaN or an infinity (one ``isfinite().all()`` reduction)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(
            f"{name} contains NaN or infinite values (shape {tuple(t.shape)}, {t.dtype}); "
            "an image or latent must be finite everywhere"
        )


# ----------------------------------------------------------------------------------------------- helpers
def _open(path: str) -> Image.Image:
    """The fully decoded image at ``path`` (a one-line ValueError naming the file when it cannot be decoded)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    im = None
    try:
        im = Image.open(path)
        im.load()  # decode now: a truncated file fails here, not in a later conversion
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        if im is not None:
            im.close()
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{path} is not a readable image: {reason}") from None
    return im


def _to_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """Upright 8-bit RGB, and whether some pixel was not fully opaque (composited onto :data:`BACKGROUND`)."""
    if image.getexif().get(_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT:
        return _grey_to_rgb(np.asarray(image).astype(np.float32) / 65535.0), False
    if image.mode == "F":
        return _grey_to_rgb(np.asarray(image, dtype=np.float32)), False
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        lowest_alpha = rgba.getchannel("A").getextrema()[0]
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), lowest_alpha < 255
    return (image if image.mode == "RGB" else image.convert("RGB")), False


def _grey_to_rgb(values: np.ndarray) -> Image.Image:
    """A greyscale array of [0, 1] values (clipped; NaN becomes 0) as an 8-bit RGB image."""
    grey = np.nan_to_num(np.clip(values, 0.0, 1.0), nan=0.0) * 255.0
    return Image.fromarray(np.round(grey).astype(np.uint8)).convert("RGB")


def _alpha_notice(image: Image.Image) -> str:
    name = getattr(image, "filename", "") or f"the {image.mode} image"
    return f"{name} has transparent pixels; they were composited onto a white background {BACKGROUND}"
