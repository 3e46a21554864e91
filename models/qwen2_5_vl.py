"""Qwen2.5-VL-Instruct: Qwen-Image-Edit's prompt + image encoder (``text_encoder/`` of the Edit repos), and a
greedy text generator with a KV cache (a local judge).

Two networks in one checkpoint, plus the LM head:

* ``visual``: a ViT over 14x14 patches (two identical temporal taps per still image). Blocks attend inside
  112 px windows except the ``fullatt_block_indexes`` blocks, which see the whole image; 2-D RoPE on the
  patch (row, col); a merger turns each 2x2 patch block into one LLM token.
* ``model``: a Qwen2 decoder (GQA, q/k/v with bias, SwiGLU, RMSNorm) with 3-D M-RoPE: every token has a
  (t, h, w) position; text tokens have t = h = w, image tokens spread over their merged grid. ``encode``
  returns the final-normed last layer (what Qwen-Image-Edit feeds its DiT).
* ``lm_head`` (hidden -> vocab, no bias), built only with ``lm_head=True``: ``logits`` and ``generate``.
  With ``tie_word_embeddings`` (the 3B; not the 7B) the token embedding matrix is the head and no
  ``lm_head.weight`` is held or read, as transformers >= 5 saves tied models.

The module tree follows the legacy key layout that the shipped safetensors use (``model.layers.N...``,
``visual.blocks.N...``, ``lm_head.weight``); files saved with the newer names (``model.language_model.*``,
``model.visual.*``; ``lm_head.weight`` stays at the top) are renamed at load time. Without ``lm_head=True``
(the encoder) ``lm_head.weight`` is skipped.

Generation: greedy, per-layer keys/values appended at each step (:class:`KVCache`). A generated token's
position is the same on all three axes: the prompt's largest position + 1, then + 1 per step (transformers'
``rope_deltas``). Prompts are left-padded.

Reference: transformers ``modeling_qwen2_5_vl.py``; 3-D positions as transformers 4.x ``get_rope_index``
computed them (transformers >= 5 only does so when ``mm_token_type_ids`` is passed, which the diffusers
pipelines do not: diffusers issue #14194).

Shape legend: b batch, l tokens, p cached (past) tokens, n patches, u merge units (= image tokens), s segments
(windows or images), h heads, d head dim, c channels, v vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.loading import (
    Checkpoint,
    CheckpointError,
    Remap,
    build_on_meta,
    download,
    is_repo_id,
    load_checkpoint,
    locate,
    open_checkpoint,
    read_config,
)


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int  # = LLM width
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int  # in pixels; 112 = 4 x 4 merge units
    fullatt_block_indexes: tuple[int, ...]
    rope_theta: float

    def __post_init__(self):
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a multiple of 4 "
                "(2-D RoPE splits the head dim over rows and cols, rotate_half over halves)"
            )
        unit = self.patch_size * self.spatial_merge_size
        if self.window_size % unit:
            raise ValueError(f"window_size {self.window_size} is not a multiple of patch x merge = {unit}")
        if any(not 0 <= i < self.depth for i in self.fullatt_block_indexes):
            raise ValueError(f"fullatt_block_indexes {self.fullatt_block_indexes} outside depth {self.depth}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch vector: c x t x p x p (1176 at full size)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def window_units(self) -> int:
        """Window side in merge units."""
        return self.window_size // (self.patch_size * self.spatial_merge_size)


@dataclass(frozen=True)
class Qwen25VLConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]  # head-dim halves driven by (t, h, w); sums to head_dim / 2
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    tie_word_embeddings: bool = False  # the LM head is the token embedding matrix

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size}, num_heads {self.num_heads}, num_kv_heads "
                f"{self.num_kv_heads}: need hidden % heads == 0 and heads % kv_heads == 0"
            )
        if len(self.mrope_section) != 3 or 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must be 3 ints summing to head_dim/2")
        if self.vision.out_hidden_size != self.hidden_size:
            raise ValueError(
                f"vision out_hidden_size {self.vision.out_hidden_size} != LLM hidden_size {self.hidden_size}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


QWEN25VL_7B_VISION = VisionConfig(
    depth=32,
    hidden_size=1280,
    num_heads=16,
    intermediate_size=3420,
    out_hidden_size=3584,
    in_channels=3,
    patch_size=14,
    temporal_patch_size=2,
    spatial_merge_size=2,
    window_size=112,
    fullatt_block_indexes=(7, 15, 23, 31),
    rope_theta=10_000.0,
)
QWEN25VL_7B = Qwen25VLConfig(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    mrope_section=(16, 24, 24),
    vision=QWEN25VL_7B_VISION,
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
)
# Sizes shrink; GQA, M-RoPE, window + full-attention blocks and the merger all stay. Special ids sit at the
# top of the tiny vocab.
QWEN25VL_TINY = replace(
    QWEN25VL_7B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    mrope_section=(2, 3, 3),
    vision=replace(
        QWEN25VL_7B_VISION,
        depth=3,
        hidden_size=32,
        num_heads=2,
        intermediate_size=48,
        out_hidden_size=64,
        fullatt_block_indexes=(1,),
    ),
    image_token_id=511,
    video_token_id=510,
    vision_start_token_id=508,
    vision_end_token_id=509,
)
PRESETS = {"qwen2.5-vl-7b": QWEN25VL_7B, "qwen2.5-vl-tiny": QWEN25VL_TINY}


# ----------------------------------------------------------------------------------------------- functions
def inv_frequencies(dim: int, theta: float, device: torch.device | str) -> Tensor:
    """RoPE inverse frequencies theta^(-2k/dim), k < dim/2, in fp32 (as the reference computes them)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


