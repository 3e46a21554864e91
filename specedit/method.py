"""SpecEdit composed from its parts, the baselines in the same shape, and the result with its costs.

A *method* has one verb, ``run(editor, seed) -> EditResult``, and plans its own work:
``plan(shape, fraction) -> Plan``, the events a run on an edit of that shape records (given the expanded
fraction a data-dependent verifier would reach), so a method can be priced at any size without weights.
``SpecEdit`` drafts (optional), verifies and samples over resolution stages; ``Baseline`` samples with any
sampler and no verification. Swapping a part is ``dataclasses.replace(method, verifier=replace(v, tau=0.4))``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from models.work import EditShape, Forecast, Forward, VaeWork
from samplers.field import NoiseField
from samplers.mixed_res import Trajectory
from verify.verifiers import Verdict

Event = Forward | Forecast | VaeWork


@dataclass
class EditResult:
    """The edited fine latent and an account of the work: forwards and VAE work, wall time per part."""

    latent: Tensor
    verdict: Verdict | None = None
    draft: Tensor | None = None
    events: list[Event] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def nfe(self) -> int:
        """Denoiser evaluations of the main trajectory (draft steps excluded, as in the paper)."""
        return nfe(self.events)

    @property
    def expanded_fraction(self) -> float:
        """Share of coarse cells computed at full resolution in the mixed stage (0 for baselines)."""
        return 0.0 if self.verdict is None else self.verdict.fraction

    def flops(self, editor) -> dict[str, float]:
        """FLOPs per part ("draft", "coarse", "mixed", "full", "verifier"), plus "total"."""
        return itemize(self.events, editor.cost)


@dataclass(frozen=True)
class Plan:
    """The events a method will record and the expanded fraction it realises (None: no verifier)."""

    events: list[Event]
    fraction: float | None

    @property
    def nfe(self) -> int:
        return nfe(self.events)


def nfe(events: list[Event]) -> int:
    """Steps of the main trajectory: computed forwards and feature-cache forecasts (the paper counts both)."""
    return sum(1 for e in events if isinstance(e, Forward | Forecast) and e.stage != "draft")


def itemize(events: list[Event], cost) -> dict[str, float]:
    """FLOPs per part (each event's ``part``) and their "total"."""
    out: dict[str, float] = defaultdict(float)
    for e in events:
        out[e.part] += cost(e)
    out["total"] = sum(out.values())
    return dict(out)


def _field(editor, seed: int) -> NoiseField:
    """The edit's noise field, after checking the source latent is finite (a NaN would flow to a black image)."""
    src = editor.source
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**64 - 1:
        raise ValueError(f"seed must be an integer in [0, 2**64 - 1], got {seed!r}")
    if not bool(torch.isfinite(src).all()):
        raise ValueError(f"the source latent {tuple(src.shape)} contains NaN or inf: check the input image")
    return NoiseField.sample(tuple(src.shape), seed, device=src.device, dtype=src.dtype)


WEIGHTS = ("base", "distilled")


def check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")


@dataclass(frozen=True)
class SpecEdit:
    """Draft -> verify -> mixed-resolution sampling.

    drafter: None skips the draft; the verifier then judges the coarse stage-1 estimate ("w/o draft").
    draft_reuse: beyond the paper, off by default: the draft's clean estimate, noised on the field to the
    end of stage 1, seeds the main trajectory and stage 1's steps are skipped.
    weights: the weights the configuration is made for (``WEIGHTS``): "base", or "distilled" (a
    step-distilled model, e.g. the base model with a Lightning LoRA fused); pipelines refuse a "distilled"
    method on base weights.
    """

    drafter: Any
    verifier: Any
    sampler: Any
    draft_reuse: bool = False
    weights: str = "base"

    def __post_init__(self):
        check_weights(self.weights)

    @property
    def drafts(self) -> bool:
        """Whether a run drafts: a drafter is set and the verifier or the reuse needs its output."""
        return self.drafter is not None and (self.verifier.needs_candidate or self.draft_reuse)

    def run(self, editor, seed: int, *, callback=None, progress: bool = False) -> EditResult:
        noise_field, seconds, draft = _field(editor, seed), {}, None
        events: list[Event] = []
        if self.drafts:
            d = self.drafter.draft(editor, noise_field, callback=callback, progress=progress)
            draft, events, seconds = d.latent, list(d.events), dict(d.seconds)
        select = self._selector(editor, draft, seconds)
        x0_init = draft if self.draft_reuse else None
        traj = self.sampler.sample(
            editor, noise_field, select, x0_init=x0_init, callback=callback, progress=progress
        )
        return _result(traj, draft, events, seconds)

    def _selector(self, editor, draft: Tensor | None, seconds: dict):
        """A verdict now (no candidate needed, or the draft is there), else the verifier on the stage-1
        estimate."""

        def timed(candidate: Tensor | None) -> Verdict:
            t0 = time.perf_counter()
            verdict = self.verifier.verify(editor, candidate)
            seconds["verify"] = time.perf_counter() - t0
            return verdict

        if not self.verifier.needs_candidate:
            return self.verifier.verify(editor, None)
        return timed(draft) if draft is not None else timed

    def with_budget(self, fraction: float) -> SpecEdit:
        """The method with its verifier at a fixed expanded ``fraction`` where its rule is data-dependent."""
        return replace(self, verifier=self.verifier.with_budget(fraction))

    def plan(self, shape: EditShape, fraction: float = 0.25) -> Plan:
        """Events of a run on an edit of ``shape``; ``fraction`` is the assumed outcome of a threshold verifier."""
        v = self.verifier.plan(shape, fraction)
        n_expanded = round(v.fraction * shape.coarse[0] * shape.coarse[1])
        events = list(self.drafter.plan(shape)) if self.drafts else []
        events += self.sampler.plan(shape, n_expanded, skip_first=self.draft_reuse)
        return Plan(events + list(v.work), v.fraction)


@dataclass(frozen=True)
class Baseline:
    """Sampling with no verification: the 50-step baseline, step reduction, Bottleneck Sampling, and a
    step-distilled model's own few-step sampling (``weights``: see :class:`SpecEdit`)."""

    sampler: Any
    weights: str = "base"

    def __post_init__(self):
        check_weights(self.weights)

    def run(self, editor, seed: int, *, callback=None, progress: bool = False) -> EditResult:
        traj = self.sampler.sample(editor, _field(editor, seed), None, callback=callback, progress=progress)
        return _result(traj, None, [], {})

    def with_budget(self, fraction: float) -> Baseline:
        return self

    def plan(self, shape: EditShape, fraction: float = 0.25) -> Plan:
        return Plan(list(self.sampler.plan(shape, 0)), None)


def _result(traj: Trajectory, draft, events: list[Event], seconds: dict) -> EditResult:
    verdict = traj.verdict
    events = events + list(traj.events) + (list(verdict.events) if verdict is not None else [])
    return EditResult(
        latent=traj.latent, verdict=verdict, draft=draft, events=events, seconds={**seconds, **traj.seconds}
    )
