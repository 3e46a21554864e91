"""Small image helpers: the verified-token mask drawn over the input (outputs: ``specedit.pipeline.EditOutput``)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def mask_overlay(image: Image.Image, mask: Tensor, *, color=(255, 0, 0), alpha: float = 0.45) -> Image.Image:
    """``image`` with the cells of ``mask`` (hc, wc) bool (e.g. verified tokens) tinted in ``color``."""
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"mask must be (hc, wc), got shape {tuple(mask.shape)}")
    cells = Image.fromarray(mask.detach().to(torch.bool).cpu().numpy().astype(np.uint8) * 255)
    sel = np.asarray(cells.resize(image.size, Image.Resampling.NEAREST))[..., None] > 0
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    tinted = (1 - alpha) * rgb + alpha * np.asarray(color, dtype=np.float32)
    return Image.fromarray(np.where(sel, tinted, rgb).round().astype(np.uint8))
