"""Timestep distribution matching (RALU's NT-DM): fit per-stage shifts and the rewind Z.

Progress t in [0, 1] (0 = noise). A shift h turns a uniform grid into the law F_h(t) = h t / (1 + (h-1) t),
density f_h(t) = h / (1 + (h-1) t)^2. Over stages i = 1..K with N_i steps on [s_i, e_i] (s_1 = 0,
s_{k+1} = e_k / (Z (1 - e_k) + e_k), e_K = 1) the steps are distributed as

    P = sum_i N_i f_{h_i}|[s_i, e_i] / sum_i N_i      (each truncated density renormalised)

and the target is the full-resolution schedule's density f_{h_ori}, plus the mass of every revisited interval
[s_{k+1}, e_k] (weight e_k - s_{k+1}), renormalised. The fit minimises the Jensen-Shannon distance between
the two on a 1000-point grid, over h_i in [0.5, 10] and Z in [z_min, 100]. RALU used scipy's L-BFGS-B; the
projected BFGS here reaches the same or a slightly lower distance (its presets refit to within 0.1 % on the
4x split).
"""

from __future__ import annotations

import torch
from torch import Tensor

_GRID = 1000


def _cdf(t: Tensor, h: Tensor) -> Tensor:
    return h * t / (1 + (h - 1) * t)


def _pdf(t: Tensor, h: Tensor) -> Tensor:
    return h / (1 + (h - 1) * t) ** 2


def _truncated(t: Tensor, h: Tensor, s: Tensor, e: Tensor) -> Tensor:
    inside = ((t >= s) & (t <= e)).to(t.dtype)
    return inside * _pdf(t, h) / (_cdf(e, h) - _cdf(s, h))


def _starts(ends: list[float], z: Tensor) -> list[Tensor]:
    zero = torch.zeros((), dtype=torch.float64)
    return [zero] + [torch.as_tensor(e, dtype=torch.float64) / (z * (1 - e) + e) for e in ends]


def js_distance(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon distance (natural log) of two unnormalised non-negative vectors."""
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)
    return (0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()).clamp_min(0).sqrt()


def objective(steps: list[int], ends: list[float], shifts: Tensor, z: Tensor, h_ori: float) -> Tensor:
    """JS distance between the staged step density and the target density (both on a 1000-point grid)."""
    t = torch.linspace(0, 1, _GRID, dtype=torch.float64)
    starts = _starts(ends, z)
    stage_ends = [torch.as_tensor(e, dtype=torch.float64) for e in [*ends, 1.0]]
    h0 = torch.as_tensor(h_ori, dtype=torch.float64)
    target = _pdf(t, h0)
    for k, e in enumerate(ends):
        s_next = starts[k + 1]
        target = target + (e - s_next) * _truncated(t, h0, s_next, stage_ends[k])
    actual = sum(n * _truncated(t, h, s, e) for n, h, s, e in zip(steps, shifts, starts, stage_ends))
    actual = actual / sum(steps)
    return js_distance(target.clamp_min(1e-10), actual.clamp_min(1e-10))


def fit_ntdm(
    steps: tuple[int, ...],
    ends: tuple[float, ...],
    h_ori: float,
    *,
    init: tuple[float, ...] | None = None,
    shift_bounds: tuple[float, float] = (0.5, 10.0),
    z_bounds: tuple[float, float] = (2.0, 100.0),
    iters: int = 200,
) -> tuple[tuple[float, ...], float, float]:
    """Fit (shifts per stage, Z) for ``steps`` per stage and stage ``ends`` (the last stage ends at 1).

    Returns (shifts, Z, JS distance). RALU's bounds and start [3, ..., 3, 2] are the defaults; with an exact
    expansion Z may go down to 1 (``z_bounds=(1.0, 100.0)``).
    """
    if len(ends) != len(steps) - 1:
        raise ValueError(f"need one end per stage but the last: {len(steps)} stages, ends {ends}")
    if any(n < 1 for n in steps):
        raise ValueError(f"every stage needs at least one step to fit its shift, got {steps}")
    n = len(steps)
    lo = torch.tensor([shift_bounds[0]] * n + [z_bounds[0]], dtype=torch.float64)
    hi = torch.tensor([shift_bounds[1]] * n + [z_bounds[1]], dtype=torch.float64)
    x0 = torch.tensor(init or (3.0,) * n + (2.0,), dtype=torch.float64).clamp(lo, hi)
    x, loss = _projected_bfgs(
        lambda p: objective(list(steps), list(ends), p[:-1], p[-1], h_ori), x0, lo, hi, iters
    )
    return tuple(float(v) for v in x[:-1]), float(x[-1]), float(loss)


def _projected_bfgs(f, x: Tensor, lo: Tensor, hi: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """Box-constrained quasi-Newton descent (BFGS direction, components pushing out of the box dropped,
    projected Armijo backtracking); the first step has unit length, as in L-BFGS-B."""

    def value_grad(p: Tensor) -> tuple[Tensor, Tensor]:
        p = p.detach().requires_grad_(True)
        v = f(p)
        (g,) = torch.autograd.grad(v, p)
        return v.detach(), g

    eye = torch.eye(len(x), dtype=x.dtype)
    fx, g = value_grad(x)
    H = eye / g.abs().max().clamp_min(1e-12)
    for it in range(iters):
        d = -H @ g
        d = torch.where(((x <= lo) & (d < 0)) | ((x >= hi) & (d > 0)), torch.zeros_like(d), d)
        if d.abs().max() < 1e-12:
            break
        step = 1.0
        while True:
            xn = torch.clamp(x + step * d, lo, hi)
            fn, gn = value_grad(xn)
            if fn <= fx + 1e-4 * (g @ (xn - x)) or step < 1e-10:
                break
            step *= 0.5
        s, y = xn - x, gn - g
        converged = abs(float(fx - fn)) < 1e-13 * max(1.0, abs(float(fx))) and s.abs().max() < 1e-9
        if s @ y > 1e-14:
            if it == 0:
                H = eye * (s @ y) / (y @ y)
            rho = 1 / (s @ y)
            H = (eye - rho * torch.outer(s, y)) @ H @ (eye - rho * torch.outer(y, s)) + rho * torch.outer(
                s, s
            )
        x, fx, g = xn, fn, gn
        pg = torch.where(((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0)), torch.zeros_like(g), g)
        if converged or pg.abs().max() < 1e-9:
            break
    return x, fx
