"""Token expansion (coarse -> 2x2 fine) and re-noising at resolution transitions.

Expansion. For a coarse latent X_c at noise level sigma with noise estimate
eps_c, the Haar coefficients of each 2x2 child block are

    gamma_0 = 2 X_c - sigma * eps_c          (the DC, from the coarse token)
    gamma_j = sigma * D_j, j = 1..3          (detail noise: the field's own Haar details, or fresh)

and the children are ``ihaar(gamma)``. If X_c = (1 - sigma) X0_c + sigma eps_c exactly, the children are
(1 - sigma) NN(X0_c) + sigma eps_f with eps_f ~ N(0, I): nearest-upsampled signal and exact flow-matching
noise statistics. The map gamma -> children is orthonormal, so it preserves energy. With field details the
same result is computed as NN(X_c - sigma/2 (eps_c + DC(E))) + sigma E, which is bit-exact where it must be:
expanding DC(E) at sigma = 1 returns E.

Re-noising rewinds progress e = 1 - sigma to s = e / (Z (1 - e) + e) (RALU's rewind, beta = s / e). Each re-noise
rule is a small strategy object with one verb, ``renoise(x, transition)``, like the expanders.

Shape legend: b batch, c channels, h w coarse pixels (latent pixels or token cells, per ``space``), n tokens,
k groups of replicated tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from samplers.field import NoiseField, dc, ihaar, upsample_nearest


def _to_cells(editor, x: Tensor, space: str) -> Tensor:
    """Latent (b, c, H, W) -> the grid the expansion acts on: latent pixels, or whole tokens as channel vectors
    (the editor's own packing, laid out on its token grid)."""
    if space == "spatial":
        return x
    h, w = x.shape[-2] // editor.patch, x.shape[-1] // editor.patch
    return rearrange(editor.pack(x), "b (h w) d -> b d h w", h=h, w=w)


def _from_cells(editor, x: Tensor, space: str) -> Tensor:
    if space == "spatial":
        return x
    return editor.unpack(rearrange(x, "b d h w -> b (h w) d"), tuple(x.shape[-2:]))


@dataclass(frozen=True)
class HaarExpander:
    """Energy-preserving orthogonal 2x2 expansion; DC from the coarse token, details from the noise field.

    eps: "tweedie" (the coarse noise estimate x + (1 - sigma) v from the last velocity) or "field" (DC(E)).
    details: "field" (E's own Haar details: coordinate-bound) or "fresh" (new noise from the seed).
    space: "spatial" (each latent pixel -> 2x2 latent pixels: true nearest geometry) or "token" (whole packed
    tokens -> 2x2 tokens, the RALU/Fresco geometry).
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

    def expand(
        self, editor, coarse: Tensor, sigma: float, eps_hat: Tensor | None, noise_field: NoiseField
    ) -> Tensor:
        """(b, c, h, w) coarse latent at ``sigma`` -> (b, c, 2h, 2w) fine latent."""
        fine_noise = noise_field.at(tuple(2 * s for s in coarse.shape[-2:]))
        cells = lambda t: _to_cells(editor, t, self.space)
        field_c = dc(cells(fine_noise))
        x_c = cells(coarse)
        eps = field_c if self.eps == "field" or eps_hat is None else cells(eps_hat)
        if self.details == "field":
            base = x_c - (sigma / 2) * (eps + field_c)
            return _from_cells(editor, upsample_nearest(base) + sigma * cells(fine_noise), self.space)
        # a salt per noise level (each transition draws its own details), distinct from the re-noise salts 1, 2
        noise = noise_field.fresh((x_c.shape[0], 3, *x_c.shape[1:]), salt=int(1e6 * sigma) + 17)
        coef = torch.cat([(2 * x_c - sigma * eps)[:, None], sigma * noise], 1)
        return _from_cells(editor, ihaar(coef), self.space)


@dataclass(frozen=True)
class ReplicateExpander:
    """RALU's upsampling: each packed token is copied to its 4 children (pair with :class:`RaluCorrelated`)."""

    def expand(
        self, editor, coarse: Tensor, sigma: float, eps_hat: Tensor | None, noise_field: NoiseField
    ) -> Tensor:
        return _from_cells(editor, upsample_nearest(_to_cells(editor, coarse, "token")), "token")


def rewind(e: float, z: float) -> float:
    """Progress after the rewind: s = e / (Z (1 - e) + e); Z = 1 keeps e, larger Z adds more noise."""
    if e <= 0.0:
        return 0.0
    return e / (z * (1.0 - e) + e)


@dataclass(frozen=True)
class Transition:
    """A resolution change, as a re-noise strategy sees it: tokens move from progress ``e`` back to ``s`` <= e.

    field_tokens: (b, n, c) the noise field at each token's own resolution. groups: (k, 4) indices of the
    tokens that were replicated from one parent (children of one coarse cell). z: the sampler's rewind factor.
    fresh: ``fresh(shape)`` draws extra standard-normal noise reproducibly from the edit's seed.
    """

    e: float
    s: float
    z: float
    field_tokens: Tensor
    groups: Tensor
    fresh: Callable[[tuple[int, ...]], Tensor]

    @property
    def beta(self) -> float:
        return self.s / self.e


@dataclass(frozen=True)
class CoherentField:
    """x <- beta x + (1 - beta) E_tok: exact when the state's implicit noise is the field itself."""

    min_z: float = 1.0

    def renoise(self, x: Tensor, t: Transition) -> Tensor:
        if t.e <= 0.0:
            return x
        return (t.beta * x.float() + (1 - t.beta) * t.field_tokens.float()).to(x.dtype)


@dataclass(frozen=True)
class IID:
    """x <- beta x + sqrt((1 - s)^2 - beta^2 (1 - e)^2) xi with fresh independent noise xi."""

    min_z: float = 1.0

    def renoise(self, x: Tensor, t: Transition) -> Tensor:
        if t.e <= 0.0:
            return x
        scale = max((1 - t.s) ** 2 - t.beta**2 * (1 - t.e) ** 2, 0.0) ** 0.5
        return (t.beta * x.float() + scale * t.fresh(tuple(x.shape)).float()).to(x.dtype)


@dataclass(frozen=True)
class NoRenoise:
    """Tokens keep their state: no rewind at all (the sampler then treats Z as 1)."""

    min_z: float = 1.0
    rewinds: bool = False

    def renoise(self, x: Tensor, t: Transition) -> Tensor:
        if t.e > 0.0 and abs(t.s - t.e) > 1e-9:
            raise ValueError(f"NoRenoise cannot rewind progress {t.e} to {t.s}; use Z = 1")
        return x


@dataclass(frozen=True)
class RaluCorrelated:
    """RALU: x <- beta x + (1 - s) n', where n' has covariance I - 11^T / Z^2 within each group of 4 replicated
    children and identity elsewhere, built from the field tokens. A valid covariance needs Z >= 2."""

    min_z: float = 2.0

    def renoise(self, x: Tensor, t: Transition) -> Tensor:
        if t.e <= 0.0:
            return x
        if t.z < self.min_z:
            raise ValueError(f"RaluCorrelated needs Z >= 2 for a valid covariance, got Z = {t.z}")
        n = t.field_tokens.float().clone()
        if t.groups.numel():
            idx = t.groups.flatten()
            groups = n[:, idx].unflatten(1, (-1, 4))  # (b, k, 4, c)
            # Sigma = I - 11^T/Z^2 has eigenvalue 1 - 4/Z^2 along the group mean and 1 orthogonal to it
            mean = groups.mean(2, keepdim=True)
            groups = groups + ((1 - 4 / t.z**2) ** 0.5 - 1) * mean
            n[:, idx] = groups.flatten(1, 2)
        return (t.beta * x.float() + (1 - t.s) * n).to(x.dtype)
