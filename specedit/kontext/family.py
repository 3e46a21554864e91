"""The FLUX.1-Kontext family record: fits, cost model, benchmark sizes, tiny and random-weight editors.

``FITTED``: NT-DM fits (``samplers.ntdm.fit_ntdm(steps, ends, h_ori, z_bounds=(1, 100))``) of the stage shifts
and rewind Z for each SpecEdit split, against FLUX.1-Kontext's full-resolution shift at 1024^2
(h_ori = e^1.15 = 3.158, 4096 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from models import flux, flux_ae
from models.init import random_module, randomized_module
from samplers.schedules import FLUX_SCHEDULE
from specedit.families import Distilled, Family, ModelEntry
from specedit.kontext.editor import KontextCosts, KontextEditor
from specedit.kontext.flops import flops_report
from specedit.kontext.pipeline import KontextPipeline

FITTED = {
    30: ((10.0, 2.882, 2.376), 9.086),
    18: ((5.813, 2.248, 2.601), 4.437),
    11: ((5.641, 2.257, 2.174), 3.592),
    9: ((7.363, 2.943, 2.770), 6.322),
}


@dataclass(frozen=True)
class KontextSize:
    """A model size to benchmark: transformer and AE configs and the text length."""

    model: flux.FluxConfig
    ae: flux_ae.FluxAEConfig
    text_tokens: int


SIZES = {
    "full": KontextSize(flux.FLUX_KONTEXT_DEV, flux_ae.FLUX_AE, 512),
    # a CPU size: d = 512 with 4 + 8 blocks, a quarter-width AE, small text features
    "mid": KontextSize(
        replace(flux.FLUX_KONTEXT_DEV, hidden_size=512, num_heads=8, axes_dim=(8, 28, 28), depth=4,
                depth_single_blocks=8, context_in_dim=256, vec_in_dim=64),
        replace(flux_ae.FLUX_AE, ch=32),
        32,
    ),
    "tiny": KontextSize(replace(flux.FLUX_TINY, in_channels=64, out_channels=64),
                        replace(flux_ae.FLUX_AE_TINY, z_channels=16), 8),
}  # fmt: skip


def costs(grid: tuple[int, int], *, text_tokens: int | None = None, ref_grid=None,
          cfg: bool = True) -> KontextCosts:  # fmt: skip
    """Full-size FLUX.1-Kontext-dev costs at a fine token grid (512 T5 tokens; the reference is the target's
    size, as the pipeline edits in place)."""
    if ref_grid is not None and tuple(ref_grid) != tuple(grid):
        raise ValueError(f"FLUX.1-Kontext edits in place: the reference grid {ref_grid} must equal {grid}")
    size = SIZES["full"]
    return KontextCosts(size.model, size.ae, text_tokens or size.text_tokens, grid)


def random_editor(config: str, height: int, width: int, *, device="cpu", dtype=torch.float32,
                  seed: int = 0, cfg: bool = True) -> KontextEditor:  # fmt: skip
    """A Kontext editor with random weights (std 0.02, norm scales 1) at size ``config`` and random
    conditioning, for latency benchmarks."""
    size = SIZES[config]
    model = random_module(lambda: flux.Flux(size.model), device=device, dtype=dtype, seed=seed)
    ae = random_module(lambda: flux_ae.AutoEncoder(size.ae), device=device, dtype=dtype, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    rand = lambda *shape: torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    f = size.ae.factor
    source = rand(1, size.ae.z_channels, height // f, width // f)
    txt, y = rand(1, size.text_tokens, size.model.context_in_dim), rand(1, size.model.vec_in_dim)
    return KontextEditor(model, ae, txt, y, source)


def tiny_editor(batch: int = 1, seed: int = 0, grid: tuple[int, int] = (8, 8)) -> KontextEditor:
    """A tiny random FLUX.1-Kontext editor (8 x 8 fine tokens, 4 latent channels) for tests."""
    model = randomized_module(lambda: flux.Flux(flux.FLUX_TINY), seed=seed + 1)
    ae = randomized_module(lambda: flux_ae.AutoEncoder(flux_ae.FLUX_AE_TINY), seed=seed + 2)
    g = torch.Generator().manual_seed(seed)
    one = lambda *shape: torch.randn(1, *shape, generator=g).expand(batch, *shape).clone()
    source = one(ae.latent_channels, 2 * grid[0], 2 * grid[1])
    return KontextEditor(
        model, ae, one(5, flux.FLUX_TINY.context_in_dim), one(flux.FLUX_TINY.vec_in_dim), source
    )


# FLUX.1-Kontext-Lightning (the paper's Table 7: 8 and 6 NFE from one 8-step student) keeps the base model's
# schedule and its distilled guidance; no published file name is known, so none is recognised by name.
DISTILLED = Distilled(steps={8: 8, 6: 8})

FAMILY = Family(
    name="kontext",
    models={"flux-kontext-dev": ModelEntry("black-forest-labs/FLUX.1-Kontext-dev")},
    schedule=FLUX_SCHEDULE,
    patch=2,
    vae_factor=8,
    fit_tokens=4096,
    fitted=FITTED,
    costs=costs,
    tiny_editor=tiny_editor,
    random_editor=random_editor,
    bench_configs=tuple(SIZES),
    flops_report=flops_report,
    pipeline=KontextPipeline,
    distilled=DISTILLED,
)
