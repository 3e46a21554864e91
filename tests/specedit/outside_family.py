"""A model family registered from outside the package: the worked example of plugging in a new DiT editor.

Nothing here is imported by the library and nothing in the library names it. It brings its own network (a
tiny DiT over 1 x 1 latent patches, with its own flow-matching shift schedule), its own VAE decoder, its own
packing, an editor adapter and a cost model, and registers a :class:`~specedit.families.Family`; every named
method, ``specedit bench``'s FLOPs and the conformance suite then work on it.

Shape legend: b batch, c latent channels, H W latent pixels (= the token grid, patch 1), n tokens, d width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.init import randomized_module
from models.work import Costs, Forward, VaeWork
from samplers.field import area_resize
from samplers.layout import Layout, scaled_grid
from samplers.ntdm import fit_ntdm
from samplers.schedules import ShiftSchedule
from specedit.families import Family, register
from specedit.presets import SPLITS

SCHEDULE = ShiftSchedule(base_seq_len=16, max_seq_len=1024, base_shift=0.3, max_shift=0.9)
PATCH = 1
POS_FEATURES = 24  # sinusoidal features of (axis0, row, col)
FIT_TOKENS = 96  # the 8 x 12 grid of the tiny editor


# ----------------------------------------------------------------------------------------------- networks
@dataclass(frozen=True)
class TinyVAEConfig:
    z_channels: int = 3
    width: int = 8
    factor: int = 2  # image pixels per latent pixel


class TinyVAE(nn.Module):
    """A two-layer decoder with the taps verifiers ask for, and a matching pooled encoder."""

    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        self.config = config
        c, w = config.z_channels, config.width
        self.conv_in, self.mid, self.out = (
            nn.Conv2d(c, w, 3, padding=1),
            nn.Conv2d(w, w, 3, padding=1),
            nn.Conv2d(w, 3, 1),
        )
        self.enc = nn.Conv2d(3, c, 1)

    @property
    def latent_channels(self) -> int:
        return self.config.z_channels

    def _stages(self, z: Tensor):
        h = F.silu(self.conv_in(z))
        yield "conv_in", h
        h = F.silu(self.mid(h))
        yield "mid", h
        yield "up0", F.interpolate(h, scale_factor=self.config.factor, mode="nearest")

    def decoder_features(self, z: Tensor, taps: tuple[str, ...]) -> dict[str, Tensor]:
        return {name: h for name, h in self._stages(z) if name in taps}

    def decode(self, z: Tensor) -> Tensor:
        return torch.tanh(self.out(dict(self._stages(z))["up0"]))

    def encode(self, image: Tensor) -> Tensor:
        return self.enc(F.avg_pool2d(image, self.config.factor))


@dataclass(frozen=True)
class TinyDiTConfig:
    channels: int = 3 * PATCH * PATCH  # packed token channels
    width: int = 32
    heads: int = 2
    depth: int = 2
    cond_dim: int = 8


def fourier(pos: Tensor, dim: int) -> Tensor:
    """(n, 3) float positions -> (n, dim) sinusoidal features (dim divisible by 6)."""
    freqs = torch.exp(torch.arange(dim // 6, dtype=torch.float32) * (-math.log(100.0) / (dim // 6)))
    angles = pos[:, :, None].float() * freqs  # (n, 3, dim/6)
    return torch.cat([angles.sin(), angles.cos()], -1).flatten(1)


class TinyDiT(nn.Module):
    """Joint attention over [target tokens, reference tokens] with explicit float positions, modulated by the
    noise level and a condition vector; returns the target tokens' velocity. Its block stack is the models'
    hook point (``stack_hook``, see models.hooks), so feature caches serve it too."""

    stack_hook = None

    def __init__(self, config: TinyDiTConfig):
        super().__init__()
        self.config = config
        d = config.width
        self.img_in, self.pos_in = nn.Linear(config.channels, d), nn.Linear(POS_FEATURES, d)
        self.cond_in, self.out = nn.Linear(config.cond_dim + 1, d), nn.Linear(d, config.channels)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(d, config.heads, 2 * d, 0.0, batch_first=True)
                                    for _ in range(config.depth))  # fmt: skip

    def forward(
        self, x: Tensor, pos: Tensor, sigma: Tensor, cond: Tensor, ref: Tensor, ref_pos: Tensor
    ) -> Tensor:
        n = x.shape[1]
        tokens = torch.cat([x, ref.to(x.dtype).expand(x.shape[0], -1, -1)], 1)
        h = self.img_in(tokens) + self.pos_in(fourier(torch.cat([pos, ref_pos]), POS_FEATURES).to(x))
        h = h + self.cond_in(torch.cat([cond, sigma.expand(x.shape[0])[:, None]], 1).to(x))[:, None]

        def run(h: Tensor, none: Tensor) -> tuple[Tensor, Tensor]:  # one joint stream: the second is empty
            for block in self.blocks:
                h = block(h)
            return h, none

        h, _ = run(h, h[:, :0]) if self.stack_hook is None else self.stack_hook(run, h, h[:, :0])
        return self.out(h[:, :n])


# ----------------------------------------------------------------------------------------------- adapter
@dataclass(frozen=True)
class TinyCosts(Costs):
    """Analytic FLOPs of a TinyDiT forward (linear layers and attention, 2 x MACs); VAE work is priced by the
    shared base on the meta device."""

    model: TinyDiTConfig
    vae: TinyVAEConfig
    grid: tuple[int, int]

    vae_class = TinyVAE

    def stream_elements(self, work) -> int:
        rh, rw = scaled_grid(self.grid, work.ref_factor)
        return work.batch * (work.n_target + rh * rw) * self.model.width

    def forward(self, work: Forward) -> float:
        rh, rw = scaled_grid(self.grid, work.ref_factor)
        n, d, c = work.n_target + rh * rw, self.model.width, self.model.channels
        per_layer = n * (4 * d * d + 4 * d * d) + 2 * n * n * d
        return 2.0 * work.batch * (n * c * d + self.model.depth * per_layer + work.n_target * d * c)


@dataclass(eq=False)
class TinyEditor:
    """The SpecEdit adapter: tokens are single latent pixels; the reference follows the layout's level."""

    model: TinyDiT
    vae: TinyVAE
    cond: Tensor  # (b, cond_dim)
    source: Tensor  # (b, c, H, W)
    schedule: ShiftSchedule = SCHEDULE
    patch: int = PATCH
    _refs: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.grid = tuple(self.source.shape[-2:])
        self.costs = TinyCosts(self.model.config, self.vae.config, self.grid)

    def pack(self, latent: Tensor) -> Tensor:
        return rearrange(latent, "b c h w -> b (h w) c")

    def unpack(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        return rearrange(tokens, "b (h w) c -> b c h w", h=grid[0], w=grid[1])

    def reference(self, factor: float) -> tuple[Tensor, Tensor]:
        """The source ``factor`` times coarser per side as tokens, and their (1, row, col) positions."""
        if factor not in self._refs:
            rg = scaled_grid(self.grid, factor)
            rows, cols = torch.meshgrid(torch.arange(rg[0]), torch.arange(rg[1]), indexing="ij")
            ref_pos = torch.stack([torch.ones(rg[0] * rg[1]), rows.flatten(), cols.flatten()], -1).float()
            self._refs[factor] = (self.pack(area_resize(self.source, rg)), ref_pos)
        return self._refs[factor]

    def denoiser(self, layout: Layout):
        ref, ref_pos = self.reference(layout.ref_factor)
        pos = torch.stack([torch.zeros_like(layout.rows), layout.rows, layout.cols], -1)
        return lambda x, sigma: self.model(x, pos, torch.as_tensor(sigma).float(), self.cond, ref, ref_pos)

    def features(self, latent: Tensor, taps: tuple[str, ...]) -> dict[str, Tensor]:
        return self.vae.decoder_features(latent, taps)

    def decode(self, latent: Tensor) -> Tensor:
        return self.vae.decode(latent)

    def cost(self, work: Forward | VaeWork) -> float:
        return self.costs.cost(work)


def tiny_editor(batch: int = 1, seed: int = 0, grid: tuple[int, int] = (8, 12)) -> TinyEditor:
    model = randomized_module(lambda: TinyDiT(TinyDiTConfig()), seed=seed + 1, std=0.2)
    vae = randomized_module(lambda: TinyVAE(TinyVAEConfig()), seed=seed + 2, std=0.3)
    g = torch.Generator().manual_seed(seed)
    one = lambda *shape: torch.randn(1, *shape, generator=g).expand(batch, *shape).clone()
    return TinyEditor(model, vae, one(TinyDiTConfig.cond_dim), one(TinyVAEConfig.z_channels, *grid))


def costs(grid: tuple[int, int], *, text_tokens=None, ref_grid=None) -> TinyCosts:
    return TinyCosts(TinyDiTConfig(), TinyVAEConfig(), tuple(grid))


def _fit(nfe: int, h_ori: float):
    shifts, z, _ = fit_ntdm(*SPLITS[nfe], h_ori)
    return tuple(round(s, 3) for s in shifts), round(z, 3)


def make_family() -> Family:
    """The family record, with NT-DM fits of two splits (18 and 9 NFE) against this schedule."""
    h_ori = math.exp(SCHEDULE.mu(FIT_TOKENS))
    return Family(name="outside-tiny", schedule=SCHEDULE, patch=PATCH, vae_factor=TinyVAEConfig.factor,
                  fit_tokens=FIT_TOKENS, fitted={n: _fit(n, h_ori) for n in (18, 9)}, costs=costs,
                  tiny_editor=tiny_editor)  # fmt: skip


def register_outside() -> Family:
    return register(make_family())