@dataclass(frozen=True)
class Segments:
    """Contiguous token segments (windows or images) padded into one attention batch.

    ``gather`` (s, l) picks each segment's tokens (padding slots repeat a valid index), ``key_mask``
    (s, 1, 1, l) hides padding keys (None when every segment is full), ``scatter`` (n,) picks the real rows
    back out of the flattened (s * l) result, in sequence order.
    """

    gather: Tensor
    key_mask: Tensor | None
    scatter: Tensor

    @staticmethod
    def from_lengths(lengths: list[int], device: torch.device | str) -> Segments:
        lens = torch.tensor(lengths)
        width = int(lens.max())
        starts = lens.cumsum(0) - lens
        slot = torch.arange(width)
        valid = slot[None] < lens[:, None]
        gather = torch.minimum(starts[:, None] + slot[None], starts[:, None] + lens[:, None] - 1)
        scatter = valid.flatten().nonzero().squeeze(1)
        mask = None if bool(valid.all()) else valid[:, None, None, :].to(device)
        return Segments(gather.to(device), mask, scatter.to(device))


@dataclass(frozen=True)
class VisionLayout:
    """Index bookkeeping for a batch of patch grids, computed on the CPU from ``grid_thw`` alone.

    Patches arrive merge-block-major per image (the processor's order). Attention runs on them reordered
    window by window (``window_index`` permutes merge units); ``pos`` holds each patch's (row, col) in that
    order, ``windows``/``images`` the segments of the windowed and full-attention blocks.
    """

    window_index: Tensor  # (u,) merge unit at each window-ordered slot
    pos: Tensor  # (n, 2) patch (row, col), window-ordered
    windows: Segments
    images: Segments


