"""Latent <-> token packing and position-id builders shared by the FLUX and Qwen-Image families.

Both families pack a latent (b, c, H, W) into 2x2 patches: token (i, j) holds channels ``c*4 + dy*2 + dx`` of
latent pixels (2i + dy, 2j + dx). A *grid* is the (h, w) of the packed token grid, i.e. (H/2, W/2). Other patch
sizes pack the same way (``patch``).

Shape legend: b batch, c latent channels, h w token grid, n tokens, l text tokens.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

Grid = tuple[int, int]


def pack(latent: Tensor, patch: int = 2) -> Tensor:
    """(b, c, H, W) latent -> (b, (H/p)(W/p), c p p) tokens of ``patch`` x ``patch`` latent pixels."""
    if latent.ndim != 4:
        raise ValueError(f"pack expects a (b, c, H, W) latent, got shape {tuple(latent.shape)}")
    H, W = latent.shape[-2:]
    if H % patch or W % patch:
        raise ValueError(f"latent height and width must be multiples of {patch} to pack, got {H}x{W}")
    return rearrange(latent, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=patch, pw=patch)


def unpack(tokens: Tensor, grid: Grid, patch: int = 2) -> Tensor:
    """(b, h*w, c p p) tokens on ``grid`` = (h, w) -> (b, c, p h, p w) latent."""
    h, w = grid
    if tokens.ndim != 3 or tokens.shape[1] != h * w or tokens.shape[2] % (patch * patch):
        raise ValueError(f"cannot unpack tokens of shape {tuple(tokens.shape)} onto a {h}x{w} grid")
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=patch, pw=patch)


def grid_of(height: int, width: int, *, vae_factor: int = 8, patch: int = 2) -> Grid:
    """Packed token grid of an image of ``height`` x ``width`` pixels (VAE /``vae_factor``, then patches)."""
    step = patch * vae_factor
    if height <= 0 or width <= 0 or height % step or width % step:
        raise ValueError(f"image size {height}x{width} must be positive multiples of {step} px")
    return height // step, width // step


def grid_ids(grid: Grid, *, axis0: float = 0.0, scale: float = 1.0, offset: float = 0.0) -> Tensor:
    """(h*w, 3) float ids (axis0, offset + scale*row, offset + scale*col), row-major.

    ``scale``/``offset`` place a grid in another grid's units (e.g. coarse tokens on the fine grid).
    """
    h, w = grid
    rows = torch.arange(h, dtype=torch.float32) * scale + offset
    cols = torch.arange(w, dtype=torch.float32) * scale + offset
    ids = torch.empty(h, w, 3)
    ids[..., 0] = axis0
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(h * w, 3)
