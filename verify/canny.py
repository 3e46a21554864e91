"""Canny edge detection in torch (no OpenCV), matching ``cv2.Canny(gray, low, high)`` in its steps.

Sobel 3x3 gradients with the L1 magnitude |gx| + |gy| (OpenCV's default ``L2gradient=False``), non-maximum
suppression along four quantised directions, double thresholding and hysteresis by iterated 8-neighbour
dilation of the strong edges restricted to weak edges. Input is a (b, H, W) grayscale image on a 0..255
scale; output a (b, H, W) bool edge map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def sobel(gray: Tensor) -> tuple[Tensor, Tensor]:
    """x and y derivatives (b, H, W) with replicated borders."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=gray.device)
    k = torch.stack([kx, kx.t()])[:, None]
    g = F.conv2d(F.pad(gray[:, None].float(), (1, 1, 1, 1), mode="replicate"), k)
    return g[:, 0], g[:, 1]


def canny(gray: Tensor, low: float = 100.0, high: float = 200.0, max_iter: int | None = None) -> Tensor:
    """Edges of (b, H, W) grayscale images (0..255) with hysteresis thresholds ``low`` < ``high``."""
    if gray.ndim != 3:
        raise ValueError(f"canny expects (b, H, W) grayscale, got {tuple(gray.shape)}")
    gx, gy = sobel(gray)
    mag = gx.abs() + gy.abs()
    # quantise the gradient direction to 0, 45, 90, 135 degrees
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
    sector = torch.bucketize(angle, torch.tensor([22.5, 67.5, 112.5, 157.5], device=gray.device)) % 4
    padded = F.pad(mag[:, None], (1, 1, 1, 1))[:, 0]
    H, W = mag.shape[-2:]

    def shifted(dy: int, dx: int) -> Tensor:
        return padded[:, 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W]

    # neighbours across the edge for each sector (image rows grow downwards)
    pairs = [((0, -1), (0, 1)), ((-1, -1), (1, 1)), ((-1, 0), (1, 0)), ((-1, 1), (1, -1))]
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for s, (n1, n2) in enumerate(pairs):
        local = (mag > shifted(*n1)) & (mag >= shifted(*n2))
        keep |= (sector == s) & local
    nms = mag * keep
    strong = nms > high
    weak = nms > low
    edges = strong
    for _ in range(max_iter or int(math.isqrt(H * W)) * 4 + 4):
        grown = F.max_pool2d(edges[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0
        grown &= weak
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges
