"""Mixed-resolution sampling: coarse -> mixed -> full stages, plus the full-resolution and Bottleneck baselines.

All samplers share one verb, ``sample(editor, noise_field, select) -> Trajectory``, and plan their own work
(``plan(shape, n_expanded) -> [Forward, ...]``, the events a run records). The *editor* is any object with
``grid`` (fine token grid), ``patch`` (latent pixels per token side), ``pack`` / ``unpack`` (latent <-> tokens),
``schedule`` (its :class:`~samplers.schedules.ShiftSchedule`) and ``denoiser(layout) -> (x, sigma) -> v``;
samplers never see a model class. Each stage is ``samplers.flow.sample`` observed by a recording callback.
``select`` chooses the coarse cells to expand: a ready verdict (anything with a ``mask``), or a callable given
the coarse clean estimate at the end of stage 1 (for selectors that look at the trajectory).

Progress e = 1 - sigma. Stage i runs N_i Euler steps from progress s_i to e_i on RALU's per-stage shifted
schedule; the last stage ends at e = 1. At each transition the coarse tokens are expanded and every token is
re-noised from e_i back to s_{i+1} = e_i / (Z (1 - e_i) + e_i).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from models.hooks import stack_hook
from models.work import EditShape, Forecast, Forward
from samplers.caching import StageCache
from samplers.expand import CoherentField, HaarExpander, Transition, rewind
from samplers.field import NoiseField, area_resize
from samplers.flow import sample
from samplers.layout import Layout, mixed_indices, scaled_grid
from samplers.schedules import ShiftSchedule, flow_sigmas, shifted_range

Grid = tuple[int, int]


@dataclass
class Trajectory:
    """The result of one sampling run: the fine latent and what it cost."""

    latent: Tensor  # (b, c, H, W)
    events: list[Forward] = field(default_factory=list)  # one per transformer forward
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage
    verdict: Any = None
    expanded: Tensor | None = None  # (hc, wc) cells computed at full resolution in the mixed stage


def sync(x: Tensor) -> None:
    """Wait for the device of ``x`` (CUDA work is asynchronous; timings need the wait)."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


@dataclass
class Recorder:
    """A ``samplers.flow.sample`` callback: records ``work`` once per step, keeps the last velocity, notes
    whether each step's state is finite (a device flag, no sync) and passes
    ``{"stage", "i", "x", "sigma", "sigma_next", "v"}`` on to the user's callback."""

    work: Forward
    events: list[Forward]
    user: Callable[[dict], None] | None = None
    v: Tensor | None = None
    finite: list[Tensor] = field(default_factory=list)
    computes: list[bool] | None = None  # a feature cache's schedule: the other steps record ``cached``
    cached: Forecast | None = None

    def __call__(self, info: dict) -> None:
        computed = self.computes is None or self.computes[info["i"]]
        self.events.append(self.work if computed else self.cached)
        self.v = info["v"]
        self.finite.append(torch.isfinite(info["x"]).all())
        if self.user is not None:
            self.user({"stage": self.work.stage, **info})

    def check(self, sigmas: Tensor) -> None:
        """Raise at the first step whose state is not finite (NaN or inf), naming the stage and the step."""
        ok = torch.stack(self.finite)
        if not bool(ok.all()):
            i = int((~ok).nonzero()[0])
            where = f"stage {self.work.stage!r} at step {i + 1} of {len(ok)} (sigma {float(sigmas[i]):.4f})"
            raise ValueError(f"sampling produced NaN or inf in {where}: check the inputs, dtype and weights")


