"""Model families: one record per family, and the registry every command looks families up in.

A :class:`Family` holds everything the library knows about one editor family: its schedule and geometry, the
NT-DM fits its SpecEdit presets use, its default draft and verifier, its full-size cost model, a tiny and a
random-weight editor for tests and benchmarks, and its pipeline. ``specedit.presets``, ``specedit.bench`` and
the ``specedit`` command line find everything through :func:`get_family`; adding a family is one
:func:`register` call in the family's own package (the built-in ones: ``specedit.kontext``,
``specedit.qwen``, ``specedit.toy``).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.packing import grid_of
from models.work import EditShape
from samplers.schedules import ShiftSchedule
from specedit.drafters import LowResDrafter
from verify.verifiers import FeatureVerifier

BUILTIN = {"kontext": "specedit.kontext", "qwen": "specedit.qwen", "toy": "specedit.toy"}  # name -> package
Fit = tuple[tuple[float, float, float], float]  # per-stage shifts, rewind Z


@dataclass(frozen=True)
class ModelEntry:
    """A named model of a family: its default weights (a hub id or a folder) and the pipeline options that
    select it (e.g. a variant), passed to ``Pipeline.from_pretrained``."""

    repo: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Distilled:
    """A family's step-distilled weights (e.g. Lightning LoRAs) and how its presets run them.

    steps: preset NFE -> the step count the weights were distilled for (the draft of ``specedit-distill-N``
    runs that many steps). schedule: the schedule the weights were distilled on (None: the base model's).
    cfg_scale: the classifier-free guidance scale they expect (1.0: CFG off; None: the family's default).
    pattern: a regular expression that recognises these weights in a LoRA file name, its first group the
    step count (``match``). source: where the published files are (a hub repo or a path), for the docs and
    errors.
    """

    steps: Mapping[int, int]
    schedule: ShiftSchedule | None = None
    cfg_scale: float | None = None
    pattern: str | None = None
    source: str | None = None

    def __post_init__(self):
        for nfe, n in self.steps.items():
            if nfe < 1 or n < 1:
                raise ValueError(
                    f"Distilled.steps must map positive NFE to positive step counts, got {nfe}: {n}"
                )
        if self.cfg_scale is not None and not self.cfg_scale >= 1.0:
            raise ValueError(f"Distilled.cfg_scale must be >= 1 (1 = CFG off), got {self.cfg_scale}")

    def match(self, filename: str) -> int | None:
        """The distilled step count named by a LoRA ``filename`` these weights are (None: not recognised)."""
        hit = re.search(self.pattern, Path(filename).name) if self.pattern else None
        return int(hit.group(1)) if hit else None


@dataclass(frozen=True, eq=False)
class Family:
    """One editor family.

    name: registry key. models: model names (``specedit edit --model``) -> :class:`ModelEntry`.
    schedule: the model's flow-matching shift schedule. patch: latent pixels per token side; vae_factor:
    image pixels per latent pixel. fit_tokens: the fine token count the stage shifts are fitted at (the
    model's full-resolution shift there is ``h_ori``). fitted: NFE -> (shifts, Z) from
    ``samplers.ntdm.fit_ntdm(steps, ends, h_ori, z_bounds=(z_floor, 100))`` for ``specedit.presets.SPLITS``;
    free_fit: the same without the floor, where ``z_floor`` > 1 (the "-z1" ablation). drafter / verifier: the
    family's SpecEdit draft and verifier. draft_ablations: draft factors of the "-draftN" ablations.
    costs(grid, *, text_tokens=None, ref_grid=None, cfg=True): the full-size cost model at a fine token grid
    (``cfg`` False: without the true-CFG branch a family runs by default, if it has one).
    tiny_editor(batch=1, seed=0): a tiny random editor (conformance tests). random_editor(config, height, width,
    *, device, dtype, seed, cfg=True): an editor with random weights at a named size of ``bench_configs``
    (latency).
    flops_report(**options): the ``specedit flops`` report of a plain baseline edit. pipeline: the end-to-end
    pipeline class (None: adapter only). distilled: the family's step-distilled weights (:class:`Distilled`;
    None: no ``distilled-N`` / ``specedit-distill-N`` presets).
    """

    name: str
    schedule: ShiftSchedule
    patch: int
    vae_factor: int
    fit_tokens: int
    fitted: Mapping[int, Fit]
    costs: Callable[..., Any]
    tiny_editor: Callable[..., Any]
    models: Mapping[str, ModelEntry] = field(default_factory=dict)
    z_floor: float = 1.0
    free_fit: Mapping[int, Fit] = field(default_factory=dict)
    drafter: Any = LowResDrafter()
    verifier: Any = FeatureVerifier()
    draft_ablations: tuple[float, ...] = (6, 8)
    random_editor: Callable[..., Any] | None = None
    bench_configs: tuple[str, ...] = ()
    flops_report: Callable[..., dict] | None = None
    pipeline: Any = None
    distilled: Distilled | None = None

    def __post_init__(self):
        if self.patch < 1 or self.vae_factor < 1 or self.fit_tokens < 1:
            raise ValueError(f"family {self.name!r}: patch, vae_factor and fit_tokens must be positive")
        if self.z_floor < 1.0:
            raise ValueError(f"family {self.name!r}: z_floor must be >= 1, got {self.z_floor}")

    def cfg_for(self, method) -> bool:
        """Whether ``method`` runs the family's default CFG branches: not for a step-distilled method whose
        weights expect CFG off (``Distilled.cfg_scale`` 1)."""
        d = self.distilled
        return not (
            getattr(method, "weights", "base") == "distilled" and d is not None and d.cfg_scale == 1.0
        )

    @property
    def h_ori(self) -> float:
        """The model's full-resolution shift e^mu at ``fit_tokens`` (what the stage shifts are fitted to)."""
        return math.exp(self.schedule.mu(self.fit_tokens))

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Fine token grid of an image of ``height`` x ``width`` pixels."""
        return grid_of(height, width, vae_factor=self.vae_factor, patch=self.patch)

    def shape(self, height: int, width: int, batch: int = 1) -> EditShape:
        return EditShape(self.grid(height, width), self.patch, batch)


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` to the registry (a family of the same name is replaced); returns it."""
    if not isinstance(family, Family):
        raise TypeError(f"register takes a Family, got {type(family).__name__}")
    _REGISTRY[family.name] = family
    return family


def families() -> dict[str, Family]:
    """Every registered family by name, the built-in ones first."""
    for module in BUILTIN.values():
        importlib.import_module(module)
    order = [n for n in BUILTIN if n in _REGISTRY] + [n for n in _REGISTRY if n not in BUILTIN]
    return {n: _REGISTRY[n] for n in order}


def get_family(family: str | Family) -> Family:
    """A family by name or by one of its model names (e.g. "flux-kontext-dev"); a Family passes through."""
    if isinstance(family, Family):
        return family
    table = families()
    if family in table:
        return table[family]
    for f in table.values():
        if family in f.models:
            return f
    models = sorted(m for f in table.values() for m in f.models)
    raise ValueError(
        f"unknown family {family!r}; choose from {', '.join(table)} or a model: {', '.join(models)}"
    )