def vision_layout(grid_thw: list[list[int]], cfg: VisionConfig, device: torch.device | str) -> VisionLayout:
    """Window permutation, RoPE positions and attention segments for ``grid_thw`` ((t, h, w) per image)."""
    m, wu = cfg.spatial_merge_size, cfg.window_units
    unit_order, unit_pos, window_lens, image_lens = [], [], [], []
    offset = 0
    for t, h, w in grid_thw:
        hm, wm = h // m, w // m
        # (row, col) of every patch, merge-block-major: (hm, wm, m, m)
        rows = torch.arange(h).view(hm, m, 1, 1).expand(hm, m, wm, m).permute(0, 2, 1, 3)
        cols = torch.arange(w).view(1, 1, wm, m).expand(hm, m, wm, m).permute(0, 2, 1, 3)
        pos = torch.stack([rows, cols], -1).reshape(hm * wm, m * m, 2)
        # merge units tiled into wu x wu windows; border windows are smaller (the grid is padded with -1)
        nh, nw = -(-hm // wu), -(-wm // wu)
        grid = F.pad(torch.arange(hm * wm).view(hm, wm), (0, nw * wu - wm, 0, nh * wu - hm), value=-1)
        tiles = grid.view(nh, wu, nw, wu).permute(0, 2, 1, 3).reshape(nh * nw, wu * wu)
        lens = (tiles >= 0).sum(1)
        order = tiles[tiles >= 0]
        for frame in range(t):  # frames are separate attention segments
            unit_order.append(order + offset + frame * hm * wm)
            unit_pos.append(pos[order])
            window_lens += (lens[lens > 0] * m * m).tolist()
            image_lens.append(h * w)
        offset += t * hm * wm
    return VisionLayout(
        window_index=torch.cat(unit_order).to(device),
        pos=torch.cat(unit_pos).reshape(-1, 2).to(device),
        windows=Segments.from_lengths(window_lens, device),
        images=Segments.from_lengths(image_lens, device),
    )


def segment_attention(q: Tensor, k: Tensor, v: Tensor, seg: Segments) -> Tensor:
    """Attention of (n, h, d) tokens restricted to segments -> (n, h*d); one batched SDPA call."""
    h, d = q.shape[1:]
    q, k, v = (x[seg.gather].transpose(1, 2) for x in (q, k, v))  # s h l d
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=seg.key_mask)
    return out.transpose(1, 2).reshape(-1, h * d)[seg.scatter]


