"""SpecEdit composed from its parts, the baselines in the same shape, and the result with its costs.

A *method* has one verb, ``run(editor, seed) -> EditResult``. ``SpecEdit`` drafts (optional), verifies and
samples over resolution stages; ``Baseline`` samples with any sampler and no verification. Swapping a part is
``dataclasses.replace(method, verifier=replace(method.verifier, tau=0.4))``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from samplers.field import NoiseField
from samplers.layout import scaled_grid
from samplers.mixed_res import FullResSampler, MixedResSampler, Trajectory
from specedit.drafters import LowResDrafter
from verify.verifiers import FeatureVerifier, Verdict


@dataclass
class EditResult:
    """The edited fine latent and an account of the work: forwards and VAE events, wall time per part."""

    latent: Tensor
    verdict: Verdict | None = None
    draft: Tensor | None = None
    events: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def nfe(self) -> int:
        """Denoiser evaluations of the main trajectory (draft steps excluded, as in the paper)."""
        return sum(1 for e in self.events if e["kind"] == "forward" and e["stage"] != "draft")

    def flops(self, editor) -> dict[str, float]:
        """FLOPs per part ("draft", "coarse", "mixed", "full", "verifier"), plus "total"."""
        return itemize(self.events, editor.cost)


def itemize(events: list[dict], cost) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for e in events:
        out[e["stage"] if e["kind"] == "forward" else "verifier"] += cost(e)
    out["total"] = sum(out.values())
    return dict(out)


def _needs_candidate(verifier) -> bool:
    return bool(getattr(verifier, "needs_candidate", True))


@dataclass(frozen=True)
class SpecEdit:
    """Draft -> verify -> mixed-resolution sampling.

    drafter: None skips the draft; the verifier then judges the coarse stage-1 estimate ("w/o draft").
    draft_reuse: beyond the paper, off by default: the draft's clean estimate, noised on the field to the
    end of stage 1, seeds the main trajectory and stage 1's steps are skipped.
    """

    drafter: Any = LowResDrafter()
    verifier: Any = FeatureVerifier()
    sampler: Any = MixedResSampler()
    draft_reuse: bool = False

    def run(self, editor, seed: int, *, callback=None, progress: bool = False) -> EditResult:
        field_ = NoiseField.sample(
            tuple(editor.source.shape), seed, device=editor.source.device, dtype=editor.source.dtype
        )
        events, seconds, draft = [], {}, None
        needs = _needs_candidate(self.verifier)
        if self.drafter is not None and (needs or self.draft_reuse):
            d = self.drafter.draft(editor, field_, progress=progress)
            draft, events, seconds = d.latent, list(d.records), dict(d.seconds)
        if not needs:
            select = self.verifier.verify(editor, None)
        elif draft is not None:
            t0 = time.perf_counter()
            select = self.verifier.verify(editor, draft)
            seconds["verify"] = time.perf_counter() - t0
        else:
            select = self.verifier_on_estimate(editor, seconds)
        traj = self.sampler.sample(
            editor,
            field_,
            select,
            x0_init=draft if self.draft_reuse else None,
            callback=callback,
            progress=progress,
        )
        return _result(traj, draft, events, seconds)

    def verifier_on_estimate(self, editor, seconds: dict):
        def select(x0: Tensor) -> Verdict:
            t0 = time.perf_counter()
            v = self.verifier.verify(editor, x0)
            seconds["verify"] = time.perf_counter() - t0
            return v

        return select

    def events(self, grid: tuple[int, int], n_expanded: int) -> list[dict]:
        """The events a run records when ``n_expanded`` coarse cells are expanded (no model needed)."""
        h, w = grid
        nc = (h // 2) * (w // 2)
        s = self.sampler
        ref12 = 2.0 if s.ref_mode == "coarse" else 1.0
        out = []
        if self.drafter is not None and (_needs_candidate(self.verifier) or self.draft_reuse):
            gd = scaled_grid(grid, self.drafter.factor)
            out += [_fwd("draft", gd[0] * gd[1], self.drafter.factor)] * self.drafter.steps
        n1 = 0 if self.draft_reuse else s.steps[0]
        out += [_fwd("coarse", nc, ref12)] * n1
        out += [_fwd("mixed", nc + 3 * n_expanded, ref12)] * s.steps[1]
        out += [_fwd("full", h * w, 1.0)] * s.steps[2]
        out += _verifier_events(self.verifier, grid, self.drafter is None)
        return out


@dataclass(frozen=True)
class Baseline:
    """Sampling with no verification: the 50-step baseline, step reduction, Bottleneck Sampling."""

    sampler: Any = FullResSampler(50)

    def run(self, editor, seed: int, *, callback=None, progress: bool = False) -> EditResult:
        field_ = NoiseField.sample(
            tuple(editor.source.shape), seed, device=editor.source.device, dtype=editor.source.dtype
        )
        traj = self.sampler.sample(editor, field_, None, callback=callback, progress=progress)
        return _result(traj, None, [], {})

    def events(self, grid: tuple[int, int], n_expanded: int = 0) -> list[dict]:
        return self.sampler.events(grid)


def _fwd(stage: str, n_target: int, ref_factor: float) -> dict:
    return {"kind": "forward", "stage": stage, "n_target": n_target, "ref_factor": ref_factor}


def _verifier_events(verifier, grid: tuple[int, int], on_estimate: bool) -> list[dict]:
    """VAE work of a verifier, for planned (not run) budgets."""
    size = (2 * grid[0], 2 * grid[1])
    if isinstance(verifier, FeatureVerifier):
        return (
            [{"kind": "features", "size": size, "taps": verifier.taps, "count": 2}]
            if verifier.semantic
            else []
        )
    if type(verifier).__name__ == "CannyVerifier":
        return [{"kind": "decode", "size": (grid[0], grid[1]), "count": 1}]
    return []


def _result(traj: Trajectory, draft, events: list[dict], seconds: dict) -> EditResult:
    verdict = traj.verdict
    events = events + list(traj.records) + (list(verdict.events) if verdict is not None else [])
    return EditResult(
        latent=traj.latent, verdict=verdict, draft=draft, events=events, seconds={**seconds, **traj.seconds}
    )


def expanded_fraction(result: EditResult) -> float:
    """Share of coarse cells computed at full resolution in the mixed stage (0 for baselines)."""
    return 0.0 if result.verdict is None else result.verdict.fraction
