"""The flow-matching Euler sampler as pure functions: no hidden step state.

Conventions, shared by every sampler in this library:
- a *denoiser* is any callable ``denoiser(x, sigma) -> v`` returning the velocity (noise - x0 estimate) with
  the shape of ``x``; the token layout, conditioning and guidance are bound into it by the caller;
- sigma runs from 1 (pure noise) to 0; ``x_next = x + (sigma_next - sigma) * v``, computed in fp32 and cast
  back to the dtype of ``x``;
- noise comes from an explicit ``torch.Generator`` on the CPU, so a seed gives the same start on every device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor


class Denoiser(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor: ...


def euler_step(x: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """One Euler step of the probability-flow ODE, in fp32."""
    return (x.float() + (sigma_next - sigma) * v.float()).to(x.dtype)


def x0_estimate(x: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """Tweedie / rectified-flow clean estimate x0 = x - sigma * v."""
    return (x.float() - sigma * v.float()).to(x.dtype)


def sample(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    desc: str = "sampling",
) -> Tensor:
    """Integrate from ``sigmas[0]`` to ``sigmas[-1]`` with Euler steps; one denoiser call per step.

    ``callback`` receives ``{"i", "x" (after the step), "sigma", "sigma_next", "v"}`` after every step.
    """
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(
            f"sigmas must be a 1-D schedule with at least 2 entries, got shape {tuple(sigmas.shape)}"
        )
    steps = range(len(sigmas) - 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc, leave=False)
    for i in steps:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = denoiser(x, sigma)
        x = euler_step(x, v, sigma, sigma_next)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "v": v})
    return x


def noise_like(
    shape: tuple[int, ...], seed: int | torch.Generator, *, dtype=torch.float32, device="cpu"
) -> Tensor:
    """Standard normal noise drawn on a CPU generator (device independent), then moved to ``device``."""
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
