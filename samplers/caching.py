"""Feature caching inside a sampling stage: FORA and TaylorSeer on the transformer's block stack.

A cache *policy* is a frozen dataclass of hyperparameters with one verb, ``step(memory, i, n, run)``: at step
``i`` of an ``n``-step stage it either calls ``run()`` (the block stack, computed) and keeps what it needs in
its memory, or forecasts the stack's features from that memory without running the blocks. ``schedule(n)``
says which steps compute, so a plan knows the run's work in advance (:class:`models.work.Forecast` events for
the cached steps). Policies are pure; :class:`StageCache` holds one stage's memory and plugs the policy into
the model's one hook point (``models.hooks``): the cached feature is the stack's *residual* on each stream,
``(img_out - img_in, txt_out - txt_in)``, added back to the fresh embedded input of a cached step (what FORA
reuses per layer and what FreqCa calls the cumulative residual feature, held once per stack).

Caches live for one stage: a stage changes the token layout (draft, coarse, mixed, full), so the next stage
starts a new memory with its own warm-up. Within a stage the layout is fixed, so the mixed stage's coarse and
expanded tokens are served alike. A model called several times per step (CFG branches run as two forwards)
keeps one memory per call slot.

Schedules (facts from the papers' public code): FORA computes every N-th step from the first
(``i % N == 0``); TaylorSeer computes the first ``warmup`` steps and then every N-th
(``i < warmup or (i - warmup) % N == 0``), keeping finite-difference derivatives up to order O divided by the
step distance between computed steps, and forecasts ``sum_k d_k (i - i_last)^k / k!``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

Features = tuple[Tensor, ...]  # the stack's residual on each stream: (img, txt)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class Interval:
    """The schedule shared by the policies: the first ``warmup`` steps of a stage compute, then one step in
    ``interval`` (each computed step is followed by ``interval - 1`` cached ones). ``warmup`` 1 gives FORA's
    ``i % N == 0``; TaylorSeer's and FreqCa's code use 3 ("first_enhance": steps 0, 1, 2, then 2 + N, ...)."""

    interval: int
    warmup: int = 1

    def __post_init__(self):
        _check_int(f"{type(self).__name__}.interval", self.interval, 1)
        _check_int(f"{type(self).__name__}.warmup", self.warmup, 1)

    def computes(self, i: int) -> bool:
        return i < self.warmup or (i - self.warmup + 1) % self.interval == 0

    def schedule(self, n: int) -> list[bool]:
        """Which of the ``n`` steps of a stage run the blocks (a plan's view of ``step``)."""
        return [self.computes(i) for i in range(n)]


def _taylor_refresh(memory, i: int, features: Features, order: int):
    """(i, [F, dF, d2F, ...]): each new derivative is the difference of the previous order's values over the
    step distance to the previous computed step (TaylorSeer's ``derivative_approximation``)."""
    derivs = [features]
    if memory is not None:
        last, old = memory
        for k in range(min(order, len(old))):
            derivs.append(tuple((a - b) / (i - last) for a, b in zip(derivs[k], old[k])))
    return i, derivs


def _series(derivs: list[Features], weights: Sequence[float]) -> Features:
    """sum_k weights[k] * derivs[k], stream by stream."""
    return tuple(sum(w * dk[s] for w, dk in zip(weights, derivs)) for s in range(len(derivs[0])))


@dataclass(frozen=True, kw_only=True)
class FORA(Interval):
    """Fast-forward caching (FORA, Selvaraju et al. 2024): compute every ``interval``-th step and reuse the last
    computed residual in between."""

    terms = 1  # the cached residual added to the input
    held = 1  # feature sets kept per stream

    def step(self, memory: Any, i: int, n: int, run: Callable[[], Features]) -> tuple[Features, Any]:
        if self.computes(i) or memory is None:
            features = run()
            return features, features
        return memory, memory


@dataclass(frozen=True, kw_only=True)
class TaylorSeer(Interval):
    """Forecast the residual by a Taylor series of order ``order`` in the step index (TaylorSeer, Liu et al.
    2025): ``sum_k d_k (i - i_last)^k / k!`` with finite-difference derivatives; order 0 is FORA."""

    order: int = 1
    warmup: int = 3

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.order, bool) or not isinstance(self.order, int) or not 0 <= self.order <= 4:
            raise ValueError(f"TaylorSeer.order must be an integer in 0..4, got {self.order!r}")

    @property
    def terms(self) -> int:
        return self.order + 1  # one multiply-add per derivative

    @property
    def held(self) -> int:
        return self.order + 1

    def step(self, memory: Any, i: int, n: int, run: Callable[[], Features]) -> tuple[Features, Any]:
        if self.computes(i) or memory is None:
            features = run()
            return features, _taylor_refresh(memory, i, features, self.order)
        last, derivs = memory
        x = i - last
        return _series(derivs, [x**k / math.factorial(k) for k in range(len(derivs))]), memory


