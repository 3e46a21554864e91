"""Weight-only fp8 (models.fp8): the quantisation, the layer, and error bounds on tiny DiTs."""

import pytest
import torch
from test_offload import flux_inputs, qwen_inputs
from torch import nn

from models.flux import FLUX_TINY, Flux
from models.fp8 import FP8, FP8_MAX, FP8Linear, quantize_fp8, quantize_rows
from models.init import randomized_module
from models.offload import offload_blocks
from models.qwen_image import QWEN_IMAGE_TINY, QwenImage


def rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def test_quantize_rows_uses_the_full_range_per_row():
    w = torch.randn(6, 40) * torch.logspace(-3, 2, 6)[:, None]
    w[2] = 0
    q, scale = quantize_rows(w)
    assert q.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (6,)
    assert torch.equal(q.float().abs().amax(1)[[0, 1, 3, 4, 5]], torch.full((5,), FP8_MAX))
    assert scale[2] == 1 and not q[2].float().any()
    back = q.float() * scale[:, None]
    err = (back - w).abs() / w.abs().amax(1, keepdim=True).clamp_min(1e-30)
    assert float(err.max()) <= 2**-4  # half an ulp of e4m3 at the row's top binade, relative to its max


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_matches_its_dequantised_weight(dtype):
    layer = nn.Linear(32, 24).to(dtype)
    fp8 = FP8Linear.from_linear(layer)
    assert fp8.weight.dtype == FP8 and fp8.bias.dtype == dtype and "fp8=e4m3" in repr(fp8)
    x = torch.randn(3, 5, 32, dtype=dtype)
    want = nn.functional.linear(x.float(), fp8.dequantized(), layer.bias.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(fp8(x), want) < tol
    assert rel(fp8(x), layer(x)) < 0.06
    assert set(fp8.state_dict()) == {"weight", "scale", "bias"}


@torch.no_grad()
def test_quantize_flux_blocks_only_and_error_bound():
    model = randomized_module(lambda: Flux(FLUX_TINY))
    x = flux_inputs()
    ref = model(*x)
    names = quantize_fp8(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert names and all(n.startswith(("double_blocks.", "single_blocks.")) for n in names)
    assert not any(n.startswith(("double_blocks.", "single_blocks.")) for n in linears)  # all replaced
    assert "img_in" in linears and "final_layer.linear" in linears  # embedders and output stay
    assert rel(model(*x), ref) < 0.02  # measured 0.002


@torch.no_grad()
def test_quantize_qwen_error_bound_and_offload_composes():
    model = randomized_module(lambda: QwenImage(QWEN_IMAGE_TINY))
    x = qwen_inputs()
    ref = model(*x)
    quantize_fp8(model)
    q = model(*x)
    assert rel(q, ref) < 0.02
    offload_blocks(model, "cpu", 2)  # the fp8 buffers travel like any other tensor
    assert torch.equal(model(*x), q)


@torch.no_grad()
def test_quantize_on_one_device_keep_on_another():
    model = randomized_module(lambda: Flux(FLUX_TINY))
    quantize_fp8(model, device="cpu", keep="meta")
    assert model.double_blocks[0].img_mlp[0].weight.device.type == "meta"


def test_no_blocks_is_an_error():
    with pytest.raises(TypeError, match="has no block list"):
        quantize_fp8(nn.Sequential(nn.Linear(2, 2)))
