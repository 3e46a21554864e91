"""FLUX.1-Kontext glue: preferred resolutions, reference ids, the conditioning bundle and a denoiser over any
token layout.

Kontext conditions on a reference image by appending its clean latent tokens to the image stream, with
position ids whose axis 0 is 1; text ids are all 0; the velocity of the reference tokens is discarded.
Because ids are explicit, the same call serves full grids, coarse grids and mixed-resolution token sets.

Several references (FLUX.1-Kontext-dev was released with one; multi-reference use is the community's) are
appended one after the other. :func:`reference_ids` places them as ComfyUI's Flux model does
(``comfy/ldm/flux/model.py``, ``ref_latents_method``): "offset", ComfyUI's default for Kontext, keeps axis 0 at
1 for every reference and shifts each one right of or below the ones before it so that no two share a
position; "index" puts reference k (1-based) at axis 0 = k with no spatial shift. The diffusers community
pipeline ``pipeline_flux_kontext_multiple_images`` also keeps axis 0 at 1 and shifts reference i along the
column axis by i times its token height (all its references share one size).

Shape legend: b batch, n target tokens, r reference tokens, l text tokens, c packed channels (64).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from models.flux import Flux
from models.packing import grid_ids

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


REFERENCE_METHODS = ("offset", "index")


def reference_ids(grids: Sequence[tuple[int, int]], method: str = "offset") -> Tensor:
    """(sum of rh * rw, 3) float ids of references with token grids ``grids`` = [(rh, rw), ...] in stream order.

    "offset": axis 0 = 1; reference k goes right of the references before it (column offset = their joint
    width) when it is taller than wide relative to that extent (rh + height > rw + width), else below them
    (row offset = their joint height), ComfyUI's rule; the first reference is at (1, row, col) unshifted, so one
    reference gets exactly the single-reference ids. "index": reference k (1-based) at (k, row, col).
    """
    if method not in REFERENCE_METHODS:
        raise ValueError(f"reference method must be one of {REFERENCE_METHODS}, got {method!r}")
    parts, height, width = [], 0, 0
    for k, (rh, rw) in enumerate(grids):
        axis0, dh, dw = k + 1, 0, 0
        if method == "offset":
            axis0 = 1
            if rh + height > rw + width:
                dw = width
            else:
                dh = height
            height, width = max(height, rh + dh), max(width, rw + dw)
        parts.append(grid_ids((rh, rw), axis0=float(axis0)) + torch.tensor([0.0, dh, dw]))
    return torch.cat(parts) if parts else torch.zeros(0, 3)


@dataclass(frozen=True)
class KontextCond:
    """Prompt conditioning and the reference image of one Kontext edit.

    txt: (b, l, 4096) T5 states; y: (b, 768) pooled CLIP; ref: (b, r, c) packed clean tokens of every reference
    with ids ref_ids (r, 3) or (b, r, 3) (:func:`reference_ids`). ``ref`` may be None (plain FLUX.1).
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


def kontext_branches(
    model: Flux, cond: KontextCond, uncond: KontextCond, x_ids: Tensor, *, batched: bool = True
):
    """``branches(x, sigma) -> (v_cond, v_uncond)``, the two guidance branches for target tokens at ``x_ids``: one
    forward of batch 2b (``batched``) or two forwards of batch b (diffusers' ``FluxKontextPipeline`` with
    ``true_cfg_scale`` > 1 runs the positive then the negative prompt, both with the distilled guidance and the
    same reference). ``uncond`` shares ``cond``'s reference and ids."""
    twice = lambda t: t if t is None or t.ndim == 2 else torch.cat([t, t])
    ref = None if cond.ref is None else torch.cat([cond.ref, uncond.ref])
    both = KontextCond(torch.cat([cond.txt, uncond.txt]), torch.cat([cond.y, uncond.y]), ref, twice(cond.ref_ids),
                       cond.guidance)  # fmt: skip

    def branches(x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
        if not batched:
            return kontext_velocity(model, x, x_ids, sigma, cond), kontext_velocity(
                model, x, x_ids, sigma, uncond
            )
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 1 and sigma.numel() > 1:
            sigma = torch.cat([sigma, sigma])
        v = kontext_velocity(model, torch.cat([x, x]), twice(x_ids), sigma, both)
        return v[: x.shape[0]], v[x.shape[0] :]

    return branches
