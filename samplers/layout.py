"""Token layouts: where each target token of a (mixed-resolution) sequence sits.

A layout lists float (row, col) positions in units of a *frame* grid: the draft grid during the draft, the
coarse grid in the coarse and mixed stages, the fine grid in the last stage. A coarse token (u, v) sits at
(u, v); its 2x2 children at (u + a/2, v + b/2) (RALU's fractional ids), or with ``align="center"`` the
coarse token moves to (u + 1/4, v + 1/4), the centroid of its children. Each editor adapter turns a layout
into its own model's position ids.

In a mixed layout the tokens are ordered [coarse tokens kept, in raster order] then [children of the
expanded cells, cell by cell, children row-major]; :func:`mixed_indices` gives the index maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

Grid = tuple[int, int]


@dataclass(frozen=True, eq=False)
class Layout:
    """rows, cols: (n,) float positions in units of ``grid``; ``ref_factor`` is the reference's downsampling."""

    rows: Tensor
    cols: Tensor
    grid: Grid
    ref_factor: float = 1.0

    def __len__(self) -> int:
        return self.rows.numel()

    @classmethod
    def full(cls, grid: Grid, *, ref_factor: float = 1.0, offset: float = 0.0) -> Layout:
        h, w = grid
        rows = torch.arange(h, dtype=torch.float32).repeat_interleave(w) + offset
        cols = torch.arange(w, dtype=torch.float32).repeat(h) + offset
        return cls(rows, cols, grid, ref_factor)

    @classmethod
    def mixed(cls, expanded: Tensor, *, align: str = "topleft", ref_factor: float = 2.0) -> Layout:
        """Coarse grid cells, ``expanded`` (hc, wc) bool: kept cells stay coarse, expanded cells become 2x2."""
        if align not in ("topleft", "center"):
            raise ValueError(f"align must be 'topleft' or 'center', got {align!r}")
        hc, wc = expanded.shape
        keep, cells = mixed_cells(expanded)
        shift = 0.25 if align == "center" else 0.0
        u, v = (keep // wc).float() + shift, (keep % wc).float() + shift
        cu, cv = (cells // wc).float(), (cells % wc).float()
        a = torch.tensor([0.0, 0.0, 0.5, 0.5])
        b = torch.tensor([0.0, 0.5, 0.0, 0.5])
        rows = torch.cat([u, (cu[:, None] + a).flatten()])
        cols = torch.cat([v, (cv[:, None] + b).flatten()])
        return cls(rows, cols, (hc, wc), ref_factor)


def mixed_cells(expanded: Tensor) -> tuple[Tensor, Tensor]:
    """Flat indices of the kept coarse cells and of the expanded cells, both in raster order."""
    flat = expanded.flatten().cpu()
    return (~flat).nonzero().squeeze(1), flat.nonzero().squeeze(1)


def mixed_indices(expanded: Tensor) -> tuple[Tensor, Tensor]:
    """(kept coarse token indices on the coarse grid, children's indices on the fine grid), layout order."""
    hc, wc = expanded.shape
    keep, cells = mixed_cells(expanded)
    r, c = cells // wc, cells % wc
    a = torch.tensor([0, 0, 1, 1])
    b = torch.tensor([0, 1, 0, 1])
    children = ((2 * r[:, None] + a) * (2 * wc) + 2 * c[:, None] + b).flatten()
    return keep, children


def scaled_grid(grid: Grid, factor: float) -> Grid:
    """The grid ``factor`` times coarser (rounded, at least 1 x 1)."""
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    return max(1, round(grid[0] / factor)), max(1, round(grid[1] / factor))
