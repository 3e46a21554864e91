"""CLIP text tower (FLUX's ``text_encoder``, CLIP ViT-L/14), module tree = the official ``text_model.*`` keys.

Token plus learned absolute position embeddings, pre-LN blocks with *causal* self-attention and a quick-GELU
MLP, a final LayerNorm. FLUX uses the pooled vector: the final hidden state at the first end-of-text token.
The official config carries the legacy ``eos_token_id = 2``, for which transformers pools at
``argmax(input_ids)`` (EOT has the highest id in the CLIP vocabulary); that is the default here. No
text projection.

Keys: ``text_model.embeddings.{token,position}_embedding.weight``,
``text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj.{weight,bias}``,
``text_model.encoder.layers.N.{layer_norm1,layer_norm2}.{weight,bias}``,
``text_model.encoder.layers.N.mlp.{fc1,fc2}.{weight,bias}``, ``text_model.final_layer_norm.{weight,bias}``.
transformers >= 5 writes the same keys without the ``text_model.`` prefix; both load. A stored
``position_ids`` buffer (older files) is ignored.

Reference: transformers ``models/clip/modeling_clip.py``; openai/CLIP ``clip/model.py``.

Shape legend: b batch, l tokens (<= 77), d width, h heads, k head dim, f MLP width.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.loading import (
    Checkpoint,
    Remap,
    build_on_meta,
    load_checkpoint,
    locate,
    open_checkpoint,
    read_config,
)


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_positions: int
    eps: float
    eos_token_id: int | None  # None: pool at argmax(input_ids), the legacy rule FLUX's config selects

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.eos_token_id is not None and not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(
                f"eos_token_id {self.eos_token_id} is outside the vocabulary [0, {self.vocab_size})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


CLIP_L = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_layers=12,
    num_heads=12,
    max_positions=77,
    eps=1e-5,
    eos_token_id=None,
)
# Sizes shrink; the 77 positions, causal mask and argmax pooling stay.
CLIP_TINY = replace(CLIP_L, vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
PRESETS = {"clip-vit-large-patch14": CLIP_L, "clip-tiny": CLIP_TINY}


# ----------------------------------------------------------------------------------------------- blocks
class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.hidden_size)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(pos)


class Attention(nn.Module):
    """Causal multi-head self-attention, scaled by 1/sqrt(head dim), with biased projections."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (
            rearrange(m(x), "b l (h k) -> b h l k", h=self.num_heads)
            for m in (self.q_proj, self.k_proj, self.v_proj)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(rearrange(a, "b h l k -> b l (h k)"))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick-GELU, what OpenAI trained CLIP with


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))


class TextTransformer(nn.Module):
    """Key ``text_model``."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)


class CLIPText(nn.Module):
    """The CLIP text tower: ``model(input_ids)`` -> (hidden (b, l, d), pooled (b, d))."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.text_model = TextTransformer(cfg)

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Encode token ids.

        Args:
            input_ids: (b, l) integer ids, l <= max_positions (77), each row holding an end-of-text token.
        Returns:
            hidden: (b, l, d) final-LayerNorm states. pooled: (b, d), ``hidden`` at the first EOT, found as
            argmax(input_ids) (legacy configs, FLUX) or the first ``eos_token_id``.
        """
        cfg, tm = self.config, self.text_model
        _check_ids(input_ids, cfg.vocab_size, cfg.max_positions)
        x = tm.embeddings(input_ids)
        for layer in tm.encoder.layers:
            x = layer(x)
        x = tm.final_layer_norm(x)
        if cfg.eos_token_id is None:
            eot = input_ids.argmax(-1)  # first maximum = first EOT: it is the highest id in the vocabulary
        else:
            eot = (input_ids == cfg.eos_token_id).int().argmax(-1)
        return x, x[torch.arange(x.shape[0], device=x.device), eot]


def _check_ids(ids: Tensor, vocab_size: int, max_positions: int) -> None:
    if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be a (b, l) integer tensor, got {ids.dtype} {tuple(ids.shape)}")
    if not 0 < ids.shape[1] <= max_positions:
        raise ValueError(
            f"CLIP takes 1 to {max_positions} tokens (learned positions), got {ids.shape[1]}; "
            f"tokenize with max_length={max_positions}"
        )
    if not ids.is_meta:  # one host sync per call; text encoders run once per prompt
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"input_ids must lie in [0, {vocab_size}), got values in [{lo}, {hi}]")


# ----------------------------------------------------------------------------------------------- FLOPs
def flops(cfg: CLIPTextConfig, seq_len: int = 77, batch: int = 1) -> dict[str, float]:
    """Analytic FLOPs (2 x MACs) of one forward: every projection plus attention's QK^T and PV, counted
    dense (the causal mask saves nothing in SDPA's count). Embeddings, norms and activations are free."""
    l, d = seq_len, cfg.hidden_size
    linear = cfg.num_layers * l * (4 * d * d + 2 * d * cfg.intermediate_size)
    attn = cfg.num_layers * 2 * l * l * d
    return {
        "total": 2.0 * batch * (linear + attn),
        "linear": 2.0 * batch * linear,
        "attention": 2.0 * batch * attn,
    }


# ----------------------------------------------------------------------------------------------- loading
def load_clip(
    path_or_repo: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> CLIPText:
    """Load the CLIP text tower from (a) a ``text_encoder/`` folder (config.json + safetensors), (b) a repo
    root holding ``text_encoder/``, or (c) a Hugging Face repo id (downloads ``text_encoder/`` only).
    ``dtype`` casts floating tensors."""
    folder = locate(path_or_repo, "text_encoder", what="CLIP text encoder", allow_file=False)
    cfg = config_from_transformers(read_config(folder / "config.json"))
    model = build_on_meta(lambda: CLIPText(cfg))
    return load_checkpoint(model, text_model_view(open_checkpoint(folder)), dtype=dtype, device=device)


def config_from_transformers(c: dict) -> CLIPTextConfig:
    """``CLIPTextConfig`` from a transformers ``CLIPTextModel`` config.json."""
    if "text_config" in c:
        raise ValueError(
            "this is a full CLIPModel config; pass a CLIPTextModel folder (FLUX's text_encoder/)"
        )
    act = c.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise ValueError(f"hidden_act {act!r} is not supported: the CLIP-L text tower uses quick_gelu")
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in need if k not in c]
    if missing:
        raise ValueError(f"CLIP text config lacks {missing}")
    eos = c.get("eos_token_id", 49407)  # transformers' default when the field is absent
    return CLIPTextConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        max_positions=c.get("max_position_embeddings", 77),
        eps=float(c.get("layer_norm_eps", 1e-5)),
        eos_token_id=None if eos == 2 else eos,  # 2 is the pre-2023 placeholder: transformers pools at argmax
    )


def text_model_view(ckpt: Checkpoint) -> Checkpoint | Remap:
    """The checkpoint in ``text_model.*`` keys, without a stored ``position_ids`` buffer."""
    buffer = ("text_model.embeddings.position_ids", "embeddings.position_ids")
    if all(k.startswith("text_model.") for k in ckpt) and not any(b in ckpt for b in buffer):
        return ckpt
    plan = {k if k.startswith("text_model.") else f"text_model.{k}": k for k in ckpt if k not in buffer}
    return Remap(ckpt, plan)
