"""Guidance combiners and the batched two-branch helper, on hand-made tensors and a toy branch function."""

import pytest
import torch

from samplers.guidance import Prompt, batched_cfg, cfg, guided_denoiser, pad_prompts, true_cfg


def test_cfg_hand_made():
    c, u = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    assert torch.equal(cfg(c, u, 1.0), c)
    assert torch.equal(cfg(c, u, 0.0), u)
    assert torch.equal(cfg(c, u, 3.0), torch.tensor([2.0, 8.0]))  # u + 3 (c - u)


def test_true_cfg_rescales_each_token_to_the_conditional_norm():
    # token 0: u = 0, so comb = 4c and the rescale gives back c exactly
    # token 1: c = (1, 0), u = (0, 1): comb = (4, -3), ||comb|| = 5, ||c|| = 1 -> (0.8, -0.6)
    c = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    u = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    out = true_cfg(c, u, 4.0)
    assert torch.allclose(out, torch.tensor([[[3.0, 4.0], [0.8, -0.6]]]), atol=1e-7)
    assert torch.allclose(out.norm(dim=-1), c.norm(dim=-1))
    assert torch.equal(true_cfg(c, u, 4.0, rescale=False), cfg(c, u, 4.0))
    with pytest.raises(ValueError, match="differ in shape"):
        true_cfg(c, u[..., :1], 4.0)


def test_true_cfg_matches_the_pipeline_formula():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 7, 64, generator=g), torch.randn(2, 7, 64, generator=g)
    comb = u + 4.0 * (c - u)
    ref = comb * (torch.norm(c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    assert torch.equal(true_cfg(c, u, 4.0), ref)


def test_pad_prompts():
    a = Prompt(torch.ones(1, 3, 2), torch.arange(9.0).view(3, 3))
    b = Prompt(2 * torch.ones(1, 5, 2), torch.zeros(1, 5, 3), torch.tensor([[1, 1, 1, 1, 0]]))
    p = pad_prompts([a, b])
    assert p.txt.shape == (2, 5, 2) and p.ids.shape == (2, 5, 3)
    assert p.txt[0, 3:].eq(0).all() and p.txt[0, :3].eq(1).all() and p.txt[1].eq(2).all()
    assert torch.equal(p.ids[0, :3], a.ids) and p.ids[0, 3:].eq(0).all()
    assert p.mask.tolist() == [[True] * 3 + [False] * 2, [True] * 4 + [False]]
    # equal lengths and no masks: no mask at all (the unmasked attention path)
    assert pad_prompts([a, a]).mask is None
    with pytest.raises(ValueError, match="ids must be"):
        pad_prompts([Prompt(torch.ones(1, 3, 2), torch.zeros(4, 3))])
    with pytest.raises(ValueError, match="mask must be"):
        pad_prompts([Prompt(torch.ones(1, 3, 2), torch.zeros(3, 3), torch.ones(1, 4))])


def _toy_branch(calls: list):
    """v = x * sigma + masked mean of the text over real tokens + mean of the text ids (per sample)."""

    def fn(x, sigma, txt, txt_ids, txt_mask=None):
        calls.append(x.shape[0])
        m = torch.ones(txt.shape[:2]) if txt_mask is None else txt_mask.float()
        pooled = (txt * m[..., None]).sum(1) / m.sum(1, keepdim=True)  # b c
        ids = txt_ids.expand(txt.shape[0], -1, -1) if txt_ids.ndim == 3 else txt_ids[None]
        pos = (ids[..., 0] * m).sum(1) / m.sum(1)  # b
        s = torch.as_tensor(sigma).reshape(-1, 1, 1)
        return x * s + pooled[:, None] + pos[:, None, None]

    return fn


def test_batched_cfg_equals_two_forwards():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 4, generator=g)
    cond = Prompt(torch.randn(2, 6, 4, generator=g), torch.arange(18.0).view(6, 3))
    uncond = Prompt(torch.randn(2, 3, 4, generator=g), torch.zeros(2, 3, 3) + 7.0)
    calls = []
    fn = _toy_branch(calls)
    sigma = torch.tensor([0.9, 0.4])
    v_c, v_u = batched_cfg(fn, x, sigma, cond, uncond)
    assert calls == [4]  # one forward of twice the batch
    assert torch.allclose(v_c, fn(x, sigma, *cond), atol=1e-6)
    assert torch.allclose(v_u, fn(x, sigma, *uncond), atol=1e-6)
    with pytest.raises(ValueError, match="uncond prompt has batch 1"):
        batched_cfg(fn, x, sigma, cond, Prompt(uncond.txt[:1], uncond.ids[:1]))


def test_guided_denoiser_both_modes():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 5, 4, generator=g)
    cond = Prompt(torch.randn(1, 4, 4, generator=g), torch.ones(4, 3))
    uncond = Prompt(torch.randn(1, 2, 4, generator=g), torch.zeros(2, 3))
    calls = []
    fn = _toy_branch(calls)
    sigma = torch.tensor(0.6)
    two = guided_denoiser(fn, cond, uncond, 4.0)(x, sigma)
    assert calls == [1, 1]
    one = guided_denoiser(fn, cond, uncond, 4.0, batched=True)(x, sigma)
    assert calls == [1, 1, 2]
    assert torch.allclose(one, two, atol=1e-6)
    assert torch.allclose(two, true_cfg(fn(x, sigma, *cond), fn(x, sigma, *uncond), 4.0))
    plain = guided_denoiser(fn, cond, uncond, 4.0, rescale=False)(x, sigma)
    assert torch.allclose(plain, cfg(fn(x, sigma, *cond), fn(x, sigma, *uncond), 4.0))
