"""Classifier-free guidance combiners as pure functions, and the glue that turns two branches into a denoiser.

- ``cfg``: the classic combination ``u + s (c - u)`` (Ho & Salimans 2022).
- ``true_cfg``: Qwen-Image-Edit's "true CFG": the same combination, then each token rescaled to the norm of
  the conditional prediction, ``out = comb * ||c|| / ||comb||`` with norms over the channel (last) dim.
- ``batched_cfg``: both branches in one forward: the image tokens are repeated, the two prompts are padded to
  a common length (padding masked out), and the output is split back.
- ``guided_denoiser``: binds a per-branch function and two prompts into a ``denoiser(x, sigma) -> v``.

A *branch function* is ``model_fn(x, sigma, txt, txt_ids, txt_mask) -> v``, e.g.
``functools.partial(models.qwen_image.target_velocity, model, refs=refs, img_ids=img_ids)``. Its output
for sample i must depend only on sample i's inputs (true of any transformer without batch statistics).

Shape legend: b batch, n tokens, l text tokens, c channels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class Prompt(NamedTuple):
    """One guidance branch's text conditioning: states (b, l, c), ids (b, l, k) or (l, k), mask (b, l)."""

    txt: Tensor
    ids: Tensor
    mask: Tensor | None = None


BranchFn = Callable[[Tensor, Tensor, Tensor, Tensor, "Tensor | None"], Tensor]


def cfg(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ``v_uncond + scale * (v_cond - v_uncond)``."""
    return v_uncond + scale * (v_cond - v_uncond)


def true_cfg(v_cond: Tensor, v_uncond: Tensor, scale: float, *, rescale: bool = True) -> Tensor:
    """Qwen-Image-Edit's true CFG: ``cfg`` then, per token, rescale to the conditional prediction's norm.

    Args:
        v_cond, v_uncond: (..., c) predictions; norms are taken over the last dim (the 64 packed channels).
        scale: guidance scale (``true_cfg_scale``, 4.0 by default in the pipelines).
        rescale: apply the norm rescale (False gives plain ``cfg``).
    """
    if v_cond.shape != v_uncond.shape:
        raise ValueError(f"v_cond {tuple(v_cond.shape)} and v_uncond {tuple(v_uncond.shape)} differ in shape")
    comb = cfg(v_cond, v_uncond, scale)
    if not rescale:
        return comb
    # order of operations as in the diffusers pipelines: comb * (||c|| / ||comb||)
    return comb * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


def pad_prompts(prompts: list[Prompt]) -> Prompt:
    """Stack prompts of different lengths along the batch, right-padded with zeros and masked out.

    Without padding and without any input mask the result has ``mask=None`` (the unmasked attention path).
    """
    if not prompts:
        raise ValueError("pad_prompts needs at least one prompt")
    length = max(p.txt.shape[1] for p in prompts)
    txts, ids, masks = [], [], []
    for i, p in enumerate(prompts):
        if p.txt.ndim != 3:
            raise ValueError(f"prompt {i}: txt must be (b, l, c), got {tuple(p.txt.shape)}")
        b, l = p.txt.shape[:2]
        pid = p.ids[None] if p.ids.ndim == 2 else p.ids
        if pid.ndim != 3 or pid.shape[1] != l or pid.shape[0] not in (1, b):
            raise ValueError(f"prompt {i}: ids must be ({b}, {l}, k) or ({l}, k), got {tuple(p.ids.shape)}")
        if p.mask is not None and tuple(p.mask.shape) != (b, l):
            raise ValueError(f"prompt {i}: mask must be ({b}, {l}), got {tuple(p.mask.shape)}")
        pad = length - l
        txts.append(torch.nn.functional.pad(p.txt, (0, 0, 0, pad)))
        ids.append(torch.nn.functional.pad(pid.expand(b, -1, -1), (0, 0, 0, pad)))
        mask = torch.ones(b, l, dtype=torch.bool, device=p.txt.device) if p.mask is None else p.mask.bool()
        masks.append(torch.nn.functional.pad(mask, (0, pad), value=False))
    ragged = any(p.txt.shape[1] != length or p.mask is not None for p in prompts)
    return Prompt(torch.cat(txts), torch.cat(ids), torch.cat(masks) if ragged else None)


def batched_cfg(
    model_fn: BranchFn, x: Tensor, sigma: Tensor | float, cond: Prompt, uncond: Prompt
) -> tuple[Tensor, Tensor]:
    """(v_cond, v_uncond) from ONE forward of batch 2b: ``x`` (b, n, c) is repeated, the prompts are padded
    to a common length (``pad_prompts``), and the output is split back in half."""
    b = x.shape[0]
    for name, p in (("cond", cond), ("uncond", uncond)):
        if p.txt.shape[0] != b:
            raise ValueError(f"{name} prompt has batch {p.txt.shape[0]}, x has {b}")
    both = pad_prompts([cond, uncond])
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.ndim == 1 and sigma.numel() == b > 1:
        sigma = torch.cat([sigma, sigma])
    v = model_fn(torch.cat([x, x]), sigma, both.txt, both.ids, both.mask)
    return v[:b], v[b:]


def guided_denoiser(
    model_fn: BranchFn,
    cond: Prompt,
    uncond: Prompt,
    scale: float,
    *,
    rescale: bool = True,
    batched: bool = False,
) -> Callable[[Tensor, Tensor], Tensor]:
    """``denoiser(x, sigma) -> true_cfg(v_cond, v_uncond, scale)``: two forwards per call (the pipelines'
    way), or one forward of twice the batch with ``batched=True``."""

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        if batched:
            v_c, v_u = batched_cfg(model_fn, x, sigma, cond, uncond)
        else:
            v_c, v_u = model_fn(x, sigma, *cond), model_fn(x, sigma, *uncond)
        return true_cfg(v_c, v_u, scale, rescale=rescale)

    return denoiser
