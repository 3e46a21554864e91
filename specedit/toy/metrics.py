"""Image and token-set metrics for the toy editor's demo and eval: PSNR, SSIM, coarse masks, IoU.

Images are (b, 3, H, W) in [-1, 1] (peak-to-peak 2). Region versions take a pixel mask (b, H, W) or (H, W)
bool and average over its pixels only; an empty region gives nan. Token sets are boolean cell masks
(b, hc, wc). Every function returns one value per sample, shape (b,), float32 on the inputs' device.

Shape legend: b batch, H W pixels, hc wc coarse token cells.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

PEAK = 2.0  # [-1, 1] images
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _check_images(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"images must be two (b, c, H, W) tensors of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")  # fmt: skip


def _pixel_mask(mask: Tensor | None, a: Tensor) -> Tensor:
    """(b, 1, H, W) float weights: ones, or the given pixel mask broadcast over the batch."""
    b, _, h, w = a.shape
    if mask is None:
        return a.new_ones(b, 1, h, w)
    mask = torch.as_tensor(mask, device=a.device)
    if mask.ndim == 2:
        mask = mask.expand(b, -1, -1)
    if mask.ndim != 3 or tuple(mask.shape[-2:]) != (h, w) or mask.shape[0] not in (1, b):
        raise ValueError(f"mask must be (H, W) or (b, H, W) = ({h}, {w}) or ({b}, {h}, {w}), "
                         f"got {tuple(mask.shape)}")  # fmt: skip
    return mask.expand(b, -1, -1)[:, None].to(torch.float32)


def _masked_mean(x: Tensor, weights: Tensor) -> Tensor:
    """Per-sample mean of (b, c, H, W) ``x`` over the pixels of ``weights`` (b, 1, H, W); nan if empty."""
    num = (x * weights).sum((1, 2, 3))
    den = weights.sum((1, 2, 3)) * x.shape[1]
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, math.nan))


def mse(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """(b,) mean squared error over all channels of the whole image or the ``mask`` region."""
    _check_images(a, b)
    return _masked_mean((a.float() - b.float()) ** 2, _pixel_mask(mask, a))


def psnr(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """(b,) PSNR in dB of [-1, 1] images (peak-to-peak 2): inf where identical, nan for an empty region."""
    return 10 * torch.log10(PEAK**2 / mse(a, b, mask))


def _gaussian(size: int, sigma: float, device) -> Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(a: Tensor, b: Tensor, *, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """(b, c, H, W) per-pixel SSIM (Wang et al. 2004): Gaussian window, K1 = 0.01, K2 = 0.03, L = 2.

    The local statistics are computed with reflect padding, so the map has the image's size and a region
    average needs no cropping."""
    _check_images(a, b)
    a, b = a.float(), b.float()
    c = a.shape[1]
    g = _gaussian(window, sigma, a.device)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window)
    pad = window // 2

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (pad,) * 4, mode="reflect"), kernel, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * PEAK) ** 2, (0.03 * PEAK) ** 2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def ssim(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """(b,) SSIM (11 x 11 Gaussian window, sigma 1.5), the per-pixel map averaged over the image or region."""
    return _masked_mean(ssim_map(a, b), _pixel_mask(mask, a))


def coarse_mask(pixel_mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """(b, hc, wc) bool: the cells of ``grid`` that contain any pixel of ``pixel_mask`` (b, H, W) or (H, W)."""
    m = torch.as_tensor(pixel_mask)
    if m.ndim == 2:
        m = m[None]
    hc, wc = grid
    if m.ndim != 3 or m.shape[1] % hc or m.shape[2] % wc:
        raise ValueError(f"pixel mask {tuple(m.shape)} does not divide into a {hc} x {wc} grid of cells")
    b, h, w = m.shape
    return m.bool().reshape(b, hc, h // hc, wc, w // wc).any(4).any(2)


def _cells(pred: Tensor, true: Tensor) -> tuple[Tensor, Tensor]:
    pred, true = torch.as_tensor(pred).bool(), torch.as_tensor(true).bool()
    if pred.ndim == 2:
        pred = pred[None]
    if true.ndim == 2:
        true = true[None]
    if pred.shape[-2:] != true.shape[-2:]:
        raise ValueError(f"cell masks must share the grid, got {tuple(pred.shape)} and {tuple(true.shape)}")
    pred, true = torch.broadcast_tensors(pred, true.to(pred.device))
    return pred.flatten(1), true.flatten(1)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    num, den = num.float(), den.float()
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, math.nan))


def iou(pred: Tensor, true: Tensor) -> Tensor:
    """(b,) intersection over union of two (b, hc, wc) cell masks; nan when both are empty."""
    p, t = _cells(pred, true)
    return _ratio((p & t).sum(1), (p | t).sum(1))


def precision(pred: Tensor, true: Tensor) -> Tensor:
    """(b,) share of the predicted cells that are true; nan when nothing is predicted."""
    p, t = _cells(pred, true)
    return _ratio((p & t).sum(1), p.sum(1))


def recall(pred: Tensor, true: Tensor) -> Tensor:
    """(b,) share of the true cells that are predicted; nan when nothing is true."""
    p, t = _cells(pred, true)
    return _ratio((p & t).sum(1), t.sum(1))