def _low_pass(f: Tensor, cutoff: float) -> Tensor:
    """The part of ``f`` (b, n, d) whose frequency along the token axis is within ``cutoff`` of the highest
    (1-D FFT over tokens, as FreqCa's code does for Qwen-Image; it works for any token layout)."""
    if f.shape[1] == 0:  # an empty stream (a single-stream model's second one)
        return f
    spec = torch.fft.fft(f.float(), dim=1)
    freq = torch.fft.fftfreq(f.shape[1], device=f.device).abs()
    keep = (freq <= cutoff * freq.max()).to(spec.dtype)[None, :, None]
    return torch.fft.ifft(spec * keep, dim=1).real.to(f.dtype)


@dataclass(frozen=True, kw_only=True)
class FreqCa(Interval):
    """Frequency-aware caching (FreqCa, 2025): the residual's low-frequency band (``cutoff`` of the token-axis
    spectrum) is reused, its high band forecast by a Hermite series of order ``order`` (scale 0.71), as in
    FreqCa's public code; derivatives are TaylorSeer's, per band."""

    order: int = 2
    cutoff: float = 0.1
    warmup: int = 3

    SCALE = 0.71  # FreqCa's Hermite argument scale

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.order <= 4 or not 0.0 < self.cutoff < 1.0:
            raise ValueError(
                f"FreqCa needs order in 0..4 and cutoff in (0, 1), got {self.order}, {self.cutoff}"
            )

    @property
    def terms(self) -> int:
        return self.order + 2  # the reused low band, plus one multiply-add per high-band term

    @property
    def held(self) -> int:
        return self.order + 2

    def step(self, memory: Any, i: int, n: int, run: Callable[[], Features]) -> tuple[Features, Any]:
        if self.computes(i) or memory is None:
            features = run()
            low = tuple(_low_pass(f, self.cutoff) for f in features)
            high = tuple(f - lo for f, lo in zip(features, low))
            return features, (low, _taylor_refresh(memory[1] if memory else None, i, high, self.order))
        low, (last, derivs) = memory
        x, a = i - last, self.SCALE
        weights = [_hermite(k, a * x) * a**k / math.factorial(k) for k in range(len(derivs))]
        weights[0] = 1.0  # the computed high band itself
        return tuple(lo + h for lo, h in zip(low, _series(derivs, weights))), memory


def _hermite(k: int, y: float) -> float:
    """The physicists' Hermite polynomial H_k(y) (H_0 = 1, H_1 = 2y, H_{k+1} = 2y H_k - 2k H_{k-1})."""
    prev, cur = 1.0, 2.0 * y
    if k == 0:
        return prev
    for j in range(1, k):
        prev, cur = cur, 2.0 * y * cur - 2.0 * j * prev
    return cur


@dataclass(frozen=True, kw_only=True)
class FoCa(Interval):
    """Forecast then calibrate (FoCa, 2025): caching as ODE solving. A cached step predicts with a BDF2 step from
    the last two values (computed or predicted), ``F_k + (F_k - F_{k-1})``, and calibrates it Heun-style by
    averaging that one-step slope with the slope between the last two computed anchors,
    ``(A_1 - A_0) / (i_1 - i_0)``: ``F_k + 0.5 (F_k - F_{k-1}) + 0.5 (A_1 - A_0) / (i_1 - i_0)``. No official code
    was found; the predictor and corrector follow the public re-implementation in cache-dit, with the anchor
    difference taken per step (our reading: without it the correction adds a whole interval's change each step).
    """

    warmup: int = 3

    terms = 4
    held = 4

    def step(self, memory: Any, i: int, n: int, run: Callable[[], Features]) -> tuple[Features, Any]:
        if self.computes(i) or memory is None:
            features = run()
            if memory is None:
                return features, (features, features, (i, features), (i, features))
            return features, (features, memory[0], (i, features), memory[2])
        f_k, f_km1, (i1, a1), (i0, a0) = memory
        slope = 1.0 / max(i1 - i0, 1)
        pred = tuple(
            fk + 0.5 * (fk - fm) + 0.5 * slope * (x1 - x0) for fk, fm, x1, x0 in zip(f_k, f_km1, a1, a0)
        )
        return pred, (pred, f_k, (i1, a1), (i0, a0))


@dataclass
class StageCache:
    """One stage's cache: a policy, its memory per call slot, and the hook the model calls (``models.hooks``).

    ``begin(i)`` is called before the denoiser call(s) of step ``i``; every stack call of that step is one slot.
    """

    policy: Any
    n: int
    memory: dict[int, Any] = field(default_factory=dict)
    i: int = 0
    slot: int = 0
    computed: list[bool] = field(default_factory=list)

    def begin(self, i: int) -> None:
        self.i, self.slot = i, 0

    def hook(self, run: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], img: Tensor, txt: Tensor):
        """The model's ``stack_hook``: the policy's step on the residual of (img, txt)."""
        outs = []

        def compute() -> Features:
            outs.append(run(img, txt))
            return outs[0][0] - img, outs[0][1] - txt

        res, self.memory[self.slot] = self.policy.step(self.memory.get(self.slot), self.i, self.n, compute)
        if self.slot == 0:
            self.computed.append(bool(outs))
        self.slot += 1
        return outs[0] if outs else (img + res[0], txt + res[1])  # a computed step is exactly the stack's

    def bytes_held(self, features: Sequence[Tensor]) -> int:
        """Bytes of cached features for one slot (``features``: one step's residuals)."""
        return self.policy.held * sum(f.numel() * f.element_size() for f in features)
