"""Attention backends of the DiTs' joint attention: SDPA with an explicit kernel, FlashAttention-3, SageAttention.

``attention(q, k, v, mask, layout=...)`` is the one call of the FLUX and Qwen-Image blocks. The backend is a
process-wide setting (:func:`set_backend`, or the context manager :func:`use_backend`) read at call time, so a
compiled transformer guards on it and recompiles when it changes. Backends:

- "sdpa" (default): ``F.scaled_dot_product_attention``, PyTorch picks the kernel (bit-identical to the
  models' plain SDPA call).
- "math", "flash", "efficient", "cudnn": SDPA restricted to that kernel (``torch.nn.attention.sdpa_kernel``).
  On CPU only "math" and "flash" (PyTorch's CPU flash kernel) exist.
- "fa3": FlashAttention-3 (package ``flash_attn_interface``, Hopper GPUs, fp16/bf16).
- "sage": SageAttention (package ``sageattention``; quantised QK^T, approximate), CUDA, fp16/bf16.

The two packages are optional extras (``pip install specedit[sage]``; FlashAttention-3 builds from source,
github.com/Dao-AILab/flash-attention ``hopper/``); they are imported on first use. They run as
``torch.library`` custom ops, opaque to ``torch.compile``, so a compiled forward has no graph break there.
Kernels that take no mask ("flash", "fa3", "sage") leave a masked call (Qwen-Image's padded text in ragged
batches or true CFG) to "sdpa": :func:`resolve` says which one runs.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_KERNELS = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
PACKAGES = {"fa3": "flash_attn_interface", "sage": "sageattention"}
BACKENDS = ("sdpa", *SDPA_KERNELS, *PACKAGES)
NO_MASK = ("flash", "fa3", "sage")  # kernels without an attention mask
LAYOUTS = ("bhsd", "bshd")

_backend = "sdpa"


def check_backend(name: str) -> str:
    """``name`` if it is a known backend whose package (if any) is installed; a one-line error otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; choose from {', '.join(BACKENDS)}")
    if name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None:
        raise ValueError(f"attention backend {name!r} needs the package {PACKAGES[name]!r}, not installed")
    return name


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> str:
    """Make ``name`` the backend of every later ``attention`` call; returns the previous one."""
    global _backend
    previous, _backend = _backend, check_backend(name)
    return previous


@contextmanager
def use_backend(name: str | None) -> Iterator[str]:
    """Run the block with backend ``name`` (None: keep the current one); the previous one is restored after."""
    previous = set_backend(_backend if name is None else name)
    try:
        yield _backend
    finally:
        set_backend(previous)


def resolve(name: str, masked: bool) -> str:
    """The backend that runs a call under setting ``name``: "sdpa" for a masked call to a mask-less kernel."""
    return "sdpa" if masked and name in NO_MASK else name


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *, layout: str = "bhsd") -> Tensor:
    """Softmax attention of q, k, v laid out as ``layout`` ("bhsd" or "bshd"), output in the same layout.

    mask: optional boolean (or additive) mask broadcastable to (b, h, s_q, s_k), True = attend.
    """
    name = resolve(_backend, mask is not None)
    if name in PACKAGES:
        q, k, v = (x if layout == "bshd" else x.transpose(1, 2) for x in (q, k, v))
        out = (_fa3 if name == "fa3" else _sage)(q, k, v)
        return out if layout == "bshd" else out.transpose(1, 2)
    if layout == "bshd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if name == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        with sdpa_kernel([SDPA_KERNELS[name]]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2) if layout == "bshd" else out


# ----------------------------------------------------------------------------------------------- packages
@torch.library.custom_op("specedit::fa3_attention", mutates_args=())
def _fa3(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """FlashAttention-3 on (b, s, h, d) fp16/bf16 CUDA tensors."""
    from flash_attn_interface import flash_attn_func

    out = flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out  # releases differ: out, or (out, lse)


@torch.library.custom_op("specedit::sage_attention", mutates_args=())
def _sage(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SageAttention on (b, s, h, d) fp16/bf16 CUDA tensors."""
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


@_fa3.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@_sage.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return q.new_empty(*q.shape[:-1], v.shape[-1])


# ----------------------------------------------------------------------------------------------- probing
def unavailable(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                head_dim: int = 64) -> str | None:  # fmt: skip
    """None if backend ``name`` runs on ``device`` at ``dtype`` and ``head_dim``, else why not (one line).

    Tried on a tiny (1, 2, 16, head_dim) call; the answer is cached per (name, device type, dtype, head_dim).
    """
    if name not in PACKAGES:  # an unknown name is an error; a missing package is a reason
        check_backend(name)
    return _probe(name, torch.device(device).type, dtype, head_dim)


@functools.cache
def _probe(name: str, device: str, dtype: torch.dtype, head_dim: int) -> str | None:
    if name in PACKAGES:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            return f"package {PACKAGES[name]!r} is not installed"
        if device != "cuda" or dtype not in (torch.float16, torch.bfloat16):
            return f"{name} runs on CUDA in fp16/bf16 only (asked: {device}, {dtype})"
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    x = torch.randn(1, 2, 16, head_dim, device=device, dtype=dtype)
    try:
        with use_backend(name):
            attention(x, x, x)
    except (
        Exception
    ) as e:  # the kernels say why in many ways (RuntimeError, ImportError, NotImplementedError)
        why = (str(e).splitlines() or [type(e).__name__])[0][:160]
        return f"{name} failed on {device} {dtype}: {why}"
    return None


def available(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              head_dim: int = 64) -> list[str]:  # fmt: skip
    """The backends that run on ``device`` at ``dtype`` and ``head_dim``."""
    return [n for n in BACKENDS if unavailable(n, device, dtype, head_dim) is None]
