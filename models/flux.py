"""FLUX.1 MMDiT (also Kontext), module tree = BFL checkpoint keys (``flux1-kontext-dev.safetensors``).

19 double-stream blocks (separate image/text weights, joint attention) then 38 single-stream blocks (fused
``linear1``/``linear2``) at full size. Every token's position is an explicit float id (b, n, 3), so token
subsets, mixed resolutions and fractional child positions need no special handling: RoPE is evaluated at
whatever ids come in. Kontext appends the reference-image tokens (ids with axis 0 = 1) after the target
tokens; ``forward`` returns the velocity of every image token and the caller keeps the target part.

Reference: github.com/black-forest-labs/flux (``model.py``, ``modules/layers.py``); diffusers
``FluxTransformer2DModel`` for the diffusers folder layout, converted here at load time.

Shape legend: b batch, n image tokens, l text tokens, s = l + n, h heads, d head dim, c channels.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.attention import attention as attend
from models.loading import (
    Checkpoint,
    Derived,
    Remap,
    build_on_meta,
    load_checkpoint,
    locate,
    open_checkpoint,
    read_config,
    strip_prefix,
)


@dataclass(frozen=True)
class FluxConfig:
    in_channels: int  # packed latent channels (16 latent channels x 2x2)
    out_channels: int
    vec_in_dim: int  # pooled CLIP width
    context_in_dim: int  # T5 width
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int  # double-stream blocks
    depth_single_blocks: int
    axes_dim: tuple[int, ...]  # RoPE dims per id axis; sums to the head dim
    theta: int
    qkv_bias: bool
    guidance_embed: bool  # FLUX.1-dev/Kontext-dev are guidance distilled

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim or any(a % 2 for a in self.axes_dim):
            raise ValueError(f"axes_dim {self.axes_dim} must be even and sum to the head dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


FLUX_KONTEXT_DEV = FluxConfig(
    in_channels=64,
    out_channels=64,
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    depth=19,
    depth_single_blocks=38,
    axes_dim=(16, 56, 56),
    theta=10_000,
    qkv_bias=True,
    guidance_embed=True,
)
# Sizes shrink; every flag (qkv bias, guidance embedding, 3-axis RoPE) stays.
FLUX_TINY = replace(
    FLUX_KONTEXT_DEV,
    in_channels=16,
    out_channels=16,
    vec_in_dim=20,
    context_in_dim=24,
    hidden_size=32,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    axes_dim=(4, 6, 6),
)
PRESETS = {"flux-kontext-dev": FLUX_KONTEXT_DEV, "flux-tiny": FLUX_TINY}


# ----------------------------------------------------------------------------------------------- functions
def timestep_embedding(
    t: Tensor, dim: int = 256, max_period: float = 10_000.0, factor: float = 1000.0
) -> Tensor:
    """(b,) times in [0, 1] -> (b, dim) sinusoid, cosines first (BFL ``time_factor`` = 1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (factor * t).float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> tuple[Tensor, Tensor]:
    """(b, s, len(axes_dim)) float ids -> cos, sin of shape (b, 1, s, d/2) in fp32.

    Angles are formed in fp64 (as the references do) because ids reach a few hundred at 2 MP.
    """
    f64 = torch.float64 if ids.device.type != "mps" else torch.float32
    angles = []
    for i, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=f64, device=ids.device) / dim)
        angles.append(ids[..., i].to(f64)[..., None] * omega)
    angles = torch.cat(angles, dim=-1)[:, None]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, pe: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of (b, h, s, d) by the angles in ``pe``."""
    cos, sin = pe
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: tuple[Tensor, Tensor]) -> Tensor:
    """Joint attention over (b, h, s, d) with RoPE on q and k -> (b, s, h*d), on the backend of
    ``models.attention`` (default: SDPA)."""
    out = attend(apply_rope(q, pe), apply_rope(k, pe), v)
    return rearrange(out, "b h s d -> b s (h d)")


# ----------------------------------------------------------------------------------------------- blocks
class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Parameter holder (BFL ``img_attn``/``txt_attn``): the joint attention itself lives in the block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    """SiLU(vec) -> (shift, scale, gate) x 1 or 2, each (b, 1, c)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> list[Tensor]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    # keys img_mlp.0 / img_mlp.2: the tanh-GELU sits at index 1
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def _ln(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.img_mod = Modulation(d, double=True)
        self.img_norm1 = _ln(d)
        self.img_attn = SelfAttention(d, cfg.num_heads, cfg.qkv_bias)
        self.img_norm2 = _ln(d)
        self.img_mlp = _mlp(d, cfg.mlp_hidden)
        self.txt_mod = Modulation(d, double=True)
        self.txt_norm1 = _ln(d)
        self.txt_attn = SelfAttention(d, cfg.num_heads, cfg.qkv_bias)
        self.txt_norm2 = _ln(d)
        self.txt_mlp = _mlp(d, cfg.mlp_hidden)

    def _qkv(self, attn: SelfAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = rearrange(attn.qkv(x), "b s (k h d) -> k b h s d", k=3, h=self.num_heads)
        q, k = attn.norm(q, k, v)
        return q, k, v

    def forward(
        self, img: Tensor, txt: Tensor, vec: Tensor, pe: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        iq, ik, iv = self._qkv(self.img_attn, (1 + i_scale1) * self.img_norm1(img) + i_shift1)
        tq, tk, tv = self._qkv(self.txt_attn, (1 + t_scale1) * self.txt_norm1(txt) + t_shift1)
        # joint attention over [text, image], the order the ids are concatenated in
        a = attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), pe)
        t_a, i_a = a[:, : txt.shape[1]], a[:, txt.shape[1] :]
        img = img + i_gate1 * self.img_attn.proj(i_a)
        img = img + i_gate2 * self.img_mlp((1 + i_scale2) * self.img_norm2(img) + i_shift2)
        txt = txt + t_gate1 * self.txt_attn.proj(t_a)
        txt = txt + t_gate2 * self.txt_mlp((1 + t_scale2) * self.txt_norm2(txt) + t_shift2)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP on the joint stream, q/k/v/mlp-in fused in ``linear1``."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        d, m = cfg.hidden_size, cfg.mlp_hidden
        self.num_heads, self.hidden_size, self.mlp_hidden = cfg.num_heads, d, m
        self.linear1 = nn.Linear(d, 3 * d + m)
        self.linear2 = nn.Linear(d + m, d)
        self.norm = QKNorm(cfg.head_dim)
        self.pre_norm = _ln(d)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(d, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: tuple[Tensor, Tensor]) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1((1 + scale) * self.pre_norm(x) + shift).split(
            [3 * self.hidden_size, self.mlp_hidden], -1
        )
        q, k, v = rearrange(qkv, "b s (k h d) -> k b h s d", k=3, h=self.num_heads)
        q, k = self.norm(q, k, v)
        return x + gate * self.linear2(torch.cat([attention(q, k, v, pe), self.mlp_act(mlp)], -1))


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm_final = _ln(dim)
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))  # key adaLN_modulation.1

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.linear((1 + scale) * self.norm_final(x) + shift)


