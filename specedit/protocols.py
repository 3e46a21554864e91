"""The interfaces SpecEdit is assembled from: an editor adapter per model family and one Protocol per part.

Each SpecEdit part has one verb and sees tensors and an :class:`Editor`, never a model class, and plans its
own work (``plan``: the events a run records, priced by the editor's or the family's cost model). The default
implementations are frozen dataclasses whose fields are the hyperparameters, validated in ``__post_init__``,
so an ablation is ``dataclasses.replace(part, field=value)``. Implementations satisfy these Protocols
structurally (they live in ``samplers``, ``verify`` and ``specedit.drafters`` and do not import this module);
``tests/specedit/test_conformance.py`` checks their signatures against these.

Shape legend: b batch, c latent channels, H W fine latent pixels, h w fine token grid (H/p, W/p), p patch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from models.work import EditShape, Forward, VaeWork
from samplers.expand import Transition
from samplers.field import NoiseField
from samplers.flow import Denoiser
from samplers.layout import Layout
from samplers.mixed_res import Trajectory
from samplers.schedules import ShiftSchedule
from verify.verifiers import Verdict, VerifierPlan

Callback = Callable[[dict], None] | None


@runtime_checkable
class Editor(Protocol):
    """What a model family implements once to get SpecEdit (see ``specedit.kontext.KontextEditor``).

    - ``source``: (b, c, H, W) normalised latent of the source image; it is also the edit's reference and
      fixes the target size (SpecEdit edits in place).
    - ``grid``: the fine token grid (H/p, W/p); ``patch``: p, latent pixels per token side; ``pack`` /
      ``unpack``: the family's latent <-> token packing. ``schedule``: the model's flow-matching schedule.
    - ``denoiser(layout)``: a ``(x, sigma) -> v`` for target tokens at ``layout``'s positions, with the
      reference at ``layout.ref_factor`` and the family's guidance (distilled embedding, or true CFG with
      both branches on the same token set).
    - ``features(latent, taps)`` / ``decode(latent)``: the VAE decoder, for verifiers.
    - ``cost(work)``: FLOPs of one recorded :class:`~models.work.Forward`, :class:`~models.work.Forecast` or
      :class:`~models.work.VaeWork`.
    - ``model`` (optional): the transformer, whose ``stack_hook`` (``models.hooks``) feature caches use.
    """

    source: Tensor
    grid: tuple[int, int]
    patch: int
    schedule: ShiftSchedule

    def denoiser(self, layout: Layout) -> Denoiser: ...

    def pack(self, latent: Tensor) -> Tensor: ...

    def unpack(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor: ...

    def features(self, latent: Tensor, taps: tuple[str, ...]) -> dict[str, Tensor]: ...

    def decode(self, latent: Tensor) -> Tensor: ...

    def cost(self, work: Forward | VaeWork) -> float: ...


@runtime_checkable
class Drafter(Protocol):
    """Produce a complete low-resolution edit (the speculative draft)."""

    def draft(self, editor: Editor, noise_field: NoiseField, *, callback: Callback = None,
              progress: bool = False) -> Trajectory: ...  # fmt: skip

    def plan(self, shape: EditShape) -> list[Forward]: ...


@runtime_checkable
class Verifier(Protocol):
    """Decide which coarse cells need full resolution, given a candidate clean latent of the edit.

    ``needs_candidate``: False when the verdict does not depend on the edit (then ``candidate`` is None).
    ``with_budget(fraction)``: the same verifier at a fixed expanded fraction where its rule is data-dependent
    (itself otherwise). ``plan(shape, fraction)``: its VAE work and expanded fraction, ``fraction`` being the
    assumed outcome of a data-dependent rule.
    """

    needs_candidate: bool

    def verify(self, editor: Editor, candidate: Tensor | None) -> Verdict: ...

    def with_budget(self, fraction: float) -> Verifier: ...

    def plan(self, shape: EditShape, fraction: float) -> VerifierPlan: ...


@runtime_checkable
class TokenExpander(Protocol):
    """Lift a coarse latent at noise level sigma to the 2x finer grid."""

    def expand(self, editor: Editor, coarse: Tensor, sigma: float, eps_hat: Tensor | None,
               noise_field: NoiseField) -> Tensor: ...  # fmt: skip


@runtime_checkable
class Renoise(Protocol):
    """Move tokens back along their noise path at a resolution change (a strategy of the sampler);
    ``min_z``: the least rewind factor the rule is valid for."""

    min_z: float

    def renoise(self, x: Tensor, t: Transition) -> Tensor: ...


@runtime_checkable
class FeatureCache(Protocol):
    """Serve a sampling stage's block-stack features (``samplers.caching``): at step ``i`` of ``n`` either call
    ``run()`` (the blocks' residual on each stream) and keep what the method needs, or forecast them from
    ``memory``; returns (features, new memory). ``schedule(n)``: which steps compute (the plan's view).
    ``terms``: multiply-adds per element of a forecast (its cost); ``held``: feature sets kept in memory."""

    terms: int
    held: int

    def step(self, memory: Any, i: int, n: int, run: Callable[[], tuple[Tensor, ...]]) -> tuple: ...

    def schedule(self, n: int) -> list[bool]: ...


@runtime_checkable
class Sampler(Protocol):
    """Sample the edit over resolution stages; ``select`` is a verdict or a callable on the coarse estimate.

    ``plan(shape, n_expanded, skip_first=...)``: the forwards of a run that expands ``n_expanded`` coarse cells.
    """

    def sample(self, editor: Editor, noise_field: NoiseField, select: Any, *, x0_init: Tensor | None = None,
               callback: Callback = None, progress: bool = False) -> Trajectory: ...  # fmt: skip

    def plan(self, shape: EditShape, n_expanded: int, *, skip_first: bool = False) -> list[Forward]: ...


@runtime_checkable
class Method(Protocol):
    """A complete editing method: ``run`` it on an editor, or ``plan`` its work at any shape;
    ``with_budget(fraction)`` fixes a data-dependent verifier's expanded fraction (benchmarks)."""

    def run(self, editor: Editor, seed: int, *, callback: Callback = None, progress: bool = False) -> Any: ...

    def with_budget(self, fraction: float) -> Method: ...

    def plan(self, shape: EditShape, fraction: float = 0.25) -> Any: ...
