"""Image <-> tensor conversion shared by the editors: [0, 255] uint8 images <-> [-1, 1] float tensors."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def load_image(image: Image.Image | str | os.PathLike | Tensor) -> Image.Image | Tensor:
    """Open a path as an RGB PIL image; PIL images and tensors pass through."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"image not found: {image}")
        return Image.open(image).convert("RGB")
    return image


def pil_to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
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
