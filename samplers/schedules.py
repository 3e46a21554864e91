"""Flow-matching sigma schedules: the resolution-dependent exponential shift, fixed shifts, named schedules,
diffusers ``scheduler_config.json`` files, and per-stage shifted ranges.

Conventions (rectified flow): x_sigma = (1 - sigma) * x0 + sigma * noise; sigma runs from 1 (noise) to 0
(data); schedules include the terminal 0, so ``num_steps`` steps need ``num_steps + 1`` sigmas.

The shifted schedules are computed in float32 in the same order of operations as diffusers'
``FlowMatchEulerDiscreteScheduler``, so they are bit-identical to it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from models.loading import read_config


@dataclass(frozen=True)
class ShiftSchedule:
    """Resolution-dependent shift: mu interpolates linearly in the *target* token count.

    ``static_shift`` replaces it by one fixed shift s for every size (diffusers' ``use_dynamic_shifting``
    false): sigma -> s sigma / (1 + (s - 1) sigma), the same map as the exponential shift with mu = ln s.
    """

    base_seq_len: int
    max_seq_len: int
    base_shift: float
    max_shift: float
    shift_terminal: float | None = None  # stretch so the last non-zero sigma equals this
    static_shift: float | None = None

    def __post_init__(self):
        if self.static_shift is not None and not self.static_shift > 0:
            raise ValueError(f"static_shift must be positive, got {self.static_shift}")
        if self.shift_terminal is not None and not 0 < self.shift_terminal < 1:
            raise ValueError(f"shift_terminal must lie in (0, 1), got {self.shift_terminal}")

    def mu(self, seq_len: int) -> float:
        if self.static_shift is not None:
            return math.log(self.static_shift)
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return seq_len * slope + (self.base_shift - slope * self.base_seq_len)

    def shift(self, seq_len: int) -> float:
        """The constant-shift equivalent e^mu at ``seq_len`` target tokens (before any terminal stretch)."""
        return self.static_shift if self.static_shift is not None else math.exp(self.mu(seq_len))


FLUX_SCHEDULE = ShiftSchedule(base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15)
QWEN_SCHEDULE = ShiftSchedule(
    base_seq_len=256, max_seq_len=8192, base_shift=0.5, max_shift=0.9, shift_terminal=0.02
)
# Qwen-Image-Lightning's published scheduler config: dynamic shifting with base = max = ln 3 (a fixed shift of
# 3 at every size) and no terminal stretch; its LoRAs were distilled on this schedule.
LIGHTNING_SCHEDULE = ShiftSchedule(
    base_seq_len=256, max_seq_len=8192, base_shift=math.log(3), max_shift=math.log(3)
)
SCHEDULES = {"flux": FLUX_SCHEDULE, "qwen": QWEN_SCHEDULE, "lightning": LIGHTNING_SCHEDULE}


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
    if schedule.static_shift is not None:
        s = schedule.static_shift
        sigmas = s * base / (1 + (s - 1) * base)
    else:
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


# ----------------------------------------------------------------------------------------------- configs
_UNSUPPORTED_FLAGS = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
)


def schedule_from_config(c: dict, source: str) -> ShiftSchedule:
    """The schedule of a diffusers ``FlowMatchEulerDiscreteScheduler`` config dict. Dynamic exponential
    shifting and fixed shifts are supported; missing keys take the scheduler's defaults (base/max sequence
    256/4096, base/max shift 0.5/1.15, shift 1). Other sigma transforms raise, naming ``source``."""
    if c.get("time_shift_type", "exponential") != "exponential":
        raise ValueError(
            f"{source}: time_shift_type {c['time_shift_type']!r} is not supported (only 'exponential')"
        )
    for flag in _UNSUPPORTED_FLAGS:
        if c.get(flag, False):
            raise ValueError(
                f"{source} sets {flag}=true, which this library's Euler sampler does not support"
            )
    dynamic = c.get("use_dynamic_shifting", False)
    return ShiftSchedule(
        base_seq_len=c.get("base_image_seq_len", 256),
        max_seq_len=c.get("max_image_seq_len", 4096),
        base_shift=c.get("base_shift", 0.5),
        max_shift=c.get("max_shift", 1.15),
        shift_terminal=c.get("shift_terminal") or None,
        static_shift=None if dynamic else float(c.get("shift", 1.0)),
    )


def read_schedule(path: str | os.PathLike | None, default: ShiftSchedule) -> ShiftSchedule:
    """The schedule of a ``scheduler_config.json`` (``default`` when there is no such file). Invalid JSON
    raises a ValueError naming the file, line and column."""
    if path is None or not Path(path).is_file():
        return default
    return schedule_from_config(read_config(Path(path)), str(path))


def load_schedule(spec: str | os.PathLike | ShiftSchedule) -> ShiftSchedule:
    """A schedule by name (``SCHEDULES``: flux, qwen, lightning), from a ``scheduler_config.json``, or from a
    folder holding one (directly or in ``scheduler/``); a ShiftSchedule passes through."""
    if isinstance(spec, ShiftSchedule):
        return spec
    if str(spec) in SCHEDULES:
        return SCHEDULES[str(spec)]
    path = Path(spec)
    if path.is_dir():
        found = [f for f in (path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json")
                 if f.is_file()]  # fmt: skip
        if not found:
            raise ValueError(f"{path} holds no scheduler_config.json (nor scheduler/scheduler_config.json)")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"unknown schedule {str(spec)!r}: choose from {', '.join(SCHEDULES)} "
                         "or give a scheduler_config.json")  # fmt: skip
    return read_schedule(path, SCHEDULES["flux"])