def mrope_positions(
    input_ids: Tensor,
    image_grid_thw: Tensor | None,
    attention_mask: Tensor | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
) -> Tensor:
    """3-D (t, h, w) positions (3, b, l) of a prompt batch, as transformers 4.x ``get_rope_index``.

    Over each row's valid tokens: text advances every axis by 1; an image starting at position p puts its
    merged token (r, c) at (p, p + r, p + c) and moves the next token to p + max(grid_h, grid_w) / merge.
    Images (rows of ``image_grid_thw``) are matched to runs of ``image_token_id`` in batch order. Padding
    positions are 0.
    """
    b, l = input_ids.shape
    dev = input_ids.device
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    is_img = (input_ids == image_token_id) & valid
    grid = torch.zeros(0, 3, dtype=torch.long) if image_grid_thw is None else torch.as_tensor(image_grid_thw)
    grid = grid.long().cpu().reshape(-1, 3) if grid.numel() == 0 else grid.long().cpu()
    m = spatial_merge_size
    if grid.ndim != 2 or grid.shape[1] != 3 or (grid[:, 0] != 1).any() or (grid[:, 1:] % m).any():
        raise ValueError(
            f"image_grid_thw {grid.tolist()}: need one (1, h, w) row per still image, h and w multiples of {m}"
        )
    if (grid[:, 1:] < 1).any():
        raise ValueError(f"image_grid_thw {grid.tolist()} has an empty image")
    counts = (grid[:, 1] // spatial_merge_size) * (grid[:, 2] // spatial_merge_size)
    if int(is_img.sum()) != int(counts.sum()):
        raise ValueError(
            f"{int(is_img.sum())} image tokens in input_ids but image_grid_thw {grid.tolist()} needs "
            f"{int(counts.sum())} (grid_h * grid_w / {spatial_merge_size**2} per image)"
        )
    step = valid.long()  # every real token moves the running position by 1 ...
    if len(counts) == 0:
        return (step.cumsum(1) - step).expand(3, b, l) * valid
    w_m = (grid[:, 2] // spatial_merge_size).to(dev)
    span = torch.maximum(grid[:, 1], grid[:, 2]).to(dev) // spatial_merge_size
    counts = counts.to(dev)
    # image index and merged-token index j of every image token (images follow the flattened batch order)
    ordinal = (is_img.flatten().long().cumsum(0) - 1).view(b, l).clamp(min=0)
    ends = counts.cumsum(0)
    image = torch.searchsorted(ends, ordinal, right=True).clamp(max=len(counts) - 1)
    j = ordinal - (ends - counts)[image]
    flat = torch.arange(b * l, device=dev).view(b, l)
    first = torch.full_like(counts, b * l).scatter_reduce(0, image[is_img], flat[is_img], "amin")
    contiguous = bool((flat - first[image] == j)[is_img].all())
    if not contiguous or bool((first // l != (first + counts - 1) // l).any()):
        raise ValueError("each image's <|image_pad|> tokens must form one contiguous run within one prompt")
    # ... except image tokens: 0, and an image's last token: max(grid_h, grid_w) / merge
    step = torch.where(is_img, torch.where(j == counts[image] - 1, span[image], 0), step)
    start = step.cumsum(1) - step  # exclusive: an image's tokens all share its start p
    w = w_m[image]
    pos = torch.stack(
        [start, torch.where(is_img, start + j // w, start), torch.where(is_img, start + j % w, start)]
    )
    return pos * valid


# ----------------------------------------------------------------------------------------------- vision
class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        # key visual.patch_embed.proj.weight (Conv3d, kernel = stride): applied as a linear over patch vectors
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.proj.weight.dtype), self.proj.weight.flatten(1))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, pe: tuple[Tensor, Tensor], seg: Segments) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(1)  # n h d each
        cos, sin = pe  # (n, 1, d) fp32
        q, k = ((t.float() * cos + rotate_half(t.float()) * sin).to(v.dtype) for t in (q, k))
        return self.proj(segment_attention(q, k, v, seg))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size)
        self.norm2 = RMSNorm(cfg.hidden_size)
        self.attn = VisionAttention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x: Tensor, pe: tuple[Tensor, Tensor], seg: Segments) -> Tensor:
        x = x + self.attn(self.norm1(x), pe, seg)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm each patch, concatenate a 2x2 merge unit, 2-layer GELU MLP to the LLM width."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size)
        # keys merger.mlp.0 / merger.mlp.2 (exact erf GELU at index 1)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.out_hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor | list) -> Tensor:
        """Image tokens for the LLM.

        Args:
            pixel_values: (n, c*t*p*p) patch vectors in processor order, all images concatenated.
            grid_thw: (images, 3) patch grid (t, h, w) per image (a CPU tensor or a list).
        Returns:
            (n / merge^2, out_hidden_size), image by image, merged tokens row-major.
        """
        cfg = self.config
        grids = torch.as_tensor(grid_thw).tolist()
        m = cfg.spatial_merge_size
        if any(len(g) != 3 or g[1] % m or g[2] % m or min(g) < 1 for g in grids):
            raise ValueError(f"image_grid_thw {grids}: need (t, h, w) rows with h and w multiples of {m}")
        n = sum(t * h * w for t, h, w in grids)
        if pixel_values.ndim != 2 or pixel_values.shape != (n, cfg.patch_dim):
            raise ValueError(
                f"pixel_values must be ({n}, {cfg.patch_dim}) for image_grid_thw {grids}, "
                f"got {tuple(pixel_values.shape)}"
            )
        lay = vision_layout(grids, cfg, pixel_values.device)
        x = self.patch_embed(pixel_values)  # n c
        x = x.view(-1, m * m, x.shape[-1])[lay.window_index].flatten(0, 1)  # window order
        inv_freq = inv_frequencies(cfg.head_dim // 2, cfg.rope_theta, x.device)  # rows, cols: half each
        angles = (lay.pos[..., None].float() * inv_freq).flatten(1)  # n d/2 as [rows, cols]
        angles = torch.cat([angles, angles], -1)[:, None]  # n 1 d
        pe = angles.cos(), angles.sin()
        for i, block in enumerate(self.blocks):
            x = block(x, pe, lay.images if i in cfg.fullatt_block_indexes else lay.windows)
        out = self.merger(x)  # u c, window order
        return out[torch.argsort(lay.window_index)]


# ----------------------------------------------------------------------------------------------- language
class LayerKV:
    """One decoder layer's keys and values (b, kv_heads, p, d), after RoPE, grown along p at every call."""

    def __init__(self):
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add (b, kv_heads, l, d) keys and values; returns all of them (b, kv_heads, p + l, d)."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """Keys and values of every decoder layer for the tokens seen so far."""

    def __init__(self, num_layers: int):
        self.layers = [LayerKV() for _ in range(num_layers)]

    def __len__(self) -> int:
        """Cached tokens p."""
        k = self.layers[0].k
        return 0 if k is None else k.shape[2]


def attention_mask_for(
    attention_mask: Tensor | None, l: int, past: int, device: torch.device
) -> Tensor | None:
    """Boolean mask (b, 1, l, p + l) or (l, p + l) of l new queries over the p cached + l new keys.

    Causal, and keys marked 0 in ``attention_mask`` (b, p + l) hidden. None where SDPA needs none: no padding
    and either no cache (plain causal) or one query (it sees every key).
    """
    real = attention_mask is None or bool(attention_mask.all())
    if real and (past == 0 or l == 1):
        return None
    q = torch.arange(l, device=device)[:, None] + past  # l 1: absolute query positions
    k = torch.arange(past + l, device=device)[None]  # 1 p+l
    mask = k <= q
    if not real:
        mask = mask & attention_mask.bool()[:, None, None, :]
    # the diagonal keeps padding queries from being fully masked (NaN); their output is discarded
    return mask | (k == q)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen25VLConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=True)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)

    def forward(
        self, x: Tensor, pe: tuple[Tensor, Tensor], mask: Tensor | None, kv: LayerKV | None = None
    ) -> Tensor:
        """``mask`` from :func:`attention_mask_for`; None = causal (or, for one query, over every key)."""
        q = self.q_proj(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # b h l d
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, -1)).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, -1)).transpose(1, 2)
        cos, sin = pe  # (b, 1, l, d) in the activation dtype, as the reference
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if kv is not None:
            k, v = kv.append(k, v)  # b h_kv p+l d
        rep = self.num_heads // self.num_kv_heads  # GQA: kv head j serves q heads j*rep .. j*rep+rep-1
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        causal = mask is None and q.shape[2] > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen25VLConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: Tensor, pe: tuple[Tensor, Tensor], mask: Tensor | None, kv: LayerKV | None = None
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), pe, mask, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    """Decoder stack up to the final norm (checkpoint prefix ``model.``)."""

    def __init__(self, cfg: Qwen25VLConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def rope(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(3, b, l) positions -> cos, sin (b, 1, l, head_dim): frequency slot k follows axis t, h or w."""
        cfg = self.config
        angles = pos[..., None].float() * inv_frequencies(
            cfg.head_dim, cfg.rope_theta, pos.device
        )  # 3 b l d/2
        axis = torch.tensor([i for i, n in enumerate(cfg.mrope_section) for _ in range(n)], device=pos.device)
        angles = angles.gather(0, axis.expand(1, *angles.shape[1:3], -1)).squeeze(0)  # b l d/2
        angles = torch.cat([angles, angles], -1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(
        self, x: Tensor, pos: Tensor, attention_mask: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        """(b, l, c) input embeddings at (3, b, l) positions -> (b, l, c) final-normed states.

        ``attention_mask`` (b, p + l) marks real tokens, the p cached ones included; attention is causal over
        real tokens only. Padding rows are returned as zeros. ``cache`` (p tokens) gets the l new keys and
        values.
        """
        l = x.shape[1]
        past = 0 if cache is None else len(cache)
        mask = attention_mask_for(attention_mask, l, past, x.device)
        pe = self.rope(pos, x.dtype)
        kvs = [None] * len(self.layers) if cache is None else cache.layers
        for layer, kv in zip(self.layers, kvs):
            x = layer(x, pe, mask, kv)
        x = self.norm(x)
        if attention_mask is None or bool(attention_mask.all()):
            return x
        return x * attention_mask[:, past:, None].to(x.dtype)


class Qwen2_5_VL(nn.Module):
    """Qwen2.5-VL; ``encode`` maps a tokenised multimodal prompt batch to final-normed states, ``logits`` and
    ``generate`` (``lm_head=True`` only) continue it as text.

    ``lm_head=True`` adds the key ``lm_head.weight`` (vocab, hidden), unless the config ties it to
    ``model.embed_tokens.weight``: then the embedding matrix is the head and the module holds no extra tensor.
    """

    def __init__(self, cfg: Qwen25VLConfig, lm_head: bool = False):
        super().__init__()
        self.config = cfg
        self.model = LanguageModel(cfg)
        self.visual = VisionTower(cfg.vision)
        self.has_head = lm_head
        untied = lm_head and not cfg.tie_word_embeddings
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if untied else None

    def head_weight(self) -> Tensor:
        """The (vocab, hidden) output projection: ``lm_head.weight``, or the token embeddings when tied."""
        if not self.has_head:
            raise ValueError("this Qwen2_5_VL was built without an LM head: pass lm_head=True")
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def positions(
        self, input_ids: Tensor, attention_mask: Tensor | None, image_grid_thw: Tensor | None
    ) -> Tensor:
        """(3, b, l) M-RoPE positions of a prompt batch (see :func:`mrope_positions`)."""
        return mrope_positions(
            input_ids,
            image_grid_thw,
            attention_mask,
            image_token_id=self.config.image_token_id,
            spatial_merge_size=self.config.vision.spatial_merge_size,
        )

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None, image_grid_thw: Tensor | None) -> Tensor:
        """Token embeddings with the vision tokens written over the ``<|image_pad|>`` slots (b, l, c)."""
        x = self.model.embed_tokens(input_ids)
        is_img = input_ids == self.config.image_token_id
        if pixel_values is None or image_grid_thw is None or len(image_grid_thw) == 0:
            if bool(is_img.any()):
                raise ValueError("input_ids hold <|image_pad|> tokens but no pixel_values/image_grid_thw")
            return x
        img = self.visual(pixel_values, image_grid_thw)
        if int(is_img.sum()) != img.shape[0]:
            raise ValueError(
                f"input_ids hold {int(is_img.sum())} <|image_pad|> tokens but the images give {img.shape[0]} "
                f"tokens (image_grid_thw {torch.as_tensor(image_grid_thw).tolist()})"
            )
        return x.masked_scatter(is_img[..., None], img.to(x.dtype))

    def encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
    ) -> Tensor:
        """Final-normed last-layer states of a prompt batch.

        Args:
            input_ids: (b, l) token ids, each image's ``<|image_pad|>`` already expanded to
                grid_h * grid_w / merge^2 copies.
            attention_mask: (b, l) 1 for real tokens, 0 for padding (either side); None = all real.
            pixel_values: (n, 1176) patch vectors of all images, in prompt order. image_grid_thw: (images, 3).
        Returns:
            (b, l, hidden_size); padding rows are zeros.
        """
        check_prompt(input_ids, attention_mask)
        pos = self.positions(input_ids, attention_mask, image_grid_thw)
        x = self.embed(input_ids, pixel_values, image_grid_thw)
        return self.model(x, pos, attention_mask)

    def logits(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
    ) -> Tensor:
        """Next-token logits (b, l, v) at every prompt position (arguments as :meth:`encode`); padding rows
        are zeros. Under left padding ``[:, -1]`` is the first generation step's."""
        w = self.head_weight()
        return F.linear(self.encode(input_ids, attention_mask, pixel_values, image_grid_thw), w)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        max_new_tokens: int = 128,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
    ) -> Tensor:
        """Greedy continuation of a prompt batch with a KV cache.

        Args:
            input_ids, attention_mask, pixel_values, image_grid_thw: as :meth:`encode`, padding on the left.
            max_new_tokens: at most this many new tokens (>= 1).
            eos_token_id: id(s) that end a row; None = never end early. pad_token_id: what an ended row gets
                after its eos (default: the first eos id).
        Returns:
            (b, k) long, the new tokens only: k = max_new_tokens, fewer once every row has ended.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        w = self.head_weight()
        check_prompt(input_ids, attention_mask)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        if not bool(mask[:, -1].all()):
            rows = (mask[:, -1] == 0).nonzero().flatten().tolist()
            raise ValueError(f"generate needs left padding, but prompt rows {rows} end with padding")
        stops = torch.tensor(
            [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id,
            dtype=torch.long,
            device=input_ids.device,
        )
        pad = pad_token_id if pad_token_id is not None else int(stops[0]) if len(stops) else 0
        b = input_ids.shape[0]
        pos = self.positions(input_ids, mask, image_grid_thw)  # 3 b l
        nxt = pos.amax((0, 2)) + 1  # b: the first new token's position, on all three axes
        x, cache = self.embed(input_ids, pixel_values, image_grid_thw), KVCache(self.config.num_layers)
        done, out = torch.zeros(b, dtype=torch.bool, device=input_ids.device), []
        for step in range(max_new_tokens):
            tok = F.linear(self.model(x, pos, mask, cache)[:, -1], w).argmax(-1)  # b
            out.append(torch.where(done, pad, tok))
            done = done | torch.isin(tok, stops)
            if bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
            pos = (nxt + step).expand(3, b)[..., None]  # 3 b 1
            x = self.model.embed_tokens(out[-1][:, None])
        return torch.stack(out, 1)


def check_prompt(input_ids: Tensor, attention_mask: Tensor | None) -> None:
    """A ValueError unless ``input_ids`` is (b, l) and ``attention_mask`` None or the same shape."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (b, l), got {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )


# ----------------------------------------------------------------------------------------------- FLOPs
def flops(cfg: Qwen25VLConfig, n_tokens: int, grid_thw_list: list[tuple[int, int, int]]) -> dict[str, float]:
    """Analytic FLOPs (2 x MACs) of one ``encode`` of one prompt: every matmul, attention's QK^T and PV.

    ``n_tokens`` is the whole prompt length (image tokens included). The LLM stops at the final norm (no
    lm_head) and its causal attention is counted dense. Window attention is counted as executed: each window
    padded to the largest window of its image batch (border windows are smaller). Elementwise work is not
    counted, as in ``torch.utils.flop_counter``.
    """
    v = cfg.vision
    d, m = v.hidden_size, v.spatial_merge_size
    n = sum(t * h * w for t, h, w in grid_thw_list)
    win = img = (0, 0)
    if grid_thw_list:
        lay = vision_layout([list(g) for g in grid_thw_list], v, "cpu")
        win, img = lay.windows.gather.shape, lay.images.gather.shape
    vit_lin = n * v.patch_dim * d + v.depth * n * (4 * d * d + 3 * d * v.intermediate_size)
    u, dm = n // (m * m), d * m * m
    vit_lin += u * dm * dm + u * dm * v.out_hidden_size
    n_full = len(v.fullatt_block_indexes)
    vit_attn = 2 * d * (n_full * img[0] * img[1] ** 2 + (v.depth - n_full) * win[0] * win[1] ** 2)
    c, hd, L = cfg.hidden_size, cfg.head_dim, n_tokens
    per_tok = 2 * c * c + 2 * c * cfg.num_kv_heads * hd + 3 * c * cfg.intermediate_size
    llm_lin = cfg.num_layers * L * per_tok
    llm_attn = cfg.num_layers * 2 * L * L * c
    out = {"vit": vit_lin + vit_attn, "llm": llm_lin + llm_attn, "attention": vit_attn + llm_attn}
    out = {k: 2.0 * x for k, x in out.items()}
    out["total"] = out["vit"] + out["llm"]
    return out


# ----------------------------------------------------------------------------------------------- loading
def load_qwen2_5_vl(
    path_or_repo: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    config: Qwen25VLConfig | None = None,
    lm_head: bool = False,
) -> Qwen2_5_VL:
    """Load the model from (a) a ``text_encoder/`` folder or an Instruct model's folder (config.json +
    safetensors, sharded or not), (b) a repo root holding ``text_encoder/``, (c) a Hugging Face repo id
    (downloads ``text_encoder/*.json`` and ``text_encoder/*.safetensors`` only; with ``lm_head=True`` also
    the root ``config.json`` and ``model*.safetensors*``, which an Instruct repo holds, preferred) or (d) one
    ``.safetensors`` file (config.json next to it, or ``config=``). Legacy and new key names both load
    strictly.

    ``lm_head=False`` (the encoder): ``lm_head.weight`` is skipped. ``lm_head=True``: the head is built and
    ``lm_head.weight`` must be in the checkpoint, unless the config ties it to the embeddings (then a stored
    copy is skipped).
    """
    s = os.fspath(path_or_repo)
    if lm_head and is_repo_id(s):
        patterns = ["config.json", "model*.safetensors*", "text_encoder/*.json", "text_encoder/*.safetensors"]
        path_or_repo = download(s, patterns)
    src = locate(path_or_repo, "text_encoder", what="Qwen2.5-VL weights", needs_config=False)
    folder = src if src.is_dir() else src.parent
    if config is None:
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"no config.json next to {src}; pass config= (e.g. PRESETS[...])")
        config = config_from_transformers(read_config(cfg_file))
    model = build_on_meta(lambda: Qwen2_5_VL(config, lm_head=lm_head))
    ckpt = legacy_view(open_checkpoint(src), lm_head=model.lm_head is not None)
    return load_checkpoint(model, ckpt, dtype=dtype, device=device)


_RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def legacy_view(ckpt: Checkpoint, lm_head: bool = False) -> Checkpoint | Remap:
    """The checkpoint under legacy key names: ``model.language_model.*`` -> ``model.*``, ``model.visual.*`` ->
    ``visual.*``; ``lm_head.*`` is kept with ``lm_head=True``, else left out (not part of the encoder)."""
    plan: dict[str, str] = {}
    for key in ckpt:
        if key.startswith("lm_head.") and not lm_head:
            continue
        new = next((dst + key[len(src) :] for src, dst in _RENAMES if key.startswith(src)), key)
        if new in plan:
            a, b = sorted((plan[new], key))
            raise CheckpointError(f"{ckpt.source} holds both {a!r} and {b!r} (the same tensor)")
        plan[new] = key
    if len(plan) == len(ckpt) and all(k == v for k, v in plan.items()):
        return ckpt
    return Remap(ckpt, plan)


def config_from_transformers(c: dict) -> Qwen25VLConfig:
    """``Qwen25VLConfig`` from a transformers ``Qwen2_5_VLConfig`` config.json (nested ``text_config`` or the
    older flat layout; ``rope_parameters`` or ``rope_scaling`` for the M-RoPE sections)."""
    t = {**c, **c.get("text_config", {})}  # nested text_config wins over flat duplicates
    v = c.get("vision_config")
    if v is None:
        raise ValueError("config.json has no vision_config: not a Qwen2.5-VL config")
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
        raise ValueError(f"unsupported rope scaling {rope} (only plain M-RoPE)")
    if "mrope_section" not in rope:
        raise ValueError(f"config.json gives no mrope_section (rope settings: {rope})")
    for where, act in (("text", t.get("hidden_act", "silu")), ("vision", v.get("hidden_act", "silu"))):
        if act != "silu":
            raise ValueError(f"{where} hidden_act {act!r} is not supported (Qwen2.5-VL uses silu)")
    if t.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported (Qwen2.5-VL-7B does not use it)")
    vrope = v.get("rope_parameters") or {}
    try:
        vision = VisionConfig(
            depth=v["depth"],
            hidden_size=v["hidden_size"],
            num_heads=v["num_heads"],
            intermediate_size=v["intermediate_size"],
            out_hidden_size=v["out_hidden_size"],
            in_channels=v.get("in_channels", v.get("in_chans", 3)),
            patch_size=v.get("patch_size", v.get("spatial_patch_size", 14)),
            temporal_patch_size=v.get("temporal_patch_size", 2),
            spatial_merge_size=v.get("spatial_merge_size", 2),
            window_size=v["window_size"],
            fullatt_block_indexes=tuple(v["fullatt_block_indexes"]),
            rope_theta=float(vrope.get("rope_theta", 10_000.0)),
        )
        heads = t["num_attention_heads"]
        return Qwen25VLConfig(
            vocab_size=t["vocab_size"],
            hidden_size=t["hidden_size"],
            intermediate_size=t["intermediate_size"],
            num_layers=t["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=t.get("num_key_value_heads") or heads,
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 1_000_000.0))),
            mrope_section=tuple(rope["mrope_section"]),
            vision=vision,
            image_token_id=c.get("image_token_id", 151655),
            video_token_id=c.get("video_token_id", 151656),
            vision_start_token_id=c.get("vision_start_token_id", 151652),
            vision_end_token_id=c.get("vision_end_token_id", 151653),
            # transformers >= 5 reads the top level; older files may hold it in text_config only
            tie_word_embeddings=bool(
                c.get("tie_word_embeddings") or c.get("text_config", {}).get("tie_word_embeddings")
            ),
        )
    except KeyError as e:
        raise ValueError(f"config.json lacks {e.args[0]!r}: not a Qwen2.5-VL config") from None
