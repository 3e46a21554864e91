"""Flow-matching schedules and samplers as pure functions (no hidden step state)."""

from samplers.flow import Denoiser, euler_step, noise_like, sample, x0_estimate
from samplers.schedules import (
    FLUX_SCHEDULE,
    LIGHTNING_SCHEDULE,
    QWEN_SCHEDULE,
    SCHEDULES,
    ShiftSchedule,
    flow_sigmas,
    load_schedule,
    shifted_range,
    time_shift,
)

__all__ = [
    "Denoiser",
    "euler_step",
    "noise_like",
    "sample",
    "x0_estimate",
    "FLUX_SCHEDULE",
    "LIGHTNING_SCHEDULE",
    "QWEN_SCHEDULE",
    "SCHEDULES",
    "load_schedule",
    "ShiftSchedule",
    "flow_sigmas",
    "shifted_range",
    "time_shift",
]
