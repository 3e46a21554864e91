"""Mixed-resolution sampling: coarse -> mixed -> full stages, plus the full-resolution and Bottleneck baselines.

All samplers share one verb, ``sample(editor, field, select) -> Trajectory``. The *editor* is any object
with ``grid`` (fine token grid), ``source`` (the (b, c, H, W) source latent, for shapes), ``schedule`` (its
:class:`~samplers.schedules.ShiftSchedule`) and ``denoiser(layout) -> (x, sigma) -> v``; samplers never see a
model class. ``select`` chooses the coarse cells to expand: a ready verdict (anything with a ``mask``), or a
callable given the coarse clean estimate at the end of stage 1 (for selectors that look at the trajectory).

Progress e = 1 - sigma. Stage i runs N_i Euler steps from progress s_i to e_i on RALU's per-stage shifted
schedule; the last stage ends at e = 1. At each transition the coarse tokens are expanded and every token is
re-noised from e_i back to s_{i+1} = e_i / (Z (1 - e_i) + e_i).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from models.packing import pack, unpack
from samplers.expand import RENOISE_MODES, HaarExpander, renoise, rewind
from samplers.field import NoiseField, area_resize
from samplers.flow import euler_step
from samplers.layout import Layout, mixed_indices, scaled_grid
from samplers.schedules import flow_sigmas, shifted_range


@dataclass
class Trajectory:
    """The result of one sampling run: the fine latent and what it cost."""

    latent: Tensor  # (b, c, H, W)
    records: list[dict] = field(
        default_factory=list
    )  # one per forward: kind, stage, n_target, ref_factor, sigma
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage
    verdict: Any = None
    expanded: Tensor | None = None  # (hc, wc) cells computed at full resolution in the mixed stage


def _sync(x: Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def run_stage(
    denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    name: str,
    layout: Layout,
    traj: Trajectory,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
):
    """Euler steps over ``sigmas``; returns the state and the last velocity (None when no step ran)."""
    v = None
    steps = range(len(sigmas) - 1)
    if progress and len(steps):
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=name, leave=False)
    _sync(x)
    t0 = time.perf_counter()
    for i in steps:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = denoiser(x, sigma)
        x = euler_step(x, v, sigma, sigma_next)
        traj.records.append(
            {
                "kind": "forward",
                "stage": name,
                "n_target": len(layout),
                "ref_factor": layout.ref_factor,
                "sigma": float(sigma),
            }
        )
        if callback is not None:
            callback({"stage": name, "i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "v": v})
    _sync(x)
    traj.seconds[name] = traj.seconds.get(name, 0.0) + time.perf_counter() - t0
    return x, v


@dataclass(frozen=True)
class FullResSampler:
    """The model's own schedule at full resolution: the baseline, and step reduction with fewer steps."""

    steps: int = 50

    def sample(self, editor, field: NoiseField, select=None, *, callback=None, progress=False) -> Trajectory:
        grid = editor.grid
        traj = Trajectory(latent=field.fine)
        layout = Layout.full(grid)
        sigmas = flow_sigmas(self.steps, len(layout), editor.schedule).to(field.fine.device)
        x, _ = run_stage(
            editor.denoiser(layout),
            pack(field.fine),
            sigmas,
            name="full",
            layout=layout,
            traj=traj,
            callback=callback,
            progress=progress,
        )
        traj.latent = unpack(x, grid)
        return traj

    def events(self, grid: tuple[int, int]) -> list[dict]:
        return [
            {"kind": "forward", "stage": "full", "n_target": grid[0] * grid[1], "ref_factor": 1.0}
        ] * self.steps