def sample_stage(editor, layout: Layout, x: Tensor, sigmas: Tensor, stage: str, *, traj: Trajectory,
                 callback=None, progress: bool = False, cache=None) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Euler steps over ``sigmas`` with the tokens at ``layout``; the state and the last velocity (None when the
    stage has no steps). Forwards go to ``traj.events``, wall time to ``traj.seconds[stage]``. ``cache``: a
    feature-cache policy (``samplers.caching``) serving this stage through ``editor.model``'s stack hook."""
    if len(sigmas) < 2:
        return x, None
    rec = Recorder(Forward(stage, len(layout), layout.ref_factor, x.shape[0]), traj.events, callback)
    sync(x)
    t0 = time.perf_counter()
    denoiser, hooked = editor.denoiser(layout), contextlib.nullcontext()
    if cache is not None:
        denoiser, hooked = _cached(editor, denoiser, cache, len(sigmas) - 1, rec)
    with hooked:
        x = sample(denoiser, x, sigmas, callback=rec, progress=progress, desc=stage)
    rec.check(sigmas)  # one sync per stage, instead of a black image at the end
    traj.seconds[stage] = traj.seconds.get(stage, 0.0) + time.perf_counter() - t0
    return x, rec.v


def _cached(editor, denoiser, policy, n: int, rec: Recorder):
    """The denoiser with a fresh :class:`~samplers.caching.StageCache` told each step, and the hook context."""
    model = getattr(editor, "model", None)
    if not hasattr(model, "stack_hook"):
        raise ValueError(f"{type(editor).__name__}.model has no stack_hook: feature caching needs the models' "
                         "block-stack hook point (models.hooks)")  # fmt: skip
    cache, steps = StageCache(policy, n), iter(range(n))
    rec.computes = policy.schedule(n)
    rec.cached = Forecast(
        rec.work.stage, rec.work.n_target, rec.work.ref_factor, rec.work.batch, policy.terms
    )

    def cached_denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        cache.begin(next(steps))
        return denoiser(x, sigma)

    return cached_denoiser, stack_hook(model, cache.hook)


def cached_plan(work: Forward, n: int, policy) -> list[Forward | Forecast]:
    """The events of ``n`` steps of ``work`` under a feature-cache ``policy`` (None: all computed)."""
    if policy is None:
        return [work] * n
    cached = Forecast(work.stage, work.n_target, work.ref_factor, work.batch, policy.terms)
    return [work if c else cached for c in policy.schedule(n)]


def _no_init(x0_init, name: str) -> None:
    if x0_init is not None:
        raise ValueError(f"{name} has no coarse stage for x0_init to replace")


@dataclass(frozen=True)
class FullResSampler:
    """The model's own schedule at full resolution: the baseline, and step reduction with fewer steps.

    schedule: the schedule to sample on instead of the editor's (a step-distilled model's own, e.g.
    ``samplers.schedules.LIGHTNING_SCHEDULE``); None: the editor's.
    """

    steps: int = 50
    schedule: ShiftSchedule | None = None
    cache: Any = None  # a feature-cache policy (samplers.caching); None: every step computed

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"FullResSampler.steps must be >= 1, got {self.steps}")

    def sample(self, editor, noise_field: NoiseField, select=None, *, x0_init=None, callback=None,
               progress=False) -> Trajectory:  # fmt: skip
        _no_init(x0_init, "FullResSampler")
        layout = Layout.full(editor.grid)
        schedule = self.schedule or editor.schedule
        sigmas = flow_sigmas(self.steps, len(layout), schedule).to(noise_field.fine.device)
        traj = Trajectory(latent=noise_field.fine)
        x, _ = sample_stage(editor, layout, editor.pack(noise_field.fine), sigmas, "full", traj=traj,
                            callback=callback, progress=progress, cache=self.cache)  # fmt: skip
        traj.latent = editor.unpack(x, editor.grid)
        return traj

    def plan(self, shape: EditShape, n_expanded: int = 0, *, skip_first: bool = False) -> list[Forward]:
        work = Forward("full", shape.grid[0] * shape.grid[1], 1.0, shape.batch)
        return cached_plan(work, self.steps, self.cache)


