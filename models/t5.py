"""T5 v1.1 encoder (FLUX's ``text_encoder_2``), module tree = transformers ``T5EncoderModel`` checkpoint keys.

Pre-norm blocks of self-attention and a gated-GELU MLP. T5 differs from a textbook transformer in three
places: RMSNorm without mean or bias (variance in fp32), no 1/sqrt(d) scaling of the attention scores, and
a learned relative-position bias (bucketed offsets, log-spaced beyond a few tokens) that only block 0
stores and every block reuses. FLUX runs it over 512 padded tokens with *no* attention mask, so pads
attend and are attended to; an optional mask is accepted for other uses.

Keys: ``shared.weight``, ``encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight`` (+
``relative_attention_bias.weight`` in block 0), ``encoder.block.N.layer.{0,1}.layer_norm.weight``,
``encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight``, ``encoder.final_layer_norm.weight``.
The official FLUX files store only ``shared.weight``; ``encoder.embed_tokens.weight`` (the same tensor,
tied in transformers) is accepted in its place or beside it.

Reference: transformers ``models/t5/modeling_t5.py``; google-research/text-to-text-transfer-transformer.

Shape legend: b batch, l tokens, d model width, h heads, k head dim (d_kv), f MLP width.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.loading import (
    Checkpoint,
    CheckpointError,
    Remap,
    build_on_meta,
    load_checkpoint,
    locate,
    open_checkpoint,
    read_config,
)


@dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int  # head dim; num_heads * d_kv need not equal d_model
    d_ff: int
    num_layers: int
    num_heads: int
    num_buckets: int  # relative-position buckets, half per direction
    max_distance: int  # offsets beyond this share the last bucket
    eps: float

    def __post_init__(self):
        sizes = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
        bad = {n: getattr(self, n) for n in sizes if getattr(self, n) < 1}
        if bad:
            raise ValueError(f"T5Config sizes must be positive, got {bad}")
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise ValueError(f"num_buckets must be even and >= 4, got {self.num_buckets}")
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError(
                f"max_distance {self.max_distance} must exceed the exact range num_buckets // 4 = "
                f"{self.num_buckets // 4}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


T5_XXL = T5Config(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    num_buckets=32,
    max_distance=128,
    eps=1e-6,
)
# Sizes shrink; the bucket layout (32 buckets, distance 128) stays so long prompts reach the log buckets.
T5_TINY = replace(T5_XXL, vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
PRESETS = {"t5-v1_1-xxl": T5_XXL, "t5-tiny": T5_TINY}


# ----------------------------------------------------------------------------------------------- functions
def relative_position_bucket(rel: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional T5 buckets of integer offsets ``rel`` = key position - query position.

    Half the buckets per direction (+num_buckets/2 when the key is after the query); offsets below a quarter
    of ``num_buckets`` get their own bucket, larger ones are log-spaced up to ``max_distance`` and clamped.
    """
    half = num_buckets // 2
    exact = half // 2
    bucket = (rel > 0).long() * half
    dist = rel.abs()
    # same float32 expression as the reference, so offsets on a bucket edge round the same way
    log_bucket = exact + (
        torch.log(dist.float() / exact) / math.log(max_distance / exact) * (half - exact)
    ).to(torch.long)
    log_bucket = log_bucket.clamp(max=half - 1)
    return bucket + torch.where(dist < exact, dist, log_bucket)


def _clamp_fp16(x: Tensor) -> Tensor:
    # transformers clamps fp16 residuals (T5-XXL activations overflow fp16); a no-op for other dtypes
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return x.clamp(-limit, limit)


# ----------------------------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    """T5LayerNorm: scale only, no mean subtraction, variance in fp32; half-precision weights cast back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class Attention(nn.Module):
    """Unscaled multi-head self-attention with an additive bias; block 0 also owns the bias table."""

    def __init__(self, cfg: T5Config, has_bias_table: bool):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.o = nn.Linear(cfg.inner_dim, cfg.d_model, bias=False)
        if has_bias_table:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        q, k, v = (
            rearrange(m(x), "b l (h k) -> b h l k", h=self.num_heads) for m in (self.q, self.k, self.v)
        )
        # T5 folds the scale into its init, so scores are plain q.k (scale=1) plus the position bias
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(rearrange(a, "b h l k -> b l (h k)"))


class LayerSelfAttention(nn.Module):
    """Key ``layer.0``: x + attention(norm(x))."""

    def __init__(self, cfg: T5Config, has_bias_table: bool):
        super().__init__()
        self.SelfAttention = Attention(cfg, has_bias_table)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.eps)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class GatedFF(nn.Module):
    """Key ``DenseReluDense`` (a legacy name): wo(gelu_tanh(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        # wo may be kept in fp32 under an fp16 model (see load_t5): compute it in its own dtype
        return self.wo(h.to(self.wo.weight.dtype))


class LayerFF(nn.Module):
    """Key ``layer.1``: x + ff(norm(x))."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = GatedFF(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.eps)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class Block(nn.Module):
    def __init__(self, cfg: T5Config, has_bias_table: bool):
        super().__init__()
        self.layer = nn.ModuleList([LayerSelfAttention(cfg, has_bias_table), LayerFF(cfg)])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = _clamp_fp16(self.layer[0](x, bias))
        return _clamp_fp16(self.layer[1](x))


