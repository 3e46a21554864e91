"""A tiny random FLUX.1-Kontext editor for SpecEdit tests (8x8 fine token grid, 4 latent channels)."""

import torch
from refs import randomize_

from models.flux import FLUX_TINY, Flux
from models.flux_ae import FLUX_AE_TINY, AutoEncoder
from specedit.kontext.editor import KontextEditor


def tiny_editor(batch: int = 1, grid: tuple[int, int] = (8, 8), seed: int = 0) -> KontextEditor:
    g = torch.Generator().manual_seed(seed)
    model = randomize_(Flux(FLUX_TINY), seed=seed + 1).eval()
    ae = randomize_(AutoEncoder(FLUX_AE_TINY), seed=seed + 2).eval()
    source = torch.randn(1, 4, 2 * grid[0], 2 * grid[1], generator=g).expand(batch, -1, -1, -1).clone()
    txt = torch.randn(1, 5, 24, generator=g).expand(batch, -1, -1).clone()
    y = torch.randn(1, 20, generator=g).expand(batch, -1).clone()
    return KontextEditor(model, ae, txt, y, source)
