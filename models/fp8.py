"""Weight-only fp8: the linear layers of a DiT's blocks as float8_e4m3fn weights with per-output-channel scales.

:func:`quantize_fp8` replaces every ``nn.Linear`` inside the model's block lists (``models.offload.block_lists``:
FLUX's double and single blocks, Qwen-Image's transformer blocks) by an :class:`FP8Linear`, from the weights
already loaded (e.g. our bf16 checkpoints, memory-mapped), so no fp8 checkpoint is needed. Row i of a weight is
stored as ``round_e4m3(W[i] / s_i)`` with ``s_i = max|W[i]| / 448`` (448: the largest finite e4m3 value), so
each row uses the full fp8 range; the matmul runs in the activation dtype on the fp8 weight cast to it, and the
scale multiplies the output channels (``x W^T diag(s) = x (diag(s) W)^T``). e4m3 keeps 3 mantissa bits: a
weight's relative rounding error is at most 2^-4, and the weights take half the memory of bf16. Embedders and
the output layer stay in their dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.offload import block_lists

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(out, in) weight -> (float8_e4m3fn weight, (out,) float32 scales); all-zero rows get scale 1."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


class FP8Linear(nn.Module):
    """A linear layer with float8_e4m3fn ``weight`` (out, in) and float32 ``scale`` (out,) buffers and the
    original ``bias`` (a parameter, in its dtype); ``forward`` computes ``(x @ weight^T) * scale + bias`` in
    ``x``'s dtype."""

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, layer: nn.Linear, device=None, keep=None) -> FP8Linear:
        """Quantise ``layer`` on ``device`` and keep the result on ``keep`` (default: where the layer is)."""
        home = layer.weight.device
        q, scale = quantize_rows(layer.weight if device is None else layer.weight.to(device))
        keep = home if keep is None else torch.device(keep)
        bias = None if layer.bias is None else layer.bias.detach().to(keep)
        return cls(q.to(keep), scale.to(keep), bias)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight the layer computes with, (out, in) in ``dtype`` (scales applied in float32)."""
        return (self.weight.float() * self.scale[:, None]).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3"


@torch.no_grad()
def quantize_fp8(model: nn.Module, *, device=None, keep=None) -> list[str]:
    """Replace every ``nn.Linear`` in ``model``'s block lists by an :class:`FP8Linear`, one layer at a time
    (the layer's own weights are released as it goes); returns the replaced modules' names. ``device``: where
    each layer is quantised, ``keep``: where its fp8 layer is kept (both default to where the layer is; e.g.
    quantise on the GPU and keep on the CPU for block offload)."""
    replaced, lists = [], block_lists(model)
    for lst_name, lst in ((n, c) for n, c in model.named_children() if any(c is x for x in lists)):
        for parent_name, parent in lst.named_modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, FP8Linear.from_linear(child, device, keep))
                    replaced.append(".".join(p for p in (lst_name, parent_name, name) if p))
    if not replaced:
        raise ValueError(f"{type(model).__name__}: no nn.Linear in its blocks to quantise")
    return replaced
