"""Tiled VAE decode and encode for large images: overlapping tiles, linearly blended.

A latent of h x w is cut into tiles of ``tile`` x ``tile`` latent pixels whose neighbours overlap by
``overlap`` (the last tile of a row or column is moved back to end at the border, so it may overlap more).
Each tile is decoded on its own (``f`` x the pixels out) and the tiles are summed with weights that are 1
inside a tile and ramp linearly across each overlap with a neighbour, normalised by the summed weights: in
an overlap of two tiles the weights are ``(j + 0.5) / n`` and ``1 - (j + 0.5) / n``, so the blend is a
partition of unity (as diffusers' ``AutoencoderKL.tiled_decode`` blends, there over a fixed overlap).
Encoding cuts the image at the same latent positions times ``f`` and blends the latent tiles.

A tile sees only its own pixels, so the decoders' convolutions and mid-block attention differ from the
untiled run near tile borders; the overlap hides most of it (``benchmarks/vae_tiling.py`` measures the
difference). Peak activation memory follows the tile, not the image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start positions of the tiles along an axis of ``size`` (one tile when ``size`` <= ``tile``)."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def ramps(size: int, starts: list[int], tile: int) -> list[Tensor]:
    """Each tile's 1-D blend weights (length min(tile, size)) along an axis with tiles at ``starts``."""
    out = []
    for k, a in enumerate(starts):
        b = min(a + tile, size)
        w = torch.ones(b - a)
        if k > 0:  # rise across the overlap with the previous tile
            n = starts[k - 1] + tile - a
            w[:n] = torch.minimum(w[:n], (torch.arange(n) + 0.5) / n)
        if k + 1 < len(starts):  # fall across the overlap with the next tile
            n = b - starts[k + 1]
            w[b - a - n :] = torch.minimum(w[b - a - n :], 1 - (torch.arange(n) + 0.5) / n)
        out.append(w)
    return out


def tiled(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, scale_in: int, scale_out: int
          ) -> Tensor:  # fmt: skip
    """``fn`` over overlapping tiles of ``x`` (b, c, scale_in*h, scale_in*w), blended: positions and ``tile``,
    ``overlap`` count units of ``scale_in`` input / ``scale_out`` output pixels."""
    h, w = x.shape[-2] // scale_in, x.shape[-1] // scale_in
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    if len(rows) == len(cols) == 1:
        return fn(x)
    wr, wc = ramps(h, rows, tile), ramps(w, cols, tile)
    out = total = None
    for r, row_w in zip(rows, wr):
        for c, col_w in zip(cols, wc):
            th, tw = len(row_w), len(col_w)
            piece = fn(x[..., scale_in * r : scale_in * (r + th), scale_in * c : scale_in * (c + tw)])
            weight = (row_w[:, None] * col_w[None]).repeat_interleave(scale_out, 0)
            weight = weight.repeat_interleave(scale_out, 1).to(piece.device, torch.float32)
            if out is None:
                shape = (*piece.shape[:-2], scale_out * h, scale_out * w)
                out = torch.zeros(shape, device=piece.device, dtype=torch.float32)
                total = torch.zeros(shape[-2:], device=piece.device, dtype=torch.float32)
            ys, xs = slice(scale_out * r, scale_out * (r + th)), slice(scale_out * c, scale_out * (c + tw))
            out[..., ys, xs] += piece.float() * weight
            total[ys, xs] += weight
    return (out / total).to(piece.dtype)


class TiledVAE(nn.Module):
    """``vae`` (``models.flux_ae.AutoEncoder`` or ``models.qwen_image_vae.QwenImageVAE``) whose ``decode`` and
    ``encode`` run on tiles of ``tile`` latent pixels overlapping by ``overlap`` (default ``tile // 4``);
    inputs that fit one tile run untiled. ``config``, ``latent_channels`` and ``decoder_features`` are the
    vae's (features are not tiled)."""

    def __init__(self, vae: nn.Module, tile: int, overlap: int | None = None):
        super().__init__()
        overlap = tile // 4 if overlap is None else overlap
        check_tiling(tile, overlap)
        self.vae, self.tile, self.overlap = vae, tile, overlap
        self.config = vae.config

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    def decode(self, latent: Tensor) -> Tensor:
        """As ``vae.decode``, tile by tile (a 5-D single-frame latent gives a 5-D image)."""
        z, video = (latent[:, :, 0], True) if latent.ndim == 5 else (latent, False)
        f = self.config.factor
        x = tiled(self.vae.decode, z, self.tile, self.overlap, 1, f)
        return x[:, :, None] if video else x

    def encode(self, image: Tensor, **kwargs) -> Tensor:
        """As ``vae.encode``, tile by tile (sizes are checked by the vae on each tile and on the whole)."""
        x, video = (image[:, :, 0], True) if image.ndim == 5 else (image, False)
        f = self.config.factor
        if x.ndim != 4 or x.shape[-2] % f or x.shape[-1] % f:
            return self.vae.encode(image, **kwargs)  # the vae's own error
        z = tiled(lambda t: self.vae.encode(t, **kwargs), x, self.tile, self.overlap, f, 1)
        return z[:, :, None] if video else z

    def decoder_features(self, latent: Tensor, *args, **kwargs):
        return self.vae.decoder_features(latent, *args, **kwargs)

    def forward(self, latent: Tensor) -> Tensor:
        return self.decode(latent)


def check_tiling(tile, overlap) -> None:
    """One-line errors for a bad tile size (latent pixels, >= 2) or overlap (0 <= overlap <= tile // 2)."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 2:
        raise ValueError(f"vae tile must be an integer >= 2 latent pixels, got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap <= tile // 2:
        raise ValueError(f"vae tile overlap must be an integer in [0, {tile // 2}], got {overlap!r}")
