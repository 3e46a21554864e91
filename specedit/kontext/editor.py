"""The FLUX.1-Kontext editor adapter: how SpecEdit talks to a Kontext model.

Kontext positions are (0, row, col) for target tokens in the units of the layout's frame grid (so coarse
and fractional child positions are just floats) and (1, row, col) for the reference on its own grid at the
requested level; text ids are 0. Several references follow the source in the image stream, placed by
``models.flux_kontext.reference_ids`` (ComfyUI's "offset" by default: axis 0 = 1, each next reference shifted
right of or below the ones before it), computed on each level's own grids. Guidance is the distilled
embedding: one forward per step; with a negative prompt, also true CFG as diffusers' ``FluxKontextPipeline``
(``v_neg + scale (v_pos - v_neg)``, no norm rescale): both branches in one forward of batch 2b by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from models import flux, flux_ae
from models.flux_kontext import (
    REFERENCE_METHODS,
    KontextCond,
    kontext_branches,
    kontext_denoiser,
    reference_ids,
)
from models.packing import pack, unpack
from models.work import Costs, Forecast, Forward, VaeWork
from samplers.guidance import cfg
from samplers.layout import Layout, scaled_grid
from samplers.schedules import FLUX_SCHEDULE, ShiftSchedule
from specedit.pipeline import check_inputs, check_references, packed_references


@dataclass(frozen=True)
class KontextCosts(Costs):
    """FLOPs of the work a Kontext edit records, from configs alone (works for meta-only budgets): a forward
    runs the event's target tokens plus every reference (the source, of the target's ``grid``, and the further
    ``ref_grids``) at the event's ``ref_factor``, with ``text_tokens``, once per CFG branch (``branches``: 2
    with true CFG, whose two branches run the same tokens)."""

    model: flux.FluxConfig
    vae: flux_ae.FluxAEConfig
    text_tokens: int
    grid: tuple[int, int]  # fine token grid of the target (= the source reference)
    ref_grids: tuple[tuple[int, int], ...] = ()  # further references
    branches: int = 1

    vae_class = flux_ae.AutoEncoder

    def image_tokens(self, n_target: int, ref_factor: float) -> int:
        refs = (self.grid, *self.ref_grids)
        return n_target + sum(g[0] * g[1] for g in (scaled_grid(r, ref_factor) for r in refs))

    def forward(self, work: Forward) -> float:
        n = self.image_tokens(work.n_target, work.ref_factor)
        return self.branches * flux.flops(self.model, n, self.text_tokens, work.batch)["total"]

    def stream_elements(self, work: Forecast) -> int:
        n = self.image_tokens(work.n_target, work.ref_factor) + self.text_tokens
        return self.branches * work.batch * n * self.model.hidden_size


@dataclass(eq=False)
class KontextEditor:
    """One Kontext edit: the model, its AE, prompt conditioning and the reference latents.

    txt: (b, l, 4096) T5 states; y: (b, 768) pooled CLIP; source: (b, 16, H, W) normalised latent of the image
    being edited (the first reference; it fixes the output size and SpecEdit verifies against it). refs:
    (1 or b, 16, H_k, W_k) latents of further references, in order (H_k, W_k even). neg_txt / neg_y: the
    negative prompt's (None: no true CFG); cfg_scale: true CFG scale; batched_cfg: both branches in one
    forward. ref_method: "offset" or "index" (``models.flux_kontext.reference_ids``).
    """

    model: flux.Flux
    ae: flux_ae.AutoEncoder
    txt: Tensor
    y: Tensor
    source: Tensor
    guidance: float = 2.5
    schedule: ShiftSchedule = FLUX_SCHEDULE
    refs: tuple[Tensor, ...] = ()
    neg_txt: Tensor | None = None
    neg_y: Tensor | None = None
    cfg_scale: float = 1.0
    batched_cfg: bool = True
    ref_method: str = "offset"
    _refs: dict = field(default_factory=dict, repr=False)

    def without_cfg(self):
        """The same edit without the true-CFG branch (a step-distilled model's setting)."""
        return replace(self, neg_txt=None, neg_y=None)

    patch = 2  # FLUX packs 2 x 2 latent pixels per token

    def __post_init__(self):
        H, W = self.source.shape[-2:]
        if H % 4 or W % 4:
            raise ValueError(f"source latent {H}x{W} must be a multiple of 4 (even coarse grid)")
        self.refs = tuple(self.refs)
        self._check_conditioning()
        self.grid = (H // 2, W // 2)
        ref_grids = tuple((r.shape[-2] // 2, r.shape[-1] // 2) for r in self.refs)
        branches = 1 if self.neg_txt is None else 2
        self.costs = KontextCosts(
            self.model.config, self.ae.config, self.txt.shape[1], self.grid, ref_grids, branches
        )

    def _check_conditioning(self) -> None:
        check_references(self.refs, self.source)
        tensors = {
            "txt": self.txt,
            "y": self.y,
            "source": self.source,
            "neg_txt": self.neg_txt,
            "neg_y": self.neg_y,
        }
        tensors.update({f"refs[{i}]": r for i, r in enumerate(self.refs)})
        check_inputs(
            self.model, self.source, tensors, {"guidance": self.guidance, "cfg_scale": self.cfg_scale}
        )
        if (self.neg_txt is None) != (self.neg_y is None):
            raise ValueError(
                "give both neg_txt and neg_y (the negative prompt's T5 and CLIP states) or neither"
            )
        if self.neg_txt is not None and (
            self.neg_txt.shape != self.txt.shape or self.neg_y.shape != self.y.shape
        ):
            raise ValueError(
                f"negative prompt states {tuple(self.neg_txt.shape)}, {tuple(self.neg_y.shape)} must match the "
                f"prompt's {tuple(self.txt.shape)}, {tuple(self.y.shape)}"
            )
        if self.ref_method not in REFERENCE_METHODS:
            raise ValueError(f"ref_method must be one of {REFERENCE_METHODS}, got {self.ref_method!r}")

    def reference(self, factor: float) -> tuple[Tensor, tuple[tuple[int, int], ...]]:
        """Packed tokens of every reference (the source, then ``refs``) at ``factor`` times coarser per side
        (area-downsampled), and their token grids."""
        if factor not in self._refs:
            self._refs[factor] = packed_references((self.source, *self.refs), factor, self.source.shape[0])
        return self._refs[factor]

    def ids(self, layout: Layout) -> Tensor:
        zeros = torch.zeros_like(layout.rows)
        return torch.stack([zeros, layout.rows, layout.cols], -1).to(self.source.device)

    def denoiser(self, layout: Layout):
        ref, grids = self.reference(layout.ref_factor)
        ids = reference_ids(grids, self.ref_method).to(ref.device)
        cond = KontextCond(txt=self.txt, y=self.y, ref=ref, ref_ids=ids, guidance=self.guidance)
        if self.neg_txt is None:
            return kontext_denoiser(self.model, cond, self.ids(layout))
        uncond = replace(cond, txt=self.neg_txt, y=self.neg_y)
        branches = kontext_branches(self.model, cond, uncond, self.ids(layout), batched=self.batched_cfg)
        return lambda x, sigma: cfg(*branches(x, sigma), self.cfg_scale)

    def features(self, latent: Tensor, taps: tuple[str, ...]) -> dict[str, Tensor]:
        return self.ae.decoder_features(latent, taps)

    def decode(self, latent: Tensor) -> Tensor:
        return self.ae.decode(latent)

    def pack(self, latent: Tensor) -> Tensor:
        return pack(latent)

    def unpack(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        return unpack(tokens, grid)

    def cost(self, work: Forward | VaeWork) -> float:
        return self.costs.cost(work)