class Stack(nn.Module):
    """Key ``encoder``: the blocks and the final norm (the token embedding lives at the top, ``shared``)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList(Block(cfg, has_bias_table=i == 0) for i in range(cfg.num_layers))
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.eps)


class T5Encoder(nn.Module):
    """The T5 v1.1 encoder: ``model(input_ids)`` -> (b, l, d_model) final-normed hidden states."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg)

    def position_bias(self, length: int, device: torch.device | None = None) -> Tensor:
        """(1, h, l, l) relative-position bias from block 0's table, shared by every block."""
        cfg = self.config
        pos = torch.arange(length, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], cfg.num_buckets, cfg.max_distance)
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        return rearrange(table(buckets), "q k h -> 1 h q k")

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encode token ids.

        Args:
            input_ids: (b, l) integer ids in [0, vocab_size).
            attention_mask: optional (b, l), nonzero = attend. FLUX passes none: pads take part.
        Returns:
            (b, l, d_model) in the dtype of the final norm's weight (or fp32 residuals, see ``load_t5``).
        """
        _check_ids(input_ids, self.config.vocab_size)
        b, l = input_ids.shape
        x = self.shared(input_ids)
        bias = self.position_bias(l, input_ids.device)
        if attention_mask is not None:
            if attention_mask.shape != (b, l):
                raise ValueError(f"attention_mask must be ({b}, {l}), got {tuple(attention_mask.shape)}")
            keep = attention_mask.to(device=bias.device, dtype=torch.bool)[:, None, None, :]
            bias = bias.masked_fill(~keep, torch.finfo(bias.dtype).min)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


def _check_ids(ids: Tensor, vocab_size: int) -> None:
    if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be a (b, l) integer tensor, got {ids.dtype} {tuple(ids.shape)}")
    if ids.numel() and not ids.is_meta:  # one host sync per call; text encoders run once per prompt
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"input_ids must lie in [0, {vocab_size}), got values in [{lo}, {hi}]")


# ----------------------------------------------------------------------------------------------- FLOPs
def flops(cfg: T5Config, seq_len: int, batch: int = 1) -> dict[str, float]:
    """Analytic FLOPs (2 x MACs) of one forward: every projection plus attention's QK^T and PV.

    The embedding and bias lookups, norms, softmax and activations are not counted, matching
    ``torch.utils.flop_counter``.
    """
    l, d, inner = seq_len, cfg.d_model, cfg.inner_dim
    linear = cfg.num_layers * l * (4 * d * inner + 3 * d * cfg.d_ff)
    attn = cfg.num_layers * 2 * l * l * inner
    return {
        "total": 2.0 * batch * (linear + attn),
        "linear": 2.0 * batch * linear,
        "attention": 2.0 * batch * attn,
    }


# ----------------------------------------------------------------------------------------------- loading
def load_t5(
    path_or_repo: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> T5Encoder:
    """Load the T5 encoder from (a) a ``text_encoder_2/`` folder (config.json + a single or sharded
    safetensors), (b) a repo root holding ``text_encoder_2/``, or (c) a Hugging Face repo id (downloads
    ``text_encoder_2/`` only).

    ``dtype`` casts floating tensors. As in transformers, ``float16`` keeps every ``wo`` in fp32 (the MLP
    output overflows fp16), which makes the residual stream fp32 from the first MLP on.
    """
    folder = locate(path_or_repo, "text_encoder_2", what="T5 encoder", allow_file=False)
    cfg = config_from_transformers(read_config(folder / "config.json"))
    model = build_on_meta(lambda: T5Encoder(cfg))
    model = load_checkpoint(model, encoder_view(open_checkpoint(folder)), dtype=dtype, device=device)
    if dtype == torch.float16:
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.wo.float()
    return model


def config_from_transformers(c: dict) -> T5Config:
    """``T5Config`` from a transformers T5 config.json (defaults as transformers' for absent fields)."""
    proj = c.get("feed_forward_proj", "relu")
    if proj != "gated-gelu":
        raise ValueError(
            f"feed_forward_proj {proj!r} is not supported: this is the T5 v1.1 encoder (gated-gelu) only"
        )
    missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads") if k not in c]
    if missing:
        raise ValueError(f"T5 config lacks {missing}")
    return T5Config(
        vocab_size=c["vocab_size"],
        d_model=c["d_model"],
        d_kv=c["d_kv"],
        d_ff=c["d_ff"],
        num_layers=c["num_layers"],
        num_heads=c["num_heads"],
        num_buckets=c.get("relative_attention_num_buckets", 32),
        max_distance=c.get("relative_attention_max_distance", 128),
        eps=float(c.get("layer_norm_epsilon", 1e-6)),
    )


def encoder_view(ckpt: Checkpoint) -> Checkpoint | Remap:
    """The checkpoint in this module's keys: one embedding as ``shared.weight``, decoder parts dropped.

    transformers ties ``encoder.embed_tokens.weight`` to ``shared.weight`` and writes only one of them; older
    files may hold both. A full ``T5ForConditionalGeneration`` file also loads (decoder, lm_head ignored).
    """
    keys = [k for k in ckpt if not k.startswith(("decoder.", "lm_head."))]
    embeds = [k for k in ("shared.weight", "encoder.embed_tokens.weight") if k in ckpt]
    if len(embeds) == 2:
        shapes = ckpt.shapes()
        if shapes[embeds[0]] != shapes[embeds[1]]:
            raise CheckpointError(
                f"{ckpt.source}: shared.weight {shapes[embeds[0]]} and encoder.embed_tokens.weight "
                f"{shapes[embeds[1]]} should be one tied embedding"
            )
    if embeds == ["shared.weight"] and len(keys) == len(ckpt):
        return ckpt
    plan: dict[str, str] = {k: k for k in keys if k not in embeds}
    if embeds:
        plan["shared.weight"] = embeds[0]
    return Remap(ckpt, plan)
