"""The Qwen-Image-Edit editor adapter: how SpecEdit talks to a Qwen-Image-Edit (or Edit-2509) model.

Positions are Qwen-Image's MSRoPE ids (frame, row, col), evaluated at float ids, so coarse grids and
fractional children need no model change:

- target tokens: frame 0; a layout position (row, col) in units of its frame grid (h, w) becomes the centred
  (row - (h - h//2), col - (w - w//2)). On even grids a child at u + a/2 then sits at exactly half its fine
  centred coordinate, so the mixed stage places children where the full stage will put them.
- reference k = 1, 2, ...: frame k, its own grid (area-downsampled by the layout's ``ref_factor``), centred.
- text token j: (m + j) on all three axes, m = max(h//2, w//2) over the target frame grid and the reference
  grids at that level (the coarse extent in the coarse and mixed stages).

On full grids these are exactly ``models.qwen_image.official_ids``. Guidance is Qwen's true CFG (per-token
norm rescale) with both branches on the same image token set: one forward of twice the batch by default.

Image stream order: [target, *refs, source]. ``source`` is the reference SpecEdit verifies against and whose
size is the output size: for Edit the one input image, for Edit-2509 the *last* input image (the pipeline
takes the output size from the last image); ``refs`` are the other input images in input order.

Shape legend: b batch, z latent channels, H W latent pixels of the source, h w its token grid (H/2, W/2),
l text tokens, c DiT text width.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import Tensor

from models import qwen_image, qwen_image_vae
from models.packing import pack, unpack
from models.work import Costs, Forecast, Forward, VaeWork
from samplers.guidance import Prompt, guided_denoiser
from samplers.layout import Layout, scaled_grid
from samplers.schedules import QWEN_SCHEDULE, ShiftSchedule
from specedit.pipeline import check_inputs, check_references, packed_references

Grid = tuple[int, int]


@dataclass(frozen=True)
class QwenCosts(Costs):
    """FLOPs of the work a Qwen-Image-Edit edit records, from configs alone (works for meta-only budgets).

    A forward counts every CFG branch with its own text length (``neg_text_tokens`` None: no CFG); the padded
    text slots of the batched CFG forward are not counted. Image tokens are the forward's target tokens plus
    every reference at its ``ref_factor``. VAE work is counted on the decoder *as we run it* (the exact 2-D
    network; the 3-D reference also multiplies the zero-padded temporal taps); a full decode equals
    ``models.qwen_image_vae.flops``.
    """

    model: qwen_image.QwenImageConfig
    vae: qwen_image_vae.QwenImageVAEConfig
    text_tokens: int
    neg_text_tokens: int | None
    grid: Grid  # fine token grid of the target (= the source)
    ref_grids: tuple[Grid, ...]  # token grids of every reference in stream order (source last)

    vae_class = qwen_image_vae.QwenImageVAE

    def image_tokens(self, n_target: int, ref_factor: float) -> int:
        return n_target + sum(g[0] * g[1] for g in (scaled_grid(r, ref_factor) for r in self.ref_grids))

    def forward(self, work: Forward) -> float:
        n = self.image_tokens(work.n_target, work.ref_factor)
        return sum(qwen_image.flops(self.model, n, l, work.batch)["total"] for l in self._lengths())

    def stream_elements(self, work: Forecast) -> int:
        n = self.image_tokens(work.n_target, work.ref_factor)
        return sum(work.batch * (n + l) * self.model.hidden_size for l in self._lengths())

    def _lengths(self) -> list[int]:
        """Text length of each CFG branch."""
        return [self.text_tokens] + ([] if self.neg_text_tokens is None else [self.neg_text_tokens])


def centred(pos: Tensor, n: int) -> Tensor:
    """Qwen-Image's centred coordinate of a (float) position on an axis of ``n`` tokens."""
    return pos - (n - n // 2)


@dataclass(eq=False)
class QwenEditor:
    """One Qwen-Image-Edit edit: the model, its VAE, both prompts' embeddings and the reference latents.

    txt: (b, l, c) Qwen2.5-VL states of the prompt (image tokens included), txt_mask (b, l) or None (all
    real); neg_txt / neg_mask: the negative prompt's (None disables CFG: one branch, one forward).
    source: (b, z, H, W) normalised latent of the source image (last input image), H and W multiples of 4.
    refs: (b or 1, z, H_k, W_k) normalised latents of the other input images, in input order.
    batched_cfg: both CFG branches in one forward of batch 2b (False: two forwards, the pipelines' way).
    """

    model: qwen_image.QwenImage
    vae: qwen_image_vae.QwenImageVAE
    txt: Tensor
    source: Tensor
    txt_mask: Tensor | None = None
    neg_txt: Tensor | None = None
    neg_mask: Tensor | None = None
    refs: tuple[Tensor, ...] = ()
    cfg_scale: float = 4.0
    batched_cfg: bool = True
    schedule: ShiftSchedule = QWEN_SCHEDULE
    _refs: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        mc, z = self.model.config, self.vae.config.z_dim
        if self.source.ndim != 4 or self.source.shape[1] != z or 4 * z != mc.in_channels:
            raise ValueError(
                f"source must be (b, {z}, H, W) for a VAE of {z} channels and a DiT of {mc.in_channels} "
                f"packed channels, got {tuple(self.source.shape)}"
            )
        b, _, H, W = self.source.shape
        if H % 4 or W % 4:
            raise ValueError(f"source latent {H}x{W} must be a multiple of 4 (even token grid)")
        self.refs = tuple(self.refs)
        check_references(self.refs, self.source)
        tensors = {"txt": self.txt, "neg_txt": self.neg_txt, "source": self.source}
        tensors.update({f"refs[{i}]": r for i, r in enumerate(self.refs)})
        check_inputs(self.model, self.source, tensors, {"cfg_scale": self.cfg_scale})
        for name, t, m in (("txt", self.txt, self.txt_mask), ("neg_txt", self.neg_txt, self.neg_mask)):
            if t is None:
                if m is not None:
                    raise ValueError(f"{name} is None but its mask is given")
                continue
            if t.ndim != 3 or t.shape[0] != b or t.shape[-1] != mc.joint_attention_dim:
                raise ValueError(f"{name} must be ({b}, l, {mc.joint_attention_dim}), got {tuple(t.shape)}")
            if m is not None and tuple(m.shape) != tuple(t.shape[:2]):
                raise ValueError(f"{name} mask must be {tuple(t.shape[:2])}, got {tuple(m.shape)}")
        self.grid = (H // 2, W // 2)
        self.ref_grids = tuple((r.shape[-2] // 2, r.shape[-1] // 2) for r in (*self.refs, self.source))
        self.costs = QwenCosts(
            self.model.config,
            self.vae.config,
            self.txt.shape[1],
            None if self.neg_txt is None else self.neg_txt.shape[1],
            self.grid,
            self.ref_grids,
        )

    def reference(self, factor: float) -> tuple[Tensor, tuple[Grid, ...]]:
        """Packed tokens of every reference ``factor`` times coarser per side (area-downsampled), in stream
        order, and their grids."""
        if factor not in self._refs:
            self._refs[factor] = packed_references((*self.refs, self.source), factor, self.source.shape[0])
        return self._refs[factor]

    def ids(self, layout: Layout, txt_len: int | None = None) -> tuple[Tensor, Tensor]:
        """(image ids (n + n_refs, 3): target then references, text ids (txt_len, 3)) for ``layout``.

        ``txt_len`` defaults to the conditional prompt's length; text ids are a prefix-consistent ramp, so a
        shorter (or padded) prompt takes the first ``l`` rows.
        """
        h, w = layout.grid
        rows, cols = centred(layout.rows, h), centred(layout.cols, w)
        parts, m = [torch.stack([torch.zeros_like(rows), rows, cols], -1)], max(h // 2, w // 2)
        for k, (rh, rw) in enumerate(self.reference(layout.ref_factor)[1], start=1):
            r = centred(torch.arange(rh, dtype=torch.float32), rh)
            c = centred(torch.arange(rw, dtype=torch.float32), rw)
            grid = torch.stack(torch.meshgrid(torch.full((1,), float(k)), r, c, indexing="ij"), -1)
            parts.append(grid.reshape(-1, 3))
            m = max(m, rh // 2, rw // 2)
        n = self.txt.shape[1] if txt_len is None else txt_len
        txt = (m + torch.arange(n, dtype=torch.float32))[:, None].expand(-1, 3).contiguous()
        device = self.source.device
        return torch.cat(parts).to(device), txt.to(device)

    def denoiser(self, layout: Layout):
        refs, _ = self.reference(layout.ref_factor)
        img_ids, txt_ids = self.ids(layout)
        branch = partial(qwen_image.target_velocity, self.model, refs=refs, img_ids=img_ids)
        cond = Prompt(self.txt, txt_ids, self.txt_mask)
        if self.neg_txt is None:
            return lambda x, sigma: branch(x, sigma, *cond)
        _, neg_ids = self.ids(layout, self.neg_txt.shape[1])
        uncond = Prompt(self.neg_txt, neg_ids, self.neg_mask)
        return guided_denoiser(branch, cond, uncond, self.cfg_scale, batched=self.batched_cfg)

    def features(self, latent: Tensor, taps: tuple[str, ...]) -> dict[str, Tensor]:
        return self.vae.decoder_features(latent.to(_dtype(self.vae)), taps)

    def decode(self, latent: Tensor) -> Tensor:
        """(b, z, H, W) normalised latent -> (b, 3, 8H, 8W) image in [-1, 1]."""
        return self.vae.decode(latent.to(_dtype(self.vae)))

    def without_cfg(self):
        """The same edit without the true-CFG branch (a step-distilled model's setting)."""
        return replace(self, neg_txt=None, neg_mask=None)

    patch = 2  # Qwen-Image packs 2 x 2 latent pixels per token

    def pack(self, latent: Tensor) -> Tensor:
        return pack(latent)

    def unpack(self, tokens: Tensor, grid: Grid) -> Tensor:
        return unpack(tokens, grid)

    def cost(self, work: Forward | VaeWork) -> float:
        return self.costs.cost(work)


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
