"""Both VAEs hand SDPA channel-contiguous q/k/v: strided channels make CPU SDPA fall back to the math
kernel, which materialises the (h*w)^2 attention matrix (18 GB for a 1 MP reference on the tiny Qwen VAE)."""

import pytest
import torch
import torch.nn.functional as F

from models import flux_ae, qwen_image_vae


@pytest.mark.parametrize("module,block", [(flux_ae, lambda: flux_ae.AttnBlock(16, 8)),
                                          (qwen_image_vae, lambda: qwen_image_vae.AttentionBlock(16))])  # fmt: skip
def test_attention_inputs_are_contiguous(monkeypatch, module, block):
    seen, original = [], F.scaled_dot_product_attention

    def sdpa(q, k, v, *a, **kw):
        seen.append(all(t.stride(-1) == 1 for t in (q, k, v)))
        return original(q, k, v, *a, **kw)

    monkeypatch.setattr(module.F, "scaled_dot_product_attention", sdpa)
    with torch.no_grad():
        block()(torch.randn(1, 16, 6, 10))
    assert seen == [True]
