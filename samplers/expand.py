"""Token expansion (coarse -> 2x2 fine) and re-noising at resolution transitions.

Expansion (research memo section 4.6). For a coarse latent X_c at noise level sigma with noise estimate
eps_c, the Haar coefficients of each 2x2 child block are

    gamma_0 = 2 X_c - sigma * eps_c          (the DC, from the coarse token)
    gamma_j = sigma * D_j, j = 1..3          (detail noise: the field's own Haar details, or fresh)

and the children are ``ihaar(gamma)``. If X_c = (1 - sigma) X0_c + sigma eps_c exactly, the children are
(1 - sigma) NN(X0_c) + sigma eps_f with eps_f ~ N(0, I): nearest-upsampled signal and exact flow-matching
noise statistics. The map gamma -> children is orthonormal, so it preserves energy. With field details the
same result is computed as NN(X_c - sigma/2 (eps_c + DC(E))) + sigma E, which is bit-exact where it must be:
expanding DC(E) at sigma = 1 returns E.

Re-noising rewinds progress e = 1 - sigma to s = e / (Z (1 - e) + e) (RALU's rewind, beta = s / e).

Shape legend: b batch, c channels, h w coarse pixels (latent pixels or token cells, per ``space``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from samplers.field import NoiseField, dc, ihaar, upsample_nearest

RENOISE_MODES = ("coherent_field", "iid", "none", "ralu_correlated")


def _to_cells(x: Tensor, space: str) -> Tensor:
    """Latent (b, c, 2h, 2w) -> the grid the expansion acts on: latent pixels, or packed-token cells."""
    if space == "spatial":
        return x
    return rearrange(x, "b c (h ph) (w pw) -> b (c ph pw) h w", ph=2, pw=2)


def _from_cells(x: Tensor, space: str) -> Tensor:
    if space == "spatial":
        return x
    return rearrange(x, "b (c ph pw) h w -> b c (h ph) (w pw)", ph=2, pw=2)


@dataclass(frozen=True)
class HaarExpander:
    """Energy-preserving orthogonal 2x2 expansion; DC from the coarse token, details from the noise field.

    eps: "tweedie" (the coarse noise estimate x + (1 - sigma) v from the last velocity) or "field" (DC(E)).
    details: "field" (E's own Haar details: coordinate-bound) or "fresh" (new noise from the seed).
    space: "spatial" (each latent pixel -> 2x2 latent pixels: true nearest geometry) or "token" (whole 64-d
    packed tokens -> 2x2 tokens, the RALU/Fresco geometry).
    """

    eps: str = "tweedie"
    details: str = "field"
    space: str = "spatial"

    def __post_init__(self):
        for name, value, options in (
            ("eps", self.eps, ("tweedie", "field")),
            ("details", self.details, ("field", "fresh")),
            ("space", self.space, ("spatial", "token")),
        ):
            if value not in options:
                raise ValueError(f"HaarExpander.{name} must be one of {options}, got {value!r}")

    def expand(self, coarse: Tensor, sigma: float, eps_hat: Tensor | None, field: NoiseField) -> Tensor:
        """(b, c, h, w) coarse latent at ``sigma`` -> (b, c, 2h, 2w) fine latent."""
        fine_noise = field.at(tuple(2 * s for s in coarse.shape[-2:]))
        field_c = dc(_to_cells(fine_noise, self.space))
        x_c = _to_cells(coarse, self.space)
        eps = field_c if self.eps == "field" or eps_hat is None else _to_cells(eps_hat, self.space)
        if self.details == "field":
            base = x_c - (sigma / 2) * (eps + field_c)
            return _from_cells(upsample_nearest(base) + sigma * _to_cells(fine_noise, self.space), self.space)
        noise = field.fresh((x_c.shape[0], 3, *x_c.shape[1:]), salt=int(1e6 * sigma) + 17)
        coef = torch.cat([(2 * x_c - sigma * eps)[:, None], sigma * noise], 1)
        return _from_cells(ihaar(coef), self.space)


@dataclass(frozen=True)
class ReplicateExpander:
    """RALU's upsampling: each packed token is copied to its 4 children (pair with ``ralu_correlated``)."""

    def expand(self, coarse: Tensor, sigma: float, eps_hat: Tensor | None, field: NoiseField) -> Tensor:
        return _from_cells(upsample_nearest(_to_cells(coarse, "token")), "token")


def rewind(e: float, z: float) -> float:
    """Progress after the rewind: s = e / (Z (1 - e) + e); Z = 1 keeps e, larger Z adds more noise."""
    if e <= 0.0:
        return 0.0
    return e / (z * (1.0 - e) + e)


def renoise(
    x: Tensor,
    e: float,
    s: float,
    mode: str,
    *,
    field_tokens: Tensor,
    replicated: Tensor | None = None,
    z: float = 1.0,
    fresh: Tensor | None = None,
) -> Tensor:
    """Move tokens ``x`` (b, n, c) from progress ``e`` to ``s`` <= e.

    coherent_field: x <- beta x + (1 - beta) E_tok, E_tok the field at each token's own resolution; exact when
      the state's implicit noise is the field.
    iid: x <- beta x + sqrt((1-s)^2 - beta^2 (1-e)^2) xi with independent xi (``fresh``).
    none: x unchanged (requires s == e).
    ralu_correlated: x <- beta x + (1 - s) n', where n' has covariance I - 11^T / Z^2 within each block of 4
      replicated children (``replicated``: (n,) bool, children stored as consecutive groups of 4) and identity
      elsewhere; built from ``field_tokens``.
    """
    if mode not in RENOISE_MODES:
        raise ValueError(f"renoise mode must be one of {RENOISE_MODES}, got {mode!r}")
    if mode == "none" or e <= 0.0:
        if mode == "none" and abs(s - e) > 1e-9:
            raise ValueError(f"renoise 'none' cannot rewind progress {e} to {s}; use Z = 1")
        return x
    beta = s / e
    xf = x.float()
    if mode == "coherent_field":
        out = beta * xf + (1 - beta) * field_tokens.float()
    elif mode == "iid":
        if fresh is None:
            raise ValueError("renoise 'iid' needs fresh noise")
        scale = max((1 - s) ** 2 - beta**2 * (1 - e) ** 2, 0.0) ** 0.5
        out = beta * xf + scale * fresh.float()
    else:
        if z < 2.0:
            raise ValueError(f"ralu_correlated needs Z >= 2 for a valid covariance, got Z = {z}")
        n = field_tokens.float().clone()
        if replicated is not None and bool(replicated.any()):
            idx = replicated.nonzero().squeeze(1)
            groups = n[:, idx].unflatten(1, (-1, 4))  # (b, blocks, 4, c)
            # Sigma = I - 11^T/Z^2 has eigenvalue 1 - 4/Z^2 along the block mean and 1 orthogonal to it
            mean = groups.mean(2, keepdim=True)
            groups = groups + ((1 - 4 / z**2) ** 0.5 - 1) * mean
            n[:, idx] = groups.flatten(1, 2)
        out = beta * xf + (1 - s) * n
    return out.to(x.dtype)
