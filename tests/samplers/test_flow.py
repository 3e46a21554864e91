"""Euler sampler: exact on an analytic linear path, pure (no hidden state), callback, errors."""

import pytest
import torch

from samplers import euler_step, flow_sigmas, noise_like, sample, x0_estimate


def test_exact_on_linear_path():
    """With the true velocity of x_t = (1-t) x0 + t eps, every Euler step lands exactly on the path."""
    x0, eps = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    sigmas = flow_sigmas(7, 1024).double()
    seen = []
    x = sample(lambda x, s: eps - x0, eps.clone(), sigmas, callback=seen.append)
    assert torch.allclose(x, x0, atol=1e-12)
    for s in seen:
        assert torch.allclose(s["x"], (1 - s["sigma_next"]) * x0 + s["sigma_next"] * eps, atol=1e-12)
    assert torch.allclose(x0_estimate(eps, eps - x0, 1.0), x0)


def test_pure_and_repeatable():
    """Calling the same step twice gives the same answer: no step counter anywhere."""
    x, v = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(euler_step(x, v, 0.8, 0.5), euler_step(x, v, 0.8, 0.5))
    assert euler_step(x.bfloat16(), v.bfloat16(), 0.8, 0.5).dtype == torch.bfloat16


def test_noise_is_device_independent_and_seeded():
    a, b = noise_like((2, 3), 7), noise_like((2, 3), 7)
    assert torch.equal(a, b) and not torch.equal(a, noise_like((2, 3), 8))
    assert noise_like((2, 3), 7, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_bad_schedule():
    with pytest.raises(ValueError, match="1-D schedule"):
        sample(lambda x, s: x, torch.zeros(1), torch.tensor([1.0]))
