"""Perceptual discrepancy between two latents in VAE-decoder feature space (SpecEdit Eq. 6, SpotEdit's metric).

For each decoder tap, features are L2-normalised over channels per pixel; the squared distance summed over
channels (2 - 2 cos, so in [0, 4]) is resized to the latent grid (bilinear) and averaged over taps.
Token scores pool that latent-pixel map onto a token grid.

Shape legend: b batch, c channels, H W latent pixels, h w token cells.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def feature_distance(feats_a: dict[str, Tensor], feats_b: dict[str, Tensor], size: tuple[int, int]) -> Tensor:
    """Mean over taps of sum_c (norm(a) - norm(b))^2, each map resized to ``size``: (b, H, W) in [0, 4]."""
    if set(feats_a) != set(feats_b) or not feats_a:
        raise ValueError(f"feature taps differ or are empty: {sorted(feats_a)} vs {sorted(feats_b)}")
    maps = []
    for name, a in feats_a.items():
        b = feats_b[name]
        if a.shape != b.shape:
            raise ValueError(f"tap {name!r}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
        d = (F.normalize(a.float(), dim=1) - F.normalize(b.float(), dim=1)).pow(2).sum(1, keepdim=True)
        if tuple(d.shape[-2:]) != tuple(size):
            d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
        maps.append(d[:, 0])
    return torch.stack(maps).mean(0)


def pool_scores(score: Tensor, grid: tuple[int, int], mode: str = "mean") -> Tensor:
    """(b, H, W) latent-pixel scores -> (b, h, w) per token cell (mean or max over each cell's pixels)."""
    H, W = score.shape[-2:]
    h, w = grid
    if H % h or W % w:
        raise ValueError(f"score map {H}x{W} does not tile the {h}x{w} token grid")
    if mode == "mean":
        return F.avg_pool2d(score[:, None], (H // h, W // w))[:, 0]
    if mode == "max":
        return F.max_pool2d(score[:, None], (H // h, W // w))[:, 0]
    raise ValueError(f"pool mode must be 'mean' or 'max', got {mode!r}")


def normalize_scores(score: Tensor, mode: str = "none") -> Tensor:
    """'none' keeps the raw [0, 4] scale; 'minmax' maps each image to [0, 1]; 'max' divides by the maximum."""
    if mode == "none":
        return score
    flat = score.flatten(1)
    if mode == "minmax":
        lo, hi = flat.min(1).values, flat.max(1).values
        return (score - lo[:, None, None]) / (hi - lo).clamp_min(1e-12)[:, None, None]
    if mode == "max":
        return score / flat.max(1).values.clamp_min(1e-12)[:, None, None]
    raise ValueError(f"score_norm must be 'none', 'minmax' or 'max', got {mode!r}")


def dilate(mask: Tensor, radius: int) -> Tensor:
    """Grow a (b, h, w) bool mask by ``radius`` cells (square neighbourhood)."""
    if radius <= 0:
        return mask
    k = 2 * radius + 1
    return F.max_pool2d(mask[:, None].float(), k, stride=1, padding=radius)[:, 0] > 0
