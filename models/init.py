"""Random weights for networks built on the meta device: benchmarks and tests without checkpoints."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.loading import build_on_meta

NORM_SCALES = ("scale", "norm.weight", "norm1.weight", "norm2.weight", "norm_out.weight")


@torch.no_grad()
def random_module(factory: Callable[[], nn.Module], *, device="cpu", dtype=torch.float32, seed: int = 0,
                  std: float = 0.02) -> nn.Module:  # fmt: skip
    """``factory()`` built on meta, then materialised on ``device``: matrices and kernels N(0, ``std``) from a
    seeded generator, norm scales (names ending in one of ``NORM_SCALES``) 1, every other vector 0."""
    module = build_on_meta(factory).to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, std, generator=g)
        elif name.endswith(NORM_SCALES):
            p.fill_(1.0)
        else:
            p.zero_()
    return module.eval().requires_grad_(False)


@torch.no_grad()
def randomized_module(factory: Callable[[], nn.Module], *, seed: int = 0, std: float = 0.05) -> nn.Module:
    """``factory()`` with every parameter redrawn from a seeded generator: tensors initialised to all ones
    (norm scales) become 1 + N(0, ``std``), the rest N(0, ``std``). Every path of a tiny model then carries
    signal (no zero-initialised gates or norms), as parity and conformance tests want."""
    module = factory()
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        base = 1.0 if p.numel() > 0 and bool(torch.all(p == 1)) else 0.0
        p.copy_(base + std * torch.randn(p.shape, generator=g))
    return module.eval().requires_grad_(False)
