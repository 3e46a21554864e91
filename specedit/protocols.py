"""The interfaces SpecEdit is assembled from: an editor adapter per model family and one Protocol per part.

Each SpecEdit part has one verb and sees tensors and an :class:`Editor`, never a model class; the default
implementations are frozen dataclasses whose fields are the hyperparameters, so an ablation is
``dataclasses.replace(part, field=value)``. Implementations satisfy these Protocols structurally (they live in
``samplers``, ``verify`` and ``specedit.drafters`` and do not import this module).

Shape legend: b batch, c latent channels, H W fine latent pixels, h w fine token grid (H/2, W/2).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from samplers.field import NoiseField
from samplers.flow import Denoiser
from samplers.layout import Layout
from samplers.mixed_res import Trajectory
from samplers.schedules import ShiftSchedule
from verify.verifiers import Verdict


@runtime_checkable
class Editor(Protocol):
    """What a model family implements once to get SpecEdit (see ``specedit.kontext.KontextEditor``).

    - ``source``: (b, c, H, W) normalised latent of the source image; it is also the edit's reference and
      fixes the target size (SpecEdit edits in place).
    - ``grid``: the fine token grid (H/2, W/2). ``schedule``: the model's flow-matching shift schedule.
    - ``denoiser(layout)``: a ``(x, sigma) -> v`` for target tokens at ``layout``'s positions, with the
      reference at ``layout.ref_factor`` and the family's guidance (distilled embedding, or true CFG with
      both branches on the same token set).
    - ``features(latent, taps)`` / ``decode(latent)``: the VAE decoder, for verifiers.
    - ``cost(event)``: FLOPs of one recorded event ({"kind": "forward" | "features" | "decode", ...}).
    """

    source: Tensor
    grid: tuple[int, int]
    schedule: ShiftSchedule

    def denoiser(self, layout: Layout) -> Denoiser: ...

    def features(self, latent: Tensor, taps: tuple[str, ...]) -> dict[str, Tensor]: ...

    def decode(self, latent: Tensor) -> Tensor: ...

    def cost(self, event: dict) -> float: ...


@runtime_checkable
class Drafter(Protocol):
    """Produce a complete low-resolution edit (the speculative draft)."""

    def draft(self, editor: Editor, field: NoiseField) -> Trajectory: ...


@runtime_checkable
class Verifier(Protocol):
    """Decide which coarse cells need full resolution, given a candidate clean latent of the edit."""

    def verify(self, editor: Editor, candidate: Tensor | None) -> Verdict: ...


@runtime_checkable
class TokenExpander(Protocol):
    """Lift a coarse latent at noise level sigma to the 2x finer grid."""

    def expand(self, coarse: Tensor, sigma: float, eps_hat: Tensor | None, field: NoiseField) -> Tensor: ...


@runtime_checkable
class MixedResSampler(Protocol):
    """Sample the edit over resolution stages; ``select`` is a verdict or a callable on the coarse estimate."""

    def sample(self, editor: Editor, field: NoiseField, select: Any) -> Trajectory: ...
