"""Verifiers: which coarse token cells to compute at full resolution.

Every verifier has one verb, ``verify(editor, candidate) -> Verdict``. ``candidate`` is a clean latent of the
edit at any resolution (SpecEdit's 16x draft, or the coarse stage-1 estimate for the ablations and the
baselines); ``editor`` supplies the source latent (``source``), the coarse grid (``grid`` halved) and, where
needed, decoder features (``features(latent, taps)``) and decoding (``decode(latent)``). A verdict's ``events``
list the VAE work done (:class:`~models.work.VaeWork`), for cost accounting.

Each verifier also plans its own work without running: ``plan(shape, fraction) -> VerifierPlan`` gives the VAE
work a run records and the expanded fraction it realises, where ``fraction`` is the assumed outcome of a
data-dependent rule (a threshold); ``with_budget(fraction)`` turns a data-dependent rule into a fixed budget
(the same verifier where the count is already fixed).

Shape legend: b batch, c latent channels, H W latent pixels, hc wc coarse token cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from models.work import EditShape, VaeWork
from verify.canny import canny
from verify.discrepancy import dilate, feature_distance, normalize_scores, pool_scores


@dataclass
class Verdict:
    """mask: (b, hc, wc) cells to expand (T_exp); edit: the semantic part (T_edit) before the uniform union;
    score: (b, hc, wc) per-cell score; events: the VAE work done."""

    mask: Tensor
    edit: Tensor | None = None
    score: Tensor | None = None
    events: list[VaeWork] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        """Expanded fraction of the coarse cells (first sample)."""
        return float(self.mask[0].float().mean())


@dataclass(frozen=True)
class VerifierPlan:
    """What a verifier will do on an edit of a given shape: its VAE work and the expanded fraction."""

    work: list[VaeWork]
    fraction: float


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value}")


def _count_fraction(grid: tuple[int, int], fraction: float) -> float:
    """The fraction a top-k rule of ``int(n * fraction)`` cells realises on ``grid``."""
    n = grid[0] * grid[1]
    return int(n * fraction) / n


def uniform_fraction(grid: tuple[int, int], k: int | None) -> float:
    """Share of ``grid`` in the uniform set of stride ``k`` (0 for None)."""
    if k is None:
        return 0.0
    return math.ceil(grid[0] / k) * math.ceil(grid[1] / k) / (grid[0] * grid[1])


def coarse_grid(editor) -> tuple[int, int]:
    h, w = editor.grid
    return h // 2, w // 2


def uniform_cells(grid: tuple[int, int], k: int | None, batch: int, device) -> Tensor:
    """(b, hc, wc) uniform set {i mod k = 0, j mod k = 0}; all False when k is None."""
    mask = torch.zeros(grid, dtype=torch.bool)
    if k is not None:
        if k < 1:
            raise ValueError(f"uniform stride k must be >= 1 or None, got {k}")
        mask = (torch.arange(grid[0])[:, None] % k == 0) & (torch.arange(grid[1])[None] % k == 0)
    return mask.to(device).expand(batch, -1, -1)


def _upsample(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    if mode == "bilinear":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    raise ValueError(f"upsample must be 'bilinear' or 'nearest', got {mode!r}")


@dataclass(frozen=True)
class FeatureVerifier:
    """SpecEdit's verifier: decoder-feature discrepancy (Eq. 6) of the candidate against the source.

    tau: threshold on the (normalised) cell score. taps: decoder feature maps compared. score_norm: "none"
    (raw [0, 4] scale), "minmax" or "max". upsample: how the candidate reaches the source resolution.
    reference: "full" compares with the source itself; "roundtrip" with the source downsampled to the
    candidate's size and upsampled back, which cancels the pure loss of resolution. pool: "mean" or "max"
    over each coarse cell's latent pixels. dilation: grow the edit set by this many cells.
    uniform: stride k of the uniform set joined to the edit set (None: semantic set only). semantic: False
    drops the edit set (uniform-only ablation; then no candidate is needed). budget: instead of the threshold,
    expand a fixed fraction of the cells: the uniform set first, then the highest-scoring cells (a fixed-cost
    variant, also what benchmarks at a given expanded fraction use). buckets: static token budgets for compiled
    sampling: the threshold rule's count (edit set and uniform set) is rounded up to the smallest of these
    fractions that holds it, and the extra cells are the next highest-scoring ones, so an edit of a given size
    runs one of ``len(buckets)`` mixed-stage shapes (e.g. ``STATIC_BUCKETS``). None: the exact threshold.
    """

    tau: float = 0.75
    taps: tuple[str, ...] = ("conv_in", "mid", "up0")
    score_norm: str = "none"
    upsample: str = "bilinear"
    reference: str = "full"
    pool: str = "mean"
    dilation: int = 0
    uniform: int | None = 3
    semantic: bool = True
    budget: float | None = None
    buckets: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.buckets is not None:
            if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[-1] != 1.0:
                raise ValueError(f"buckets must be increasing fractions ending at 1.0, got {self.buckets}")
            for b in self.buckets:
                _check_fraction("buckets", b)
        for name, value, options in (("reference", self.reference, ("full", "roundtrip")),
                                     ("upsample", self.upsample, ("bilinear", "nearest")),
                                     ("pool", self.pool, ("mean", "max"))):  # fmt: skip
            if value not in options:
                raise ValueError(f"FeatureVerifier.{name} must be one of {options}, got {value!r}")
        normalize_scores(torch.zeros(1, 1, 1), self.score_norm)  # validates the mode
        top = (
            4.0 if self.score_norm == "none" else 1.0
        )  # Eq. 6 scores lie in [0, 4]; normalised ones in [0, 1]
        if not 0.0 <= self.tau <= top:  # also rejects NaN
            raise ValueError(
                f"tau must lie in [0, {top:g}] for score_norm {self.score_norm!r}, got {self.tau}"
            )
        if not self.taps:
            raise ValueError("FeatureVerifier.taps must name at least one decoder feature map")
        if self.dilation < 0 or (self.uniform is not None and self.uniform < 1):
            raise ValueError(
                f"need dilation >= 0 and uniform >= 1 or None, got {self.dilation}, {self.uniform}"
            )
        if self.budget is not None:
            _check_fraction("budget", self.budget)

    @property
    def needs_candidate(self) -> bool:
        return self.semantic

    def bucket(self, fraction: float) -> float:
        """The smallest of ``buckets`` that holds ``fraction`` of the cells."""
        return next(b for b in self.buckets if b >= fraction - 1e-9)

    def with_budget(self, fraction: float) -> FeatureVerifier:
        """The same verifier expanding a fixed ``fraction`` (top scores) instead of thresholding."""
        return replace(self, budget=fraction) if self.semantic else self

    def plan(self, shape: EditShape, fraction: float) -> VerifierPlan:
        if not self.semantic:
            return VerifierPlan([], uniform_fraction(shape.coarse, self.uniform))
        work = [VaeWork("features", shape.latent, self.taps, 2 * shape.batch)]
        if self.budget is None:
            return VerifierPlan(work, fraction if self.buckets is None else self.bucket(fraction))
        n = shape.coarse[0] * shape.coarse[1]
        given = round(uniform_fraction(shape.coarse, self.uniform) * n)
        return VerifierPlan(work, max(round(self.budget * n), given) / n)

    def verify(self, editor, candidate: Tensor | None) -> Verdict:
        source = editor.source
        grid = coarse_grid(editor)
        uniform = uniform_cells(grid, self.uniform, source.shape[0], source.device)
        if not self.semantic:
            return Verdict(mask=uniform.clone(), edit=torch.zeros_like(uniform))
        if candidate is None:
            raise ValueError(
                "FeatureVerifier(semantic=True) needs a candidate latent (a draft or an estimate)"
            )
        size = tuple(source.shape[-2:])
        up = _upsample(candidate.to(source), size, self.upsample)
        ref = source
        if self.reference == "roundtrip":
            down = F.adaptive_avg_pool2d(source, tuple(candidate.shape[-2:]))
            ref = _upsample(down, size, self.upsample)
        feats = editor.features(torch.cat([up, ref]), self.taps)
        b = source.shape[0]
        score = feature_distance(
            {k: v[:b] for k, v in feats.items()}, {k: v[b:] for k, v in feats.items()}, size
        )
        cells = normalize_scores(pool_scores(score, grid, self.pool), self.score_norm)
        if self.budget is None:
            edit = dilate(cells > self.tau, self.dilation)
            if self.buckets is not None:  # round the count up to a bucket with the next best cells
                count = int((edit | uniform).flatten(1).sum(1).max())
                fraction = self.bucket(count / cells[0].numel())
                edit = edit | _top_cells(torch.where(edit, torch.inf, cells), uniform, fraction)
        else:
            edit = _top_cells(cells, uniform, self.budget)
        events = [VaeWork("features", size, self.taps, 2 * b)]
        return Verdict(mask=edit | uniform, edit=edit, score=cells, events=events)


STATIC_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.75, 1.0)  # expanded fractions of FeatureVerifier(buckets=...)


def _top_cells(score: Tensor, given: Tensor, fraction: float) -> Tensor:
    """(b, hc, wc) cells completing ``given`` to ``fraction`` of all cells, highest ``score`` first."""
    b = score.shape[0]
    n = score[0].numel()
    k = max(0, round(fraction * n) - int(given[0].sum()))
    ranked = torch.where(given, torch.full_like(score, -torch.inf), score.nan_to_num(0.0)).flatten(1)
    edit = torch.zeros(b, n, dtype=torch.bool, device=score.device)
    edit.scatter_(1, ranked.topk(k, dim=1).indices, True)
    return edit.view_as(given)


@dataclass(frozen=True)
class FixedVerifier:
    """Expand everything (``expand=True``) or nothing: the degenerate ends used by invariants and ablations."""

    expand: bool = True

    needs_candidate = False

    def with_budget(self, fraction: float) -> FixedVerifier:
        return self

    def plan(self, shape: EditShape, fraction: float) -> VerifierPlan:
        return VerifierPlan([], float(self.expand))

    def verify(self, editor, candidate: Tensor | None) -> Verdict:
        grid = coarse_grid(editor)
        mask = torch.full((editor.source.shape[0], *grid), self.expand, dtype=torch.bool)
        return Verdict(mask=mask.to(editor.source.device), edit=mask.clone())


@dataclass(frozen=True)
class CannyVerifier:
    """RALU's region selection: Canny edges on a half-resolution decode of the coarse estimate, top-k cells.

    The candidate (the coarse stage-1 estimate) is decoded as is, i.e. at half resolution. Gray is computed on
    the [-1, 1] decode without rescaling, then clipped to [0, 1] and scaled to 0..255 (RALU's quirk: everything
    below mid-grey is black). Edge pixels are counted per coarse cell; ``up_ratio`` of the cells with the most
    edges are expanded (ties broken by a tiny seeded jitter, well below one edge pixel). low / high: the
    Canny hysteresis thresholds on the 0..255 grey image (RALU's 100 and 200).
    """

    up_ratio: float = 0.3
    low: float = 100.0
    high: float = 200.0

    needs_candidate = True

    def __post_init__(self):
        _check_fraction("CannyVerifier.up_ratio", self.up_ratio)
        if not 0.0 <= self.low <= self.high:
            raise ValueError(f"Canny thresholds need 0 <= low <= high, got low={self.low}, high={self.high}")

    def with_budget(self, fraction: float) -> CannyVerifier:
        return self

    def plan(self, shape: EditShape, fraction: float) -> VerifierPlan:
        """A decode of the coarse estimate (half the fine latent per side) and its fixed top-k share."""
        coarse_latent = (shape.patch * shape.coarse[0], shape.patch * shape.coarse[1])
        work = [VaeWork("decode", coarse_latent, (), shape.batch)]
        return VerifierPlan(work, _count_fraction(shape.coarse, self.up_ratio))

    def verify(self, editor, candidate: Tensor | None) -> Verdict:
        if candidate is None:
            raise ValueError("CannyVerifier needs the coarse stage-1 estimate")
        image = editor.decode(candidate)
        r, g, b_ = image.float().unbind(1)
        gray = ((0.299 * r + 0.587 * g + 0.114 * b_).clamp(0, 1) * 255).round()
        edges = canny(gray, self.low, self.high).float()
        grid = coarse_grid(editor)
        counts = (
            pool_scores(edges, grid, "mean") * (edges.shape[-2] // grid[0]) * (edges.shape[-1] // grid[1])
        )
        jitter = torch.randn(counts.shape, generator=torch.Generator().manual_seed(0)).to(counts) * 1e-3
        flat = (counts + jitter).flatten(1)
        k = int(flat.shape[1] * self.up_ratio)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask.scatter_(1, flat.topk(k, dim=1).indices, True)
        mask = mask.view_as(counts)
        events = [VaeWork("decode", tuple(candidate.shape[-2:]), (), candidate.shape[0])]
        return Verdict(mask=mask, edit=mask.clone(), score=counts, events=events)


@dataclass(frozen=True)
class VarianceVerifier:
    """Fresco-style selection by a per-cell variance of the coarse estimate.

    stat: "channel" (variance over the packed channels of each coarse token; the same lab's later papers
    describe Fresco this way) or "spatial" (variance over the cell's latent pixels, channel-averaged).
    order: "high_first" expands the highest-variance cells, "low_first" the lowest. fraction: share of cells.
    """

    fraction: float = 0.3
    stat: str = "channel"
    order: str = "high_first"

    needs_candidate = True

    def __post_init__(self):
        _check_fraction("VarianceVerifier.fraction", self.fraction)
        for name, value, options in (("stat", self.stat, ("channel", "spatial")),
                                     ("order", self.order, ("high_first", "low_first"))):  # fmt: skip
            if value not in options:
                raise ValueError(f"VarianceVerifier.{name} must be one of {options}, got {value!r}")

    def with_budget(self, fraction: float) -> VarianceVerifier:
        return self

    def plan(self, shape: EditShape, fraction: float) -> VerifierPlan:
        return VerifierPlan([], _count_fraction(shape.coarse, self.fraction))

    def verify(self, editor, candidate: Tensor | None) -> Verdict:
        if candidate is None:
            raise ValueError("VarianceVerifier needs the coarse stage-1 estimate")
        grid = coarse_grid(editor)
        b, c, H, W = candidate.shape
        ph, pw = H // grid[0], W // grid[1]
        cells = candidate.float().view(b, c, grid[0], ph, grid[1], pw)
        if self.stat == "channel":
            score = cells.permute(0, 2, 4, 1, 3, 5).flatten(3).var(-1)
        else:
            score = cells.permute(0, 2, 4, 1, 3, 5).flatten(4).var(-1).mean(-1)
        flat = score.flatten(1) * (1 if self.order == "high_first" else -1)
        k = int(flat.shape[1] * self.fraction)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask.scatter_(1, flat.topk(k, dim=1).indices, True)
        mask = mask.view(b, *grid)
        return Verdict(mask=mask, edit=mask.clone(), score=score)