@dataclass(frozen=True)
class MixedResSampler:
    """Coarse -> mixed -> full sampling (SpecEdit's dynamic-resolution stages).

    steps: (N1, N2, N3) Euler steps per stage. ends: progress (e1, e2) at the end of stages 1 and 2.
    shifts: per-stage schedule shift; None on a stage spanning all of [1, 0] means the model's own schedule.
    z: rewind factor (>= 1; 1 = no rewind). renoise: one of coherent_field, iid, none, ralu_correlated.
    expander: the coarse -> fine operator. align: position of coarse tokens ("topleft" or "center").
    ref_mode: "coarse" keeps the reference at the coarse level until the last stage (the paper's FLOPs
    imply it), "full" keeps it at full resolution throughout.
    """

    steps: tuple[int, int, int] = (5, 8, 5)
    ends: tuple[float, float] = (0.3, 0.6)
    shifts: tuple[float | None, float | None, float | None] = (5.93, 2.29, 2.66)
    z: float = 4.33
    renoise: str = "coherent_field"
    expander: Any = HaarExpander()
    align: str = "topleft"
    ref_mode: str = "coarse"

    def __post_init__(self):
        if self.renoise not in RENOISE_MODES:
            raise ValueError(f"renoise must be one of {RENOISE_MODES}, got {self.renoise!r}")
        if self.ref_mode not in ("coarse", "full"):
            raise ValueError(f"ref_mode must be 'coarse' or 'full', got {self.ref_mode!r}")
        if len(self.steps) != 3 or any(n < 0 for n in self.steps):
            raise ValueError(f"steps must be three non-negative counts, got {self.steps}")
        e1, e2 = self.ends
        if not 0.0 <= e1 <= e2 < 1.0:
            raise ValueError(f"ends must satisfy 0 <= e1 <= e2 < 1, got {self.ends}")
        if self.z < 1.0:
            raise ValueError(f"z must be >= 1, got {self.z}")
        if self.renoise == "ralu_correlated" and self.z < 2.0:
            raise ValueError(f"ralu_correlated re-noise needs z >= 2, got {self.z}")
        for i, (s, e) in enumerate(zip(self.starts(), (e1, e2, 1.0))):
            if self.steps[i] > 0 and not s < e:
                raise ValueError(
                    f"stage {i + 1} starts at progress {s:.4f} but ends at {e}: nothing to integrate"
                )

    def starts(self) -> tuple[float, float, float]:
        """Progress at the start of each stage, after the rewinds."""
        z = 1.0 if self.renoise == "none" else self.z
        return 0.0, rewind(self.ends[0], z), rewind(self.ends[1], z)

    def stage_sigmas(self, n_fine: int, schedule) -> list[Tensor]:
        """Per-stage sigma grids (N_i + 1 values each; empty for a stage with no steps)."""
        out = []
        for s, e, n, shift in zip(self.starts(), (*self.ends, 1.0), self.steps, self.shifts):
            if n == 0:
                out.append(torch.empty(0))
            elif shift is None:
                if s > 0.0 or e < 1.0:
                    raise ValueError("shift None (the model's schedule) needs a stage spanning sigma 1 -> 0")
                out.append(flow_sigmas(n, n_fine, schedule))
            else:
                out.append(shifted_range(1.0 - s, 1.0 - e, n, shift))
        return out

    def sample(
        self,
        editor,
        field: NoiseField,
        select,
        *,
        x0_init: Tensor | None = None,
        callback=None,
        progress=False,
    ) -> Trajectory:
        """Run the three stages. ``x0_init`` (a coarse clean latent, e.g. an upsampled draft) replaces stage 1:
        it is noised to the end of stage 1 on the field and stage 1's steps are skipped."""
        grid = editor.grid
        h, w = grid
        if h % 2 or w % 2:
            raise ValueError(f"the fine token grid {grid} must be even to have a 2x2 coarse grid")
        gc = (h // 2, w // 2)
        device = field.fine.device
        sig = [s.to(device) for s in self.stage_sigmas(h * w, editor.schedule)]
        s1, s2, s3 = self.starts()
        e1, e2 = self.ends
        ref12 = 2.0 if self.ref_mode == "coarse" else 1.0
        traj = Trajectory(latent=field.fine)
        coarse_noise = field.at((h, w))  # coarse latent pixels = fine token grid

        # stage 1: every token coarse
        layout = Layout.full(gc, ref_factor=ref12, offset=0.25 if self.align == "center" else 0.0)
        v = None
        if x0_init is not None:
            x0 = area_resize(x0_init.to(coarse_noise), (h, w))
            x = pack((e1 * x0.float() + (1 - e1) * coarse_noise.float()).to(coarse_noise.dtype))
        else:
            x, v = run_stage(
                editor.denoiser(layout),
                pack(coarse_noise),
                sig[0],
                name="coarse",
                layout=layout,
                traj=traj,
                callback=callback,
                progress=progress,
            )

        # transition 1 -> 2: choose the cells, expand them, re-noise everything
        sigma = 1.0 - e1
        if callable(select) and not hasattr(select, "mask"):
            if v is None and x0_init is None:
                raise ValueError("this selector needs a stage-1 estimate: give stage 1 at least one step")
            x0_tok = x - sigma * v if v is not None else pack(area_resize(x0_init.to(coarse_noise), (h, w)))
            verdict = select(unpack(x0_tok, gc))
        else:
            verdict = select
        expanded = _shared_mask(verdict.mask, gc)
        keep, children = mixed_indices(expanded)
        keep, children = keep.to(device), children.to(device)
        eps = None if v is None else unpack((x.float() + (1 - sigma) * v.float()).to(x.dtype), gc)
        fine = pack(self.expander.expand(unpack(x, gc), sigma, eps, field))
        x = torch.cat([x[:, keep], fine[:, children]], 1)
        field_tok = torch.cat([pack(coarse_noise)[:, keep], pack(field.fine)[:, children]], 1)
        replicated = torch.arange(x.shape[1], device=device) >= len(keep)
        x = self._renoise(x, e1, s2, field_tok, replicated, field, salt=1)

        # stage 2: kept cells coarse, expanded cells fine
        layout = Layout.mixed(expanded, align=self.align, ref_factor=ref12)
        x, v = run_stage(
            editor.denoiser(layout),
            x,
            sig[1],
            name="mixed",
            layout=layout,
            traj=traj,
            callback=callback,
            progress=progress,
        )

        # transition 2 -> 3: expand the remaining coarse cells, back to raster order, re-noise
        sigma = 1.0 - e2
        b, _, c = x.shape
        n_keep = len(keep)
        coarse_state = x.new_zeros(b, gc[0] * gc[1], c)
        coarse_state[:, keep] = x[:, :n_keep]
        eps = None
        if v is not None:
            eps_tok = x.new_zeros(b, gc[0] * gc[1], c)
            eps_tok[:, keep] = (x[:, :n_keep].float() + (1 - sigma) * v[:, :n_keep].float()).to(x.dtype)
            eps = unpack(eps_tok, gc)
        fine = pack(self.expander.expand(unpack(coarse_state, gc), sigma, eps, field))
        fine[:, children] = x[:, n_keep:]
        replicated = torch.ones(h * w, dtype=torch.bool, device=device)
        replicated[children] = False
        x = self._renoise(fine, e2, s3, pack(field.fine), replicated, field, salt=2, raster=grid)

        # stage 3: full resolution
        layout = Layout.full(grid)
        x, _ = run_stage(
            editor.denoiser(layout),
            x,
            sig[2],
            name="full",
            layout=layout,
            traj=traj,
            callback=callback,
            progress=progress,
        )
        traj.latent, traj.verdict, traj.expanded = unpack(x, grid), verdict, expanded
        return traj

    def _renoise(self, x, e, s, field_tok, replicated, field: NoiseField, salt: int, raster=None) -> Tensor:
        if self.renoise == "ralu_correlated" and raster is not None:
            # children of one parent must be consecutive for the block covariance: go to cell-major order
            hc, wc = raster[0] // 2, raster[1] // 2
            order = _cell_major(hc, wc).to(x.device)
            y = renoise(
                x[:, order],
                e,
                s,
                self.renoise,
                field_tokens=field_tok[:, order],
                replicated=replicated[order],
                z=self.z,
            )
            out = torch.empty_like(x)
            out[:, order] = y
            return out
        fresh = field.fresh(tuple(x.shape), salt) if self.renoise == "iid" else None
        return renoise(
            x, e, s, self.renoise, field_tokens=field_tok, replicated=replicated, z=self.z, fresh=fresh
        )


def _cell_major(hc: int, wc: int) -> Tensor:
    """Fine-grid raster indices reordered so each coarse cell's 2x2 children are consecutive."""
    _, children = mixed_indices(torch.ones(hc, wc, dtype=torch.bool))
    return children


def _shared_mask(mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """One (hc, wc) mask for the whole batch; per-sample token sets are not supported (they would need
    padded sequences), so differing masks raise."""
    mask = mask.to(torch.bool).cpu()
    if mask.ndim == 2:
        mask = mask[None]
    if tuple(mask.shape[-2:]) != tuple(grid):
        raise ValueError(f"verdict mask has shape {tuple(mask.shape[-2:])}, expected the coarse grid {grid}")
    if mask.shape[0] > 1 and not bool((mask == mask[:1]).all()):
        raise ValueError(
            "the samples of this batch verified different token sets; mixed-resolution sampling needs one "
            "token set per batch: run the samples one at a time (batch 1)"
        )
    return mask[0]


@dataclass(frozen=True)
class BottleneckSampler:
    """Bottleneck Sampling (high -> low -> high) as an SDEdit chain.

    Each stage denoises to sigma = 0 at its resolution (``factors``: 1 = full, 2 = half per side, ...) on a
    schedule shifted by ``shifts[i]`` that starts at ``strengths[i]``; the next stage resizes the clean result
    (area down, nearest up), re-noises it on the noise field to its strength and continues. The reference
    follows the stage's resolution. Stage mechanics are our reading of the paper (its code is unavailable).
    """

    steps: tuple[int, ...] = (3, 10, 5)
    factors: tuple[int, ...] = (1, 2, 1)
    strengths: tuple[float, ...] = (1.0, 0.8, 0.6)
    shifts: tuple[float, ...] = (9.0, 6.0, 9.0)

    def __post_init__(self):
        n = len(self.steps)
        if not (len(self.factors) == len(self.strengths) == len(self.shifts) == n) or n == 0:
            raise ValueError("steps, factors, strengths and shifts need one entry per stage")
        if self.strengths[0] != 1.0 or self.factors[-1] != 1:
            raise ValueError("the first stage must start from pure noise and the last run at full resolution")

    def sample(self, editor, field: NoiseField, select=None, *, callback=None, progress=False) -> Trajectory:
        traj = Trajectory(latent=field.fine)
        x0 = None
        for i, (n, f, w, shift) in enumerate(zip(self.steps, self.factors, self.strengths, self.shifts)):
            grid = scaled_grid(editor.grid, f)
            size = (2 * grid[0], 2 * grid[1])
            noise = field.at(size)
            if x0 is None:
                x = pack(noise)
            else:
                x0 = area_resize(x0, size) if x0.shape[-1] > size[1] else _nearest(x0, size)
                x = pack((1 - w) * x0 + w * noise)
            layout = Layout.full(grid, ref_factor=float(f))
            sigmas = shifted_range(w, 0.0, n, shift).to(noise.device)
            x, _ = run_stage(
                editor.denoiser(layout),
                x,
                sigmas,
                name=f"stage{i + 1}",
                layout=layout,
                traj=traj,
                callback=callback,
                progress=progress,
            )
            x0 = unpack(x, grid)
        traj.latent = x0
        return traj

    def events(self, grid: tuple[int, int]) -> list[dict]:
        out = []
        for i, (n, f) in enumerate(zip(self.steps, self.factors)):
            g = scaled_grid(grid, f)
            out += [
                {"kind": "forward", "stage": f"stage{i + 1}", "n_target": g[0] * g[1], "ref_factor": float(f)}
            ] * n
        return out


def _nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    return torch.nn.functional.interpolate(x, size=size, mode="nearest")
