"""Attention backends (models.attention): parity of every available backend with math SDPA, the optional
packages' wrappers (through stand-in packages on CPU), mask fallback, errors, and the DiTs on each backend."""

import importlib.machinery
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from models import attention as A
from models.flux import FLUX_TINY, Flux
from models.init import randomized_module
from models.qwen_image import QWEN_IMAGE_TINY, QwenImage

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _qkv(dtype=torch.float32, device="cpu", layout="bhsd", s=37, d=16):
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, s, d) if layout == "bhsd" else (2, s, 3, d)
    return [torch.randn(shape, generator=g).to(device, dtype) for _ in range(3)]


def _reference(q, k, v, mask=None, layout="bhsd"):
    t = (lambda x: x) if layout == "bhsd" else (lambda x: x.transpose(1, 2))
    with A.sdpa_kernel([A.SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(*(t(x).float() for x in (q, k, v)), attn_mask=mask)
    return t(out)


def _err(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _skip_unless(name, device="cpu", dtype=torch.float32, head_dim=16):
    why = A.unavailable(name, device, dtype, head_dim)
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("layout", A.LAYOUTS)
@pytest.mark.parametrize("name", A.BACKENDS)
def test_backend_parity_with_math_cpu(name, layout):
    _skip_unless(name)
    q, k, v = _qkv(layout=layout)
    with A.use_backend(name):
        out = A.attention(q, k, v, layout=layout)
    assert out.shape == q.shape
    assert _err(out, _reference(q, k, v, layout=layout)) < TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", A.BACKENDS)
def test_backend_parity_with_math_cuda(name, dtype):
    _skip_unless(name, "cuda", dtype, 128)
    q, k, v = _qkv(dtype, "cuda", "bshd", s=1000, d=128)
    with A.use_backend(name):
        out = A.attention(q, k, v, layout="bshd")
    tol = 8e-2 if name == "sage" else TOL[dtype]  # SageAttention quantises QK^T to int8
    assert _err(out, _reference(q, k, v, layout="bshd")) < tol


@pytest.mark.parametrize("name", A.BACKENDS)
def test_masked_keys(name):
    """A padded-key mask (Qwen-Image's text padding) is honoured; mask-less kernels hand it to SDPA."""
    if name not in A.NO_MASK:
        _skip_unless(name)
    q, k, v = _qkv(layout="bshd")
    mask = torch.ones(2, 1, 1, 37, dtype=torch.bool)
    mask[0, ..., :5] = False
    assert A.resolve(name, masked=True) == ("sdpa" if name in A.NO_MASK else name)
    with A.use_backend("sdpa" if name in A.PACKAGES else name):
        out = A.attention(q, k, v, mask, layout="bshd")
    assert _err(out, _reference(q, k, v, mask, layout="bshd")) < TOL[torch.float32]


def _stand_in(monkeypatch, module: str, attr: str, fn):
    """Install a stand-in for an optional package: ``attr`` computed by math SDPA on (b, s, h, d)."""
    mod = types.ModuleType(module)
    mod.__spec__ = importlib.machinery.ModuleSpec(module, None)
    setattr(mod, attr, fn)
    monkeypatch.setitem(sys.modules, module, mod)
    A._probe.cache_clear()


def _nhd_math(q, k, v, **kw):
    return _reference(q, k, v, layout="bshd").to(q.dtype)


@pytest.mark.parametrize("layout", A.LAYOUTS)
def test_package_wrappers_through_stand_ins(monkeypatch, layout):
    """fa3 and sage hand (b, s, h, d) tensors to their package (FA3's (out, lse) tuple is unpacked) and come
    back in the caller's layout; compiled, the custom ops leave no graph break."""
    _stand_in(
        monkeypatch, "flash_attn_interface", "flash_attn_func", lambda q, k, v: (_nhd_math(q, k, v), None)
    )
    _stand_in(monkeypatch, "sageattention", "sageattn", _nhd_math)
    q, k, v = _qkv(layout=layout)
    ref = _reference(q, k, v, layout=layout)
    for name in A.PACKAGES:
        with A.use_backend(name):
            assert _err(A.attention(q, k, v, layout=layout), ref) < TOL[torch.float32]
            fn = lambda q, k, v: A.attention(q, k, v, layout=layout)  # noqa: E731
            assert torch._dynamo.explain(fn)(q, k, v).graph_break_count == 0
    assert "fa3" in A.unavailable("fa3") and "CUDA" in A.unavailable("fa3")  # installed, but CPU fp32
    A._probe.cache_clear()


def test_errors_and_restoring():
    with pytest.raises(ValueError, match="attention backend 'flash2' is unknown; choose from sdpa, math"):
        A.set_backend("flash2")
    for name, package in A.PACKAGES.items():
        if A.importlib.util.find_spec(package) is None:
            with pytest.raises(ValueError, match=f"needs the package '{package}', not installed"):
                A.check_backend(name)
            assert "not installed" in A.unavailable(name)
    with pytest.raises(RuntimeError), A.use_backend("math"):
        assert A.get_backend() == "math"
        raise RuntimeError
    assert A.get_backend() == "sdpa"
    assert {"sdpa", "math"} <= set(A.available())


def _flux_inputs():
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(s, generator=g)  # noqa: E731
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(6.0), indexing="ij"), -1)
    return (
        r(1, 24, 16),
        ids.reshape(-1, 3),
        r(1, 5, 24),
        torch.zeros(5, 3),
        torch.tensor([0.7]),
        r(1, 20),
    ), {"guidance": torch.tensor([2.5])}


def _qwen_inputs():
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(s, generator=g)  # noqa: E731
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(6.0), indexing="ij"), -1)
    mask = torch.tensor([[1] * 7 + [0] * 2, [1] * 9])
    txt_ids = (3 + torch.arange(9.0))[:, None].expand(-1, 3)
    return (r(2, 24, 16), ids.reshape(-1, 3), r(2, 9, 24), txt_ids, torch.tensor([0.3, 0.6])), {
        "txt_mask": mask
    }


@pytest.mark.parametrize("name", A.BACKENDS)
@pytest.mark.parametrize("family", ["flux", "qwen"])
def test_dits_on_each_backend(family, name):
    """The tiny FLUX (RoPE then attention) and Qwen-Image (padded text mask) forwards agree across backends;
    the default "sdpa" is the models' former plain SDPA call."""
    _skip_unless(name)
    factory, inputs = (lambda: Flux(FLUX_TINY), _flux_inputs) if family == "flux" else (
        lambda: QwenImage(QWEN_IMAGE_TINY), _qwen_inputs)  # fmt: skip
    model = randomized_module(factory, seed=3)
    args, kwargs = inputs()
    with torch.no_grad(), A.use_backend("math"):
        ref = model(*args, **kwargs)
    with torch.no_grad(), A.use_backend(name):
        out = model(*args, **kwargs)
    assert _err(out, ref) < 1e-5