@dataclass(frozen=True)
class MixedResSampler:
    """Coarse -> mixed -> full sampling (SpecEdit's dynamic-resolution stages).

    steps: (N1, N2, N3) Euler steps per stage. ends: progress (e1, e2) at the end of stages 1 and 2.
    shifts: per-stage schedule shift; None on a stage spanning all of [1, 0] means the model's own schedule.
    z: rewind factor (>= 1; 1 = no rewind). Shifts and Z are NT-DM fits for a model's full-resolution shift
    (``samplers.ntdm.fit_ntdm``); the named presets carry each family's fits. renoise: the re-noise strategy
    (:class:`~samplers.expand.CoherentField`, ``IID``, ``NoRenoise``, ``RaluCorrelated``). expander: the
    coarse -> fine operator. align: position of coarse tokens ("topleft" or "center"). ref_mode: "coarse" keeps
    the reference at the coarse level until the last stage (the paper's FLOPs imply it), "full" keeps it at full
    resolution throughout. cache: a feature-cache policy (``samplers.caching``), restarted in each stage named
    by ``cache_stages``.
    """

    steps: tuple[int, int, int]
    ends: tuple[float, float]
    shifts: tuple[float | None, float | None, float | None]
    z: float
    renoise: Any = CoherentField()
    expander: Any = HaarExpander()
    align: str = "topleft"
    ref_mode: str = "coarse"
    cache: Any = None
    cache_stages: tuple[str, ...] = ("coarse", "mixed", "full")

    def __post_init__(self):
        if not set(self.cache_stages) <= {"coarse", "mixed", "full"}:
            raise ValueError(f"cache_stages must name coarse, mixed or full stages, got {self.cache_stages}")
        if not callable(getattr(self.renoise, "renoise", None)):
            raise ValueError(f"renoise must be a strategy object such as CoherentField() or RaluCorrelated(), "
                             f"got {self.renoise!r}")  # fmt: skip
        for name, value, options in (("ref_mode", self.ref_mode, ("coarse", "full")),
                                     ("align", self.align, ("topleft", "center"))):  # fmt: skip
            if value not in options:
                raise ValueError(f"MixedResSampler.{name} must be one of {options}, got {value!r}")
        if len(self.steps) != 3 or any(n < 0 for n in self.steps):
            raise ValueError(f"steps must be three non-negative counts, got {self.steps}")
        if len(self.shifts) != 3:
            raise ValueError(f"shifts must have one entry per stage, got {self.shifts}")
        e1, e2 = self.ends
        if not 0.0 <= e1 <= e2 < 1.0:
            raise ValueError(f"ends must satisfy 0 <= e1 <= e2 < 1, got {self.ends}")
        if not self.z >= max(1.0, self.renoise.min_z):  # also rejects NaN
            raise ValueError(
                f"z must be >= {max(1.0, self.renoise.min_z)} for {self.renoise!r}, got {self.z}"
            )
        for i, (s, e) in enumerate(zip(self.starts(), (e1, e2, 1.0))):
            if self.steps[i] > 0 and not s < e:
                raise ValueError(
                    f"stage {i + 1} starts at progress {s:.4f} but ends at {e}: nothing to integrate"
                )

    @property
    def ref_factor(self) -> float:
        """The reference's downsampling in the coarse and mixed stages."""
        return 2.0 if self.ref_mode == "coarse" else 1.0

    def starts(self) -> tuple[float, float, float]:
        """Progress at the start of each stage, after the rewinds."""
        z = self.z if getattr(self.renoise, "rewinds", True) else 1.0
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

    def plan(self, shape: EditShape, n_expanded: int, *, skip_first: bool = False) -> list[Forward]:
        """The forwards of a run that expands ``n_expanded`` coarse cells (stage 1 skipped with ``skip_first``)."""
        nc, b = shape.coarse[0] * shape.coarse[1], shape.batch
        n1 = 0 if skip_first else self.steps[0]
        works = (Forward("coarse", nc, self.ref_factor, b), Forward("mixed", nc + 3 * n_expanded, self.ref_factor, b),
                 Forward("full", shape.grid[0] * shape.grid[1], 1.0, b))  # fmt: skip
        return [
            e for w, n in zip(works, (n1, *self.steps[1:])) for e in cached_plan(w, n, self.cache_of(w.stage))
        ]

    def cache_of(self, stage: str):
        """The feature-cache policy of ``stage`` (None: uncached)."""
        return self.cache if stage in self.cache_stages else None

    def sample(self, editor, noise_field: NoiseField, select, *, x0_init: Tensor | None = None, callback=None,
               progress=False) -> Trajectory:  # fmt: skip
        """Run the three stages. ``select``: a verdict (anything with a ``mask``) or a callable given the coarse
        clean estimate after stage 1. ``x0_init`` (a clean latent, e.g. the draft) replaces stage 1: it is
        noised to the end of stage 1 on the field and stage 1's steps are skipped."""
        h, w = editor.grid
        if h % 2 or w % 2:
            raise ValueError(f"the fine token grid {editor.grid} must be even to have a 2x2 coarse grid")
        sig = [s.to(noise_field.fine.device) for s in self.stage_sigmas(h * w, editor.schedule)]
        traj = Trajectory(latent=noise_field.fine)
        run = partial(sample_stage, editor, traj=traj, callback=callback, progress=progress)
        x, v = self._coarse(editor, noise_field, sig[0], x0_init, run)
        verdict = select if hasattr(select, "mask") else select(self._estimate(editor, x, v, x0_init))
        expanded = _shared_mask(verdict.mask, (h // 2, w // 2))
        x, v = self._to_mixed(editor, noise_field, x, v, expanded, sig[1], run)
        x = self._to_full(editor, noise_field, x, v, expanded, sig[2], run)
        traj.latent, traj.verdict, traj.expanded = editor.unpack(x, editor.grid), verdict, expanded
        return traj

    def _coarse_noise(self, editor, noise_field: NoiseField) -> Tensor:
        """The field at the coarse level: 2 x 2 fine tokens per coarse token."""
        p, (h, w) = editor.patch, editor.grid
        return noise_field.at((p * (h // 2), p * (w // 2)))

    def _coarse(self, editor, noise_field, sigmas, x0_init, run) -> tuple[Tensor, Tensor | None]:
        """Stage 1: every token coarse (or ``x0_init`` noised to the end of stage 1 instead)."""
        noise = self._coarse_noise(editor, noise_field)
        if x0_init is not None:
            e1 = self.ends[0]
            x0 = area_resize(x0_init.to(noise), tuple(noise.shape[-2:]))
            return editor.pack((e1 * x0.float() + (1 - e1) * noise.float()).to(noise.dtype)), None
        gc = (editor.grid[0] // 2, editor.grid[1] // 2)
        layout = Layout.full(gc, ref_factor=self.ref_factor, offset=0.25 if self.align == "center" else 0.0)
        return run(layout, editor.pack(noise), sigmas, "coarse", cache=self.cache_of("coarse"))

    def _estimate(self, editor, x: Tensor, v: Tensor | None, x0_init: Tensor | None) -> Tensor:
        """The coarse clean estimate at the end of stage 1, for selectors that look at the trajectory."""
        gc = (editor.grid[0] // 2, editor.grid[1] // 2)
        if v is not None:
            return editor.unpack(x - (1.0 - self.ends[0]) * v, gc)
        if x0_init is None:
            raise ValueError("this selector needs a stage-1 estimate: give stage 1 at least one step")
        return area_resize(x0_init.to(x), (editor.patch * gc[0], editor.patch * gc[1]))

    def _to_mixed(self, editor, noise_field, x, v, expanded, sigmas, run) -> tuple[Tensor, Tensor | None]:
        """Transition 1 -> 2 (expand the chosen cells to 2 x 2 fine tokens, re-noise every token), then stage 2.

        Token order of the mixed stage: [kept coarse tokens (raster)] + [children of expanded cells (cell by
        cell, children row-major)] (``samplers.layout.mixed_indices``)."""
        gc, e1 = expanded.shape, self.ends[0]
        sigma = 1.0 - e1
        keep, children = (t.to(x.device) for t in mixed_indices(expanded))
        eps = None if v is None else editor.unpack((x.float() + (1 - sigma) * v.float()).to(x.dtype), gc)
        fine = editor.pack(self.expander.expand(editor, editor.unpack(x, gc), sigma, eps, noise_field))
        x = torch.cat([x[:, keep], fine[:, children]], 1)
        coarse_tok = editor.pack(self._coarse_noise(editor, noise_field))
        field_tok = torch.cat([coarse_tok[:, keep], editor.pack(noise_field.fine)[:, children]], 1)
        groups = len(keep) + torch.arange(len(children), device=x.device).view(-1, 4)
        x = self._renoise(x, e1, self.starts()[1], field_tok, groups, noise_field, salt=1)
        layout = Layout.mixed(expanded, align=self.align, ref_factor=self.ref_factor)
        return run(layout, x, sigmas, "mixed", cache=self.cache_of("mixed"))

    def _to_full(self, editor, noise_field, x, v, expanded, sigmas, run) -> Tensor:
        """Transition 2 -> 3 (expand the remaining coarse cells, back to raster order, re-noise), then stage 3."""
        gc, e2 = tuple(expanded.shape), self.ends[1]
        sigma = 1.0 - e2
        keep, children = (t.to(x.device) for t in mixed_indices(expanded))
        b, n_keep, c = x.shape[0], len(keep), x.shape[2]
        coarse = x.new_zeros(b, gc[0] * gc[1], c)
        coarse[:, keep] = x[:, :n_keep]
        eps = None
        if v is not None:
            eps_tok = x.new_zeros(b, gc[0] * gc[1], c)
            eps_tok[:, keep] = (x[:, :n_keep].float() + (1 - sigma) * v[:, :n_keep].float()).to(x.dtype)
            eps = editor.unpack(eps_tok, gc)
        fine = editor.pack(self.expander.expand(editor, editor.unpack(coarse, gc), sigma, eps, noise_field))
        fine[:, children] = x[:, n_keep:]
        _, replicated = mixed_indices(~expanded)  # the kept cells' children, 4 consecutive per cell
        groups = replicated.to(x.device).view(-1, 4)
        x = self._renoise(
            fine, e2, self.starts()[2], editor.pack(noise_field.fine), groups, noise_field, salt=2
        )
        return run(Layout.full(editor.grid), x, sigmas, "full", cache=self.cache_of("full"))[0]

    def _renoise(self, x, e, s, field_tokens, groups, noise_field: NoiseField, salt: int) -> Tensor:
        fresh = lambda shape: noise_field.fresh(shape, salt)
        return self.renoise.renoise(x, Transition(e, s, self.z, field_tokens, groups, fresh))


def _shared_mask(mask: Tensor, grid: Grid) -> Tensor:
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
    follows the stage's resolution. Stage mechanics are our reading of the Bottleneck Sampling paper
    (arXiv 2503.18940); its code could not be obtained.
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
        if any(k < 1 for k in self.steps):
            raise ValueError(f"every Bottleneck stage needs at least one step, got {self.steps}")

    def sample(self, editor, noise_field: NoiseField, select=None, *, x0_init=None, callback=None,
               progress=False) -> Trajectory:  # fmt: skip
        _no_init(x0_init, "BottleneckSampler")
        traj, x0, p = Trajectory(latent=noise_field.fine), None, editor.patch
        for i, (n, f, w, shift) in enumerate(zip(self.steps, self.factors, self.strengths, self.shifts)):
            grid = scaled_grid(editor.grid, f)
            size = (p * grid[0], p * grid[1])
            noise = noise_field.at(size)
            if x0 is None:
                x = editor.pack(noise)
            else:
                x0 = area_resize(x0, size) if x0.shape[-1] > size[1] else _nearest(x0, size)
                x = editor.pack((1 - w) * x0 + w * noise)
            layout = Layout.full(grid, ref_factor=float(f))
            sigmas = shifted_range(w, 0.0, n, shift).to(noise.device)
            x, _ = sample_stage(editor, layout, x, sigmas, f"stage{i + 1}", traj=traj, callback=callback,
                                progress=progress)  # fmt: skip
            x0 = editor.unpack(x, grid)
        traj.latent = x0
        return traj

    def plan(self, shape: EditShape, n_expanded: int = 0, *, skip_first: bool = False) -> list[Forward]:
        out = []
        for i, (n, f) in enumerate(zip(self.steps, self.factors)):
            g = scaled_grid(shape.grid, f)
            out += [Forward(f"stage{i + 1}", g[0] * g[1], float(f), shape.batch)] * n
        return out


def _nearest(x: Tensor, size: Grid) -> Tensor:
    return torch.nn.functional.interpolate(x, size=size, mode="nearest")
