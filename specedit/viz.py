"""Edit outputs and small image helpers: the verified-token mask drawn over the input."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True, eq=False)
class EditOutput:
    """One edit by a pipeline: the images, the latent, the method's account of its work and the editor.

    images: b PIL images; pixels: (b, 3, H, W) float32 in [0, 1] on the CPU; latent: (b, z, h, w) normalised;
    reference: the source at the working size; seconds: wall time per phase (the pipeline documents which);
    one_off: FLOPs of work done once per edit outside sampling (prompt/image encoding, final decode).
    """

    images: list[Image.Image]
    pixels: Tensor
    latent: Tensor
    result: Any  # specedit.method.EditResult
    editor: Any  # the family's editor adapter
    reference: Image.Image
    seconds: dict[str, float] = field(default_factory=dict)
    one_off: dict[str, float] = field(default_factory=dict)

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    @property
    def mask(self) -> Tensor | None:
        """(hc, wc) bool cells the verifier sent to full resolution (first sample); None for baselines."""
        verdict = self.result.verdict
        return None if verdict is None else verdict.mask[0].detach().cpu()

    def flops(self) -> dict[str, float]:
        """FLOPs per sampling part (as ``EditResult.flops``); with one-off costs also "sampling", the one-off
        parts and a "total" that includes them."""
        out = self.result.flops(self.editor)
        if self.one_off:
            out["sampling"] = out.pop("total")
            out.update(self.one_off)
            out["total"] = out["sampling"] + sum(self.one_off.values())
        return out

    def overlay(self) -> Image.Image | None:
        """The reference with the verified cells tinted (None without a mask)."""
        return None if self.mask is None else mask_overlay(self.reference, self.mask)
