"""Fidelity without a judge: how close an accelerated edit is to the same model's full-step edit.

Each method's output is compared with the reference method's output (the 50-step baseline) of the same item,
seed and size: PSNR and SSIM over the whole image and over the *unchanged region*, and the agreement of the
verifier's mask with the *changed region*.

Changed region (the rule): the pixels where the reference output differs from the source at the working size.
The per-pixel difference is the mean absolute difference over R, G, B in [0, 1], averaged over a 5 x 5 box
around the pixel (so JPEG-grain and VAE round-trip noise of single pixels does not count); a pixel is changed
where that exceeds 0.1. A verifier cell counts as changed when any pixel inside it is. The unchanged region is
the rest; for a global edit (style, tone) it is often empty, and its scores are then undefined (None).

Both images are compared as the 8-bit images saved to disk, so a resumed run scores exactly as an
uninterrupted one. Shape legend: H W pixels, hc wc verifier cells.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from specedit.toy import metrics

CHANGE_THRESHOLD = 0.1  # mean |RGB difference| in [0, 1] above which a pixel counts as changed
CHANGE_WINDOW = 5  # side of the box that averages the difference


def as_tensor(image) -> Tensor:
    """A PIL image or (H, W, 3) uint8 array -> (1, 3, H, W) float32 in [-1, 1] (the metrics' range)."""
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            f"expected an RGB image or an (H, W, 3) uint8 array, got {array.dtype} {array.shape}"
        )
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def changed_region(reference, source) -> Tensor:
    """(H, W) bool: where the reference output differs from the source (see the module docstring)."""
    ref, src = as_tensor(reference), as_tensor(source)
    if ref.shape != src.shape:
        raise ValueError(
            f"reference {tuple(ref.shape[-2:])} and source {tuple(src.shape[-2:])} differ in size"
        )
    diff = (ref - src).abs().mean(1, keepdim=True) / 2  # (1, 1, H, W) in [0, 1]
    pad = CHANGE_WINDOW // 2
    smooth = F.avg_pool2d(F.pad(diff, (pad,) * 4, mode="replicate"), CHANGE_WINDOW, stride=1)
    return smooth[0, 0] > CHANGE_THRESHOLD


def _value(x: Tensor) -> float | None:
    v = float(x.reshape(-1)[0])
    return v if np.isfinite(v) else None


def fidelity(output, reference, region: Tensor) -> dict[str, float | None]:
    """PSNR (dB) and SSIM of ``output`` against ``reference``, whole and outside ``region`` (H, W) bool."""
    out, ref = as_tensor(output), as_tensor(reference)
    if out.shape != ref.shape:
        raise ValueError(
            f"output {tuple(out.shape[-2:])} and reference {tuple(ref.shape[-2:])} differ in size"
        )
    keep = ~region
    return {
        "psnr": _value(metrics.psnr(out, ref)),
        "ssim": _value(metrics.ssim(out, ref)),
        "psnr_unchanged": _value(metrics.psnr(out, ref, keep)),
        "ssim_unchanged": _value(metrics.ssim(out, ref, keep)),
    }


def region_cells(region: Tensor, grid: tuple[int, int]) -> Tensor:
    """(hc, wc) bool: the verifier cells holding any changed pixel. Sizes that do not divide into the grid are
    first resized to the nearest multiple (nearest-neighbour)."""
    hc, wc = grid
    h, w = region.shape
    if h % hc or w % wc:
        size = (max(hc, round(h / hc) * hc), max(wc, round(w / wc) * wc))
        region = F.interpolate(region[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5
    return metrics.coarse_mask(region, grid)[0]


def mask_agreement(mask: Tensor, region: Tensor) -> dict[str, float | None]:
    """IoU, precision and recall of the verifier's (hc, wc) mask against the changed region's cells."""
    true = region_cells(region, tuple(mask.shape))
    pred = mask.bool().cpu()[None]
    return {
        "mask_iou": _value(metrics.iou(pred, true[None])),
        "mask_precision": _value(metrics.precision(pred, true[None])),
        "mask_recall": _value(metrics.recall(pred, true[None])),
    }
