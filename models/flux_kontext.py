"""FLUX.1-Kontext glue: preferred resolutions, the conditioning bundle and a denoiser over any token layout.

Kontext conditions on a reference image by appending its clean latent tokens to the image stream, with
position ids whose axis 0 is 1; text ids are all 0; the velocity of the reference tokens is discarded.
Because ids are explicit, the same call serves full grids, coarse grids and mixed-resolution token sets.

Shape legend: b batch, n target tokens, r reference tokens, l text tokens, c packed channels (64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.flux import Flux

# (width, height) pairs Kontext was trained at (BFL ``PREFERRED_KONTEXT_RESOLUTIONS``)
PREFERRED_KONTEXT_RESOLUTIONS = [
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
]


def preferred_resolution(width: int, height: int) -> tuple[int, int]:
    """The preferred (width, height) whose aspect ratio is closest to ``width / height``."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    ar = width / height
    return min(PREFERRED_KONTEXT_RESOLUTIONS, key=lambda wh: abs(wh[0] / wh[1] - ar))


@dataclass(frozen=True)
class KontextCond:
    """Prompt conditioning and the reference image of one Kontext edit.

    txt: (b, l, 4096) T5 states; y: (b, 768) pooled CLIP; ref: (b, r, c) packed clean reference latent
    tokens with ids ref_ids (r, 3) or (b, r, 3), axis 0 = 1. ``ref`` may be None (plain FLUX.1).
    """

    txt: Tensor
    y: Tensor
    ref: Tensor | None
    ref_ids: Tensor | None
    guidance: float = 2.5


def kontext_velocity(
    model: Flux, x: Tensor, x_ids: Tensor, sigma: Tensor | float, cond: KontextCond
) -> Tensor:
    """Velocity of the target tokens ``x`` (b, n, c) placed at ``x_ids`` ((n, 3) or (b, n, 3))."""
    b, n = x.shape[:2]
    img, ids = x, x_ids if x_ids.ndim == 3 else x_ids[None].expand(b, -1, -1)
    if cond.ref is not None:
        ref_ids = cond.ref_ids if cond.ref_ids.ndim == 3 else cond.ref_ids[None].expand(b, -1, -1)
        img = torch.cat([x, cond.ref.to(x.dtype)], 1)
        ids = torch.cat([ids, ref_ids.to(ids)], 1)
    txt_ids = torch.zeros(1, cond.txt.shape[1], 3, device=x.device)
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).expand(b)
    guidance = torch.full((b,), cond.guidance, device=x.device, dtype=x.dtype)
    v = model(img, ids, cond.txt.to(x.dtype), txt_ids, sigma, cond.y.to(x.dtype), guidance)
    return v[:, :n]


def kontext_denoiser(model: Flux, cond: KontextCond, x_ids: Tensor):
    """A ``denoiser(x, sigma) -> v`` for a fixed target layout ``x_ids``."""
    return lambda x, sigma: kontext_velocity(model, x, x_ids, sigma, cond)
