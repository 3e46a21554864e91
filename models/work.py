"""Units of model work and how they are priced: what samplers and verifiers record, what cost models count.

A run records one :class:`Forward` per transformer evaluation and one :class:`VaeWork` per batch of VAE decoder
work; a method's *plan* lists the same records without running anything, so a plan can be priced at full size
on the meta device and compared with a run record for record. :class:`EditShape` is what planning needs to
know of an edit: its fine token grid, the latent pixels per token side (the patch) and the batch.

Costs are FLOPs = 2 x MACs over every matmul, attention included. :class:`Costs` prices ``VaeWork`` by
counting the family's VAE with ``FlopCounterMode`` on the meta device (nothing allocated); each family prices
its own ``Forward`` (usually an analytic count checked against the meta counter in its tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.loading import build_on_meta

Grid = tuple[int, int]


@dataclass(frozen=True)
class EditShape:
    """grid: fine token grid (h, w); patch: latent pixels per token side; batch: samples edited together."""

    grid: Grid
    patch: int
    batch: int = 1

    def __post_init__(self):
        if min(self.grid) < 1 or self.patch < 1 or self.batch < 1:
            raise ValueError(f"EditShape needs a positive grid, patch and batch, got {self}")

    @property
    def latent(self) -> Grid:
        """Latent pixels (H, W) of the fine grid."""
        return self.patch * self.grid[0], self.patch * self.grid[1]

    @property
    def coarse(self) -> Grid:
        """The coarse cell grid: 2 x 2 fine tokens per cell."""
        return self.grid[0] // 2, self.grid[1] // 2

    @classmethod
    def of(cls, editor) -> EditShape:
        """The shape of an editor adapter (``grid``, ``patch`` and the source latent's batch)."""
        return cls(tuple(editor.grid), editor.patch, editor.source.shape[0])


@dataclass(frozen=True)
class Forward:
    """One transformer evaluation: ``n_target`` target tokens (batch ``batch``) in sampling ``stage``, with the
    reference image(s) ``ref_factor`` times coarser per side than the fine grid."""

    stage: str
    n_target: int
    ref_factor: float
    batch: int = 1

    @property
    def part(self) -> str:
        """Cost bucket: the stage (draft, coarse, mixed, full, stage1, ...)."""
        return self.stage


@dataclass(frozen=True)
class Forecast:
    """One cached step of a feature cache (``samplers.caching``): the same tokens as the :class:`Forward` it
    replaces, but the block stack's output streams are forecast from cached features with ``terms``
    multiply-adds per element instead of computed (the embedders and output layer, under 0.5 % of a forward,
    are not counted)."""

    stage: str
    n_target: int
    ref_factor: float
    batch: int = 1
    terms: int = 1

    @property
    def part(self) -> str:
        return self.stage


@dataclass(frozen=True)
class VaeWork:
    """VAE work on ``count`` latents of ``size`` (latent pixels): "decode" (the whole decoder), "features" (the
    decoder up to the deepest of ``taps``) or "encode" (``size`` is then the latent the image encodes to)."""

    op: str
    size: Grid
    taps: tuple[str, ...] = ()
    count: int = 1

    OPS: ClassVar[tuple[str, ...]] = ("decode", "features", "encode")

    def __post_init__(self):
        if self.op not in self.OPS:
            raise ValueError(f"VaeWork.op must be one of {self.OPS}, got {self.op!r}")

    @property
    def part(self) -> str:
        return "verifier"


def count_on_meta(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` whose tensors live on the meta device.

    On meta, scaled-dot-product attention decomposes into matmuls the counter sees; on real CPU tensors the
    counter has no formula for the CPU flash kernel, which is why counting happens on meta.
    """
    fc = FlopCounterMode(display=False)
    with fc, torch.no_grad():
        fn()
    return fc.get_total_flops()


@lru_cache(maxsize=256)
def vae_flops(vae_class: type, config: Any, op: str, size: Grid, taps: tuple[str, ...]) -> float:
    """FLOPs of one latent's ``op`` for ``vae_class(config)``, counted on the meta device.

    The class must expose ``latent_channels``, ``decode``, ``decoder_features(z, taps)`` and ``encode`` and an
    integer ``config.factor`` (pixels per latent pixel).
    """
    vae = build_on_meta(lambda: vae_class(config))
    with torch.device("meta"):
        if op == "encode":
            x = torch.empty(1, 3, config.factor * size[0], config.factor * size[1])
            return float(count_on_meta(lambda: vae.encode(x)))
        z = torch.empty(1, vae.latent_channels, *size)
    if op == "decode":
        return float(count_on_meta(lambda: vae.decode(z)))
    return float(count_on_meta(lambda: vae.decoder_features(z, taps)))


@dataclass(frozen=True)
class Costs:
    """Base of every family's cost model: prices :class:`VaeWork` with the family's VAE (``vae_class`` and the
    ``vae`` config field); a subclass prices :class:`Forward` in :meth:`forward`."""

    vae_class: ClassVar[type]

    def cost(self, work: Forward | Forecast | VaeWork) -> float:
        """FLOPs of one recorded or planned unit of work."""
        if isinstance(work, Forward):
            return self.forward(work)
        if isinstance(work, Forecast):
            return 2.0 * work.terms * self.stream_elements(work)
        if isinstance(work, VaeWork):
            return work.count * vae_flops(self.vae_class, self.vae, work.op, tuple(work.size), work.taps)
        raise TypeError(f"cannot price {work!r}: expected a Forward, a Forecast or a VaeWork")

    def forward(self, work: Forward) -> float:
        raise NotImplementedError(f"{type(self).__name__} must price Forward work")

    def stream_elements(self, work: Forecast) -> int:
        """Elements of the block stack's output streams (tokens x width x batch x CFG branches) in ``work``."""
        raise NotImplementedError(f"{type(self).__name__} cannot price cached steps (no stream_elements)")
