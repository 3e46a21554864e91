"""Schedules: bit-equality with diffusers' FlowMatchEulerDiscreteScheduler (dynamic, fixed and distilled
shifts, from its own config files); named schedules; per-stage shifted ranges."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from refs import LIGHTNING_CONFIG

from samplers import (
    FLUX_SCHEDULE,
    LIGHTNING_SCHEDULE,
    QWEN_SCHEDULE,
    ShiftSchedule,
    flow_sigmas,
    load_schedule,
    shifted_range,
)


def _diffusers_sigmas(schedule: ShiftSchedule, steps: int, seq_len: int) -> torch.Tensor:
    s = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=schedule.base_seq_len,
        max_image_seq_len=schedule.max_seq_len,
        base_shift=schedule.base_shift,
        max_shift=schedule.max_shift,
        shift_terminal=schedule.shift_terminal,
        use_dynamic_shifting=True,
        time_shift_type="exponential",
    )
    # the pipelines pass sigmas = linspace(1, 1/N, N) and mu from the target token count
    s.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=schedule.mu(seq_len))
    return s.sigmas


@pytest.mark.parametrize(
    "schedule", [FLUX_SCHEDULE, QWEN_SCHEDULE, LIGHTNING_SCHEDULE], ids=["flux", "qwen", "lightning"]
)
@pytest.mark.parametrize("steps,seq_len", [(50, 4096), (28, 4096), (4, 64), (8, 256), (30, 1024), (18, 6032)])
def test_equals_diffusers(schedule, steps, seq_len):
    ours = flow_sigmas(steps, seq_len, schedule)
    assert ours.dtype == torch.float32 and ours[-1] == 0 and len(ours) == steps + 1
    assert torch.equal(ours, _diffusers_sigmas(schedule, steps, seq_len))


def test_reference_values():
    """Spot values from the spec: mu at 1024^2 and the first/last sigmas."""
    assert FLUX_SCHEDULE.mu(4096) == pytest.approx(1.15)
    assert QWEN_SCHEDULE.mu(4096) == pytest.approx(0.693548, abs=1e-6)
    flux = flow_sigmas(28, 4096)
    assert flux[:4].tolist() == pytest.approx([1.0, 0.98841, 0.97622, 0.96339], abs=1e-5)
    qwen = flow_sigmas(50, 4096, QWEN_SCHEDULE)
    assert qwen[-3:].tolist() == pytest.approx([0.05848, 0.02, 0.0], abs=1e-5)


def test_shifted_range():
    s = shifted_range(0.7, 0.0, 7, 2.226)
    assert s[0] == pytest.approx(0.7) and s[-1] == 0 and len(s) == 8
    assert torch.all(s[1:] < s[:-1])
    # shift 1 is a plain linspace; a larger shift spends more steps near noise
    assert torch.allclose(shifted_range(1.0, 0.0, 4, 1.0), torch.linspace(1, 0, 5))
    assert shifted_range(1.0, 0.0, 4, 3.0)[1] > shifted_range(1.0, 0.0, 4, 1.0)[1]
    with pytest.raises(ValueError, match="sigma_end < sigma_start"):
        shifted_range(0.3, 0.5, 4, 1.0)
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(0, 100)


@pytest.mark.parametrize(
    "config",
    [LIGHTNING_CONFIG, {"use_dynamic_shifting": False, "shift": 3.0},
     {"use_dynamic_shifting": False, "shift": 2.5, "shift_terminal": 0.05},
     {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9, "shift_terminal": 0.02,
      "max_image_seq_len": 8192}],
    ids=["lightning", "static-3", "static-terminal", "qwen"],
)  # fmt: skip
@pytest.mark.parametrize("steps,seq_len", [(8, 4096), (4, 6032), (6, 256)])
def test_config_file_equals_diffusers(tmp_path, config, steps, seq_len):
    """A scheduler_config.json read by us gives diffusers' own sigmas for that config, bit for bit."""
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    schedule = load_schedule(tmp_path)  # the folder form: <repo>/scheduler/scheduler_config.json
    ref = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = schedule.mu(seq_len)
    ref.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert torch.equal(flow_sigmas(steps, seq_len, schedule), ref.sigmas)


def test_named_schedules_and_errors(tmp_path):
    assert load_schedule("lightning") is LIGHTNING_SCHEDULE and load_schedule("flux") is FLUX_SCHEDULE
    assert LIGHTNING_SCHEDULE.shift(64) == pytest.approx(3.0) == LIGHTNING_SCHEDULE.shift(8192)
    assert FLUX_SCHEDULE.shift(4096) == pytest.approx(math.exp(1.15))
    with pytest.raises(ValueError, match=r"^unknown schedule 'turbo': choose from flux, qwen, lightning or"):
        load_schedule("turbo")
    with pytest.raises(ValueError, match="holds no scheduler_config.json"):
        load_schedule(tmp_path)
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"use_dynamic_shifting": True, "time_shift_type": "linear"}))
    with pytest.raises(ValueError, match="time_shift_type 'linear' is not supported"):
        load_schedule(path)
    path.write_text(json.dumps({"use_dynamic_shifting": True, "use_beta_sigmas": True}))
    with pytest.raises(ValueError, match="scheduler_config.json sets use_beta_sigmas=true"):
        load_schedule(path)
    with pytest.raises(ValueError, match="static_shift must be positive, got 0"):
        ShiftSchedule(256, 4096, 0.5, 1.15, static_shift=0)