class Flux(nn.Module):
    """The FLUX.1 transformer; ``forward`` follows BFL's calling convention with explicit ids.

    Hook point: ``stack_hook(run, img, txt) -> (img, txt)``, when set (``models.hooks.stack_hook``), replaces
    the call ``run(img, txt)`` of the whole block stack on the embedded streams (feature caches use it).
    """

    stack_hook = None

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, d)
        self.time_in = MLPEmbedder(256, d)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, d)
        self.guidance_in = MLPEmbedder(256, d) if cfg.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(cfg.context_in_dim, d)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(d, cfg.out_channels)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """Velocity of every image token.

        Args:
            img: (b, n, in_channels) packed latent tokens, target first, then any reference tokens.
            img_ids: (b, n, 3) or (n, 3) float positions of ``img``.
            txt: (b, l, context_in_dim) T5 states. txt_ids: (b, l, 3) or (l, 3), zeros for FLUX.
            timesteps: (b,) or scalar sigma in [0, 1] (the model scales by 1000).
            y: (b, vec_in_dim) pooled CLIP. guidance: (b,) or scalar distilled-guidance strength.
        Returns:
            (b, n, out_channels).
        """
        cfg = self.config
        b = img.shape[0]
        if img.ndim != 3 or img.shape[-1] != cfg.in_channels:
            raise ValueError(f"img must be (b, n, {cfg.in_channels}), got {tuple(img.shape)}")
        if txt.ndim != 3 or txt.shape[-1] != cfg.context_in_dim or txt.shape[0] != b:
            raise ValueError(f"txt must be ({b}, l, {cfg.context_in_dim}), got {tuple(txt.shape)}")
        img_ids, txt_ids = _batched_ids(img_ids, img, "img_ids"), _batched_ids(txt_ids, txt, "txt_ids")
        timesteps = torch.as_tensor(timesteps, device=img.device).expand(b)
        vec = self.time_in(timestep_embedding(timesteps).to(img.dtype))
        if cfg.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX model is guidance distilled: pass guidance (e.g. 2.5)")
            g = torch.as_tensor(guidance, device=img.device).expand(b)
            vec = vec + self.guidance_in(timestep_embedding(g).to(img.dtype))
        vec = vec + self.vector_in(y)
        pe = rope(torch.cat([txt_ids, img_ids], 1), cfg.axes_dim, cfg.theta)
        img, txt = self.img_in(img), self.txt_in(txt)
        run = lambda img, txt: self.blocks(img, txt, vec, pe)  # noqa: E731
        img, txt = run(img, txt) if self.stack_hook is None else self.stack_hook(run, img, txt)
        return self.final_layer(img, vec)

    def blocks(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        """The block stack: double-stream blocks, then single-stream blocks on [txt, img]; (img, txt) out."""
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat([txt, img], 1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return x[:, txt.shape[1] :], x[:, : txt.shape[1]]


def _batched_ids(ids: Tensor, tokens: Tensor, name: str) -> Tensor:
    if ids.ndim == 2:
        ids = ids[None]
    if (
        ids.ndim != 3
        or ids.shape[-1] != 3
        or ids.shape[1] != tokens.shape[1]
        or ids.shape[0] not in (1, tokens.shape[0])
    ):
        raise ValueError(
            f"{name} must be (b, {tokens.shape[1]}, 3) or ({tokens.shape[1]}, 3), got {tuple(ids.shape)}"
        )
    return ids.to(tokens.device).expand(tokens.shape[0], -1, -1)


# ----------------------------------------------------------------------------------------------- FLOPs
def flops(cfg: FluxConfig, n_img: int, n_txt: int, batch: int = 1) -> dict[str, float]:
    """Analytic FLOPs (2 x MACs) of one forward: every matmul, attention's QK^T and PV included (dense).

    ``n_img`` counts every image token (target + reference). Elementwise work (norms, RoPE, softmax) is not
    counted, matching ``torch.utils.flop_counter``.
    """
    d, m, s = cfg.hidden_size, cfg.mlp_hidden, n_img + n_txt
    embed = n_img * cfg.in_channels * d + n_txt * cfg.context_in_dim * d
    cond = (256 * d + d * d) * (2 if cfg.guidance_embed else 1) + cfg.vec_in_dim * d + d * d
    double = s * (4 * d * d + 2 * d * m) + 2 * 6 * d * d
    single = s * (3 * d * d + d * m + (d + m) * d) + 3 * d * d
    final = 2 * d * d + n_img * d * cfg.out_channels
    linear = embed + cond + cfg.depth * double + cfg.depth_single_blocks * single + final
    attn = (cfg.depth + cfg.depth_single_blocks) * 2 * s * s * d
    return {
        "total": 2.0 * batch * (linear + attn),
        "linear": 2.0 * batch * linear,
        "attention": 2.0 * batch * attn,
    }


# ----------------------------------------------------------------------------------------------- loading
def load_flux(
    path_or_repo: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    config: FluxConfig | None = None,
) -> Flux:
    """Load the FLUX transformer from (a) a BFL single file, (b) a diffusers ``transformer/`` folder,
    (c) a repo root holding either, or (d) a Hugging Face repo id (downloads ``transformer/`` only).

    BFL files carry no config: sizes are read from tensor shapes and the RoPE axes default to the official
    (16, 56, 56) at head dim 128; pass ``config`` for other sizes. ``dtype`` casts floating tensors.
    """
    src = locate(path_or_repo, "transformer", what="FLUX transformer", single_files=("flux1-*.safetensors",))
    if src.is_file():
        ckpt = strip_prefix(open_checkpoint(src), "model.diffusion_model.")
        cfg = config or config_from_bfl(ckpt)
    else:
        cfg = config or config_from_diffusers(read_config(src / "config.json"))
        ckpt = diffusers_to_bfl(open_checkpoint(src), cfg)
    model = build_on_meta(lambda: Flux(cfg))
    return load_checkpoint(model, ckpt, dtype=dtype, device=device)


def config_from_diffusers(c: dict) -> FluxConfig:
    """``FluxConfig`` from a diffusers ``FluxTransformer2DModel`` config.json."""
    if c.get("patch_size", 1) != 1:
        raise ValueError(f"FLUX diffusers config has patch_size {c['patch_size']}; only 1 is supported")
    heads, hd = c["num_attention_heads"], c["attention_head_dim"]
    return FluxConfig(
        in_channels=c["in_channels"],
        out_channels=c.get("out_channels") or c["in_channels"],
        vec_in_dim=c["pooled_projection_dim"],
        context_in_dim=c["joint_attention_dim"],
        hidden_size=heads * hd,
        mlp_ratio=4.0,
        num_heads=heads,
        depth=c["num_layers"],
        depth_single_blocks=c["num_single_layers"],
        axes_dim=tuple(c.get("axes_dims_rope", (16, 56, 56))),
        theta=10_000,
        qkv_bias=True,
        guidance_embed=bool(c.get("guidance_embeds", False)),
    )


def config_from_bfl(ckpt: Checkpoint | Remap) -> FluxConfig:
    """``FluxConfig`` read off the tensor shapes of a BFL state dict."""
    shapes = ckpt.shapes()
    try:
        d, cin = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        mlp = shapes["double_blocks.0.img_mlp.0.weight"][0]
        vec, ctx = shapes["vector_in.in_layer.weight"][1], shapes["txt_in.weight"][1]
        out = shapes["final_layer.linear.weight"][0]
    except KeyError as e:
        raise ValueError(
            f"{ckpt.source} is not a BFL FLUX transformer checkpoint (no {e.args[0]!r})"
        ) from None
    if head_dim != 128:
        raise ValueError(f"{ckpt.source} has head dim {head_dim}; pass config= with its RoPE axes_dim")

    def count(prefix: str) -> int:
        return len({m.group(1) for k in shapes if (m := re.match(rf"{prefix}\.(\d+)\.", k))})

    return FluxConfig(
        in_channels=cin,
        out_channels=out,
        vec_in_dim=vec,
        context_in_dim=ctx,
        hidden_size=d,
        mlp_ratio=mlp / d,
        num_heads=d // head_dim,
        depth=count("double_blocks"),
        depth_single_blocks=count("single_blocks"),
        axes_dim=(16, 56, 56),
        theta=10_000,
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    )


def diffusers_to_bfl(ckpt: Checkpoint, cfg: FluxConfig) -> Remap:
    """View a diffusers ``FluxTransformer2DModel`` state dict in BFL key layout (lazy; fuses q/k/v)."""
    plan: dict[str, str | Derived] = {}

    def linear(dst: str, src: str, bias: bool = True):
        plan[f"{dst}.weight"] = f"{src}.weight"
        if bias:
            plan[f"{dst}.bias"] = f"{src}.bias"

    def fused(dst: str, srcs: list[str], bias: bool = True):
        plan[f"{dst}.weight"] = Derived(tuple(f"{s}.weight" for s in srcs), lambda *t: torch.cat(t, 0))
        if bias:
            plan[f"{dst}.bias"] = Derived(tuple(f"{s}.bias" for s in srcs), lambda *t: torch.cat(t, 0))

    linear("img_in", "x_embedder")
    linear("txt_in", "context_embedder")
    emb = {"time_in": "timestep_embedder", "vector_in": "text_embedder"}
    if cfg.guidance_embed:
        emb["guidance_in"] = "guidance_embedder"
    for ours, theirs in emb.items():
        linear(f"{ours}.in_layer", f"time_text_embed.{theirs}.linear_1")
        linear(f"{ours}.out_layer", f"time_text_embed.{theirs}.linear_2")
    for i in range(cfg.depth):
        o, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        linear(f"{o}.img_mod.lin", f"{t}.norm1.linear")
        linear(f"{o}.txt_mod.lin", f"{t}.norm1_context.linear")
        fused(f"{o}.img_attn.qkv", [f"{t}.attn.to_{x}" for x in "qkv"], cfg.qkv_bias)
        fused(f"{o}.txt_attn.qkv", [f"{t}.attn.add_{x}_proj" for x in "qkv"], cfg.qkv_bias)
        for stream, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            plan[f"{o}.{stream}_attn.norm.query_norm.scale"] = f"{t}.attn.{q}.weight"
            plan[f"{o}.{stream}_attn.norm.key_norm.scale"] = f"{t}.attn.{k}.weight"
        linear(f"{o}.img_attn.proj", f"{t}.attn.to_out.0")
        linear(f"{o}.txt_attn.proj", f"{t}.attn.to_add_out")
        for stream, ff in (("img", "ff"), ("txt", "ff_context")):
            linear(f"{o}.{stream}_mlp.0", f"{t}.{ff}.net.0.proj")
            linear(f"{o}.{stream}_mlp.2", f"{t}.{ff}.net.2")
    for i in range(cfg.depth_single_blocks):
        o, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        fused(f"{o}.linear1", [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v", f"{t}.proj_mlp"])
        linear(f"{o}.linear2", f"{t}.proj_out")
        plan[f"{o}.norm.query_norm.scale"] = f"{t}.attn.norm_q.weight"
        plan[f"{o}.norm.key_norm.scale"] = f"{t}.attn.norm_k.weight"
        linear(f"{o}.modulation.lin", f"{t}.norm.linear")
    linear("final_layer.linear", "proj_out")
    # diffusers' AdaLayerNormContinuous chunks (scale, shift); BFL chunks (shift, scale)
    swap = lambda x: torch.cat(x.chunk(2, 0)[::-1], 0)
    plan["final_layer.adaLN_modulation.1.weight"] = Derived(("norm_out.linear.weight",), swap)
    plan["final_layer.adaLN_modulation.1.bias"] = Derived(("norm_out.linear.bias",), swap)
    extra = sorted(
        set(ckpt) - {s for d in plan.values() for s in ((d,) if isinstance(d, str) else d.sources)}
    )
    if extra:
        raise ValueError(f"{ckpt.source} has {len(extra)} tensors this FLUX config does not use: {extra[:8]}")
    return Remap(ckpt, plan)
