"""The FLUX.1-Kontext editor adapter: how SpecEdit talks to a Kontext model.

Kontext positions are (0, row, col) for target tokens in the units of the layout's frame grid (so coarse
and fractional child positions are just floats) and (1, row, col) for the reference on its own grid at the
requested level; text ids are 0. Guidance is the distilled embedding: one forward per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor

from models import flux, flux_ae
from models.flux_kontext import KontextCond, kontext_denoiser
from models.loading import build_on_meta
from models.packing import grid_ids, pack
from samplers.field import area_resize
from samplers.layout import Layout, scaled_grid
from samplers.schedules import FLUX_SCHEDULE, ShiftSchedule
from specedit.costs import count_on_meta


@dataclass(frozen=True)
class KontextCosts:
    """FLOPs of the events a Kontext edit records, from configs alone (works for meta-only budgets)."""

    model: flux.FluxConfig
    ae: flux_ae.FluxAEConfig
    text_tokens: int
    grid: tuple[int, int]  # fine token grid of the target (= the reference)
    batch: int = 1

    def cost(self, event: dict) -> float:
        kind = event["kind"]
        if kind == "forward":
            rh, rw = scaled_grid(self.grid, event["ref_factor"])
            n = event["n_target"] + rh * rw
            return flux.flops(self.model, n, self.text_tokens, self.batch)["total"]
        if kind == "features":
            return event.get("count", 1) * _ae_flops(self.ae, tuple(event["size"]), tuple(event["taps"]))
        if kind == "decode":
            return event.get("count", 1) * _ae_flops(self.ae, tuple(event["size"]), None)
        raise ValueError(f"unknown cost event kind {kind!r}")


@lru_cache(maxsize=64)
def _ae_flops(cfg: flux_ae.FluxAEConfig, size: tuple[int, int], taps: tuple[str, ...] | None) -> float:
    """Decoder FLOPs for one latent of ``size``: the feature taps only, or a full decode (taps None)."""
    ae = build_on_meta(lambda: flux_ae.AutoEncoder(cfg))
    with torch.device("meta"):
        z = torch.empty(1, cfg.z_channels, *size)
    if taps is None:
        return float(count_on_meta(lambda: ae.decode(z)))
    return float(count_on_meta(lambda: ae.decoder_features(z, taps)))


@dataclass(eq=False)
class KontextEditor:
    """One Kontext edit: the model, its AE, prompt conditioning and the source latent.

    txt: (b, l, 4096) T5 states; y: (b, 768) pooled CLIP; source: (b, 16, H, W) normalised source latent
    (the reference, which also fixes the output size).
    """

    model: flux.Flux
    ae: flux_ae.AutoEncoder
    txt: Tensor
    y: Tensor
    source: Tensor
    guidance: float = 2.5
    schedule: ShiftSchedule = FLUX_SCHEDULE
    _refs: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        H, W = self.source.shape[-2:]
        if H % 4 or W % 4:
            raise ValueError(f"source latent {H}x{W} must be a multiple of 4 (even coarse grid)")
        self.grid = (H // 2, W // 2)
        self.costs = KontextCosts(
            self.model.config, self.ae.config, self.txt.shape[1], self.grid, self.source.shape[0]
        )

    def reference(self, factor: float) -> tuple[Tensor, tuple[int, int]]:
        """Packed reference tokens at ``factor`` times coarser per side (area-downsampled), and their grid."""
        if factor not in self._refs:
            grid = scaled_grid(self.grid, factor)
            self._refs[factor] = (pack(area_resize(self.source, (2 * grid[0], 2 * grid[1]))), grid)
        return self._refs[factor]

    def ids(self, layout: Layout) -> Tensor:
        zeros = torch.zeros_like(layout.rows)
        return torch.stack([zeros, layout.rows, layout.cols], -1).to(self.source.device)

    def denoiser(self, layout: Layout):
        ref, ref_grid = self.reference(layout.ref_factor)
        cond = KontextCond(
            txt=self.txt,
            y=self.y,
            ref=ref,
            ref_ids=grid_ids(ref_grid, axis0=1.0).to(ref.device),
            guidance=self.guidance,
        )
        return kontext_denoiser(self.model, cond, self.ids(layout))

    def features(self, latent: Tensor, taps: tuple[str, ...]) -> dict[str, Tensor]:
        return self.ae.decoder_features(latent, taps)

    def decode(self, latent: Tensor) -> Tensor:
        return self.ae.decode(latent)

    def cost(self, event: dict) -> float:
        return self.costs.cost(event)
