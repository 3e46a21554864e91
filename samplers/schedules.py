"""Flow-matching sigma schedules: the resolution-dependent exponential shift and per-stage shifted ranges.

Conventions (rectified flow): x_sigma = (1 - sigma) * x0 + sigma * noise; sigma runs from 1 (noise) to 0
(data); schedules include the terminal 0, so ``num_steps`` steps need ``num_steps + 1`` sigmas.

The shifted schedules are computed in float32 in the same order of operations as diffusers'
``FlowMatchEulerDiscreteScheduler``, so they are bit-identical to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ShiftSchedule:
    """Resolution-dependent shift: mu interpolates linearly in the *target* token count."""

    base_seq_len: int
    max_seq_len: int
    base_shift: float
    max_shift: float
    shift_terminal: float | None = None  # stretch so the last non-zero sigma equals this

    def mu(self, seq_len: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return seq_len * slope + (self.base_shift - slope * self.base_seq_len)


FLUX_SCHEDULE = ShiftSchedule(base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15)
QWEN_SCHEDULE = ShiftSchedule(
    base_seq_len=256, max_seq_len=8192, base_shift=0.5, max_shift=0.9, shift_terminal=0.02
)


def time_shift(sigmas: Tensor, mu: float) -> Tensor:
    """Exponential time shift e^mu / (e^mu + 1/sigma - 1); maps 1 -> 1 and pushes mass toward noise."""
    # a tensor numerator: torch computes ``python_scalar / tensor`` as reciprocal * scalar (two roundings)
    e = torch.full_like(sigmas, math.exp(mu))
    return e / (e + (1 / sigmas - 1))


def flow_sigmas(num_steps: int, seq_len: int, schedule: ShiftSchedule = FLUX_SCHEDULE) -> Tensor:
    """(num_steps + 1,) float32 sigmas for ``seq_len`` target tokens, ending in 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64).float()
    sigmas = time_shift(base, schedule.mu(seq_len))
    if schedule.shift_terminal:
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - schedule.shift_terminal))
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def shifted_range(sigma_start: float, sigma_end: float, num_steps: int, shift: float) -> Tensor:
    """(num_steps + 1,) sigmas from ``sigma_start`` to ``sigma_end``, uniform after a constant shift.

    Uniform in u = sigma / (shift - (shift - 1) sigma), mapped back by sigma = shift u / (1 + (shift - 1) u):
    RALU's per-stage "tailored scheduler shifting". Computed in float64, returned as float32.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 <= sigma_end < sigma_start <= 1.0:
        raise ValueError(f"need 0 <= sigma_end < sigma_start <= 1, got {sigma_start} -> {sigma_end}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    inv = lambda s: s / (shift - (shift - 1) * s)
    u = torch.linspace(inv(sigma_start), inv(sigma_end), num_steps + 1, dtype=torch.float64)
    return (shift * u / (1 + (shift - 1) * u)).float()
