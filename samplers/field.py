"""The coordinate-bound noise field and the orthonormal 2x2 Haar transform on latent pixel blocks.

One full-resolution noise latent E ~ N(0, I) is drawn per edit. Every resolution reads its noise from E:
the coarse level is the Haar DC of 2x2 blocks (DC = sum / 2, unit variance), the draft level the DC of the
DC, and the 2x2 expansion puts E's own Haar details back. So the draft, the coarse stage and the full stage
are views of one trajectory's noise, and expanding pure noise at sigma = 1 returns E itself.

Haar on a block [[a, b], [c, d]] (row-major): DC = (a+b+c+d)/2, D1 = (a-b+c-d)/2 (horizontal),
D2 = (a+b-c-d)/2 (vertical), D3 = (a-b-c+d)/2 (diagonal). The matrix is symmetric and orthonormal, so it is
its own inverse.

Shape legend: b batch, c channels, h w pixels of the coarser grid (the finer one is 2h x 2w).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def haar(x: Tensor) -> Tensor:
    """(b, c, 2h, 2w) -> (b, 4, c, h, w) coefficients [DC, D1, D2, D3]."""
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"haar needs even height and width, got {tuple(x.shape[-2:])}")
    a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return torch.stack([a + b + c + d, a - b + c - d, a + b - c - d, a - b - c + d], 1) * 0.5


def ihaar(coef: Tensor) -> Tensor:
    """(b, 4, c, h, w) coefficients -> (b, c, 2h, 2w) pixels (inverse of :func:`haar`)."""
    g0, g1, g2, g3 = coef.unbind(1)
    blocks = (
        torch.stack([g0 + g1 + g2 + g3, g0 - g1 + g2 - g3, g0 + g1 - g2 - g3, g0 - g1 - g2 + g3], -1) * 0.5
    )
    b, c, h, w, _ = blocks.shape
    return blocks.view(b, c, h, w, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(b, c, 2 * h, 2 * w)


def dc(x: Tensor) -> Tensor:
    """Haar DC of 2x2 blocks, (b, c, 2h, 2w) -> (b, c, h, w): unit variance stays unit variance."""
    return (x[..., 0::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) * 0.5


def upsample_nearest(x: Tensor, factor: int = 2) -> Tensor:
    """Each pixel becomes a ``factor`` x ``factor`` block."""
    return x.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


def area_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Area (mean) resampling; exact block means when ``size`` divides the input."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.adaptive_avg_pool2d(x, size)


def _window_lengths(n_in: int, n_out: int) -> Tensor:
    """Window length of each output of ``adaptive_avg_pool`` along one axis."""
    i = torch.arange(n_out)
    return ((i + 1) * n_in + n_out - 1) // n_out - (i * n_in) // n_out


@dataclass(frozen=True, eq=False)
class NoiseField:
    """A full-resolution noise latent E and the noise every other resolution reads from it.

    ``fine`` is (b, c, H, W); ``seed`` derives the generators for any extra noise (fresh details, iid
    re-noise), so the whole edit stays reproducible.
    """

    fine: Tensor
    seed: int

    @classmethod
    def sample(cls, shape: tuple[int, ...], seed: int, *, device="cpu", dtype=torch.float32) -> NoiseField:
        """Draw E on a CPU generator (identical on every device), then move it."""
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randn(shape, generator=g).to(device=device, dtype=dtype), seed)

    def at(self, size: tuple[int, int]) -> Tensor:
        """Unit-variance noise at latent size ``size`` bound to the same coordinates.

        Power-of-two reductions are repeated Haar DCs (exactly consistent with :func:`ihaar` expansion);
        other sizes use area means, each rescaled by the square root of its window area.
        """
        x = self.fine
        H, W = x.shape[-2:]
        h, w = size
        while (
            (h, w) != (H, W) and H % 2 == 0 and W % 2 == 0 and h <= H // 2 and w <= W // 2 and H * w == W * h
        ):
            if (H // h) & (H // h - 1) or H % h:  # not a power-of-two reduction any more
                break
            x, H, W = dc(x), H // 2, W // 2
        if (h, w) == (H, W):
            return x
        # adaptive windows differ in size (and may overlap): scale each output by sqrt(its window area)
        area = _window_lengths(H, h)[:, None] * _window_lengths(W, w)[None]
        return area_resize(x, size) * area.to(x).sqrt()

    def generator(self, salt: int) -> torch.Generator:
        """A CPU generator for extra noise, derived from the field's seed and ``salt``."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + salt) % 2**63)

    def fresh(self, shape: tuple[int, ...], salt: int) -> Tensor:
        """Extra standard-normal noise, reproducible from the seed, on the field's device and dtype."""
        return torch.randn(shape, generator=self.generator(salt)).to(self.fine)
