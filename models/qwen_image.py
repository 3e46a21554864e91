"""Qwen-Image MMDiT (Qwen-Image-Edit, -2509 "Plus", -2511), module tree = diffusers keys (``transformer/``).

60 dual-stream blocks at full size: separate image/text weights, one joint attention over [text, image].
Positions are explicit float ids (frame, row, col) for every token, image *and* text, so token subsets,
other grids and fractional positions need no model change; RoPE is evaluated at whatever ids come in.
``official_ids`` reproduces the ids diffusers derives from ``img_shapes`` (MSRoPE with centred rows/cols,
frame = image index, text on the diagonal after the largest half-extent). Edit pipelines append the
reference-image tokens after the target tokens; ``forward`` returns the velocity of every image token and
``target_velocity`` keeps the target part.

With ``zero_cond_t`` (Edit-2511) the reference tokens (frame id > 0) are modulated as if t = 0; the text
stream and the output norm keep t.

Reference: diffusers ``QwenImageTransformer2DModel`` (``transformer_qwenimage.py``), the only shipped layout.

Shape legend: b batch, n image tokens, l text tokens, s = l + n, h heads, d head dim, c channels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import attention as attend
from models.loading import (
    build_on_meta,
    load_checkpoint,
    locate,
    open_checkpoint,
    read_config,
    strip_prefix,
)


@dataclass(frozen=True)
class QwenImageConfig:
    """Architecture of the Qwen-Image MMDiT (diffusers ``transformer/config.json`` fields, renamed)."""

    patch_size: int  # latent pixels per token side (2x2 packing)
    in_channels: int  # packed latent channels (16 x 2 x 2)
    out_channels: int  # latent channels; proj_out emits patch_size^2 * out_channels
    num_layers: int
    num_heads: int
    head_dim: int
    joint_attention_dim: int  # width of the Qwen2.5-VL hidden states
    axes_dim: tuple[int, int, int]  # RoPE dims for (frame, row, col); sums to head_dim
    theta: int
    zero_cond_t: bool  # Edit-2511: reference tokens modulated with t = 0

    def __post_init__(self):
        if (
            sum(self.axes_dim) != self.head_dim
            or any(a % 2 for a in self.axes_dim)
            or len(self.axes_dim) != 3
        ):
            raise ValueError(
                f"axes_dim {self.axes_dim} must be 3 even sizes summing to head_dim {self.head_dim}"
            )

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return 4 * self.hidden_size

    @property
    def out_dim(self) -> int:
        return self.patch_size**2 * self.out_channels


QWEN_IMAGE_EDIT = QwenImageConfig(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    num_heads=24,
    head_dim=128,
    joint_attention_dim=3584,
    axes_dim=(16, 56, 56),
    theta=10_000,
    zero_cond_t=False,
)
QWEN_IMAGE_EDIT_2511 = replace(QWEN_IMAGE_EDIT, zero_cond_t=True)
# Sizes shrink; every code path (QK-norm, 3-axis MSRoPE, text RMSNorm) stays.
QWEN_IMAGE_TINY = replace(
    QWEN_IMAGE_EDIT,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    num_heads=2,
    head_dim=16,
    joint_attention_dim=24,
    axes_dim=(4, 6, 6),
)
QWEN_IMAGE_TINY_2511 = replace(QWEN_IMAGE_TINY, zero_cond_t=True)
PRESETS = {
    "qwen-image-edit": QWEN_IMAGE_EDIT,
    "qwen-image-edit-2509": QWEN_IMAGE_EDIT,  # same transformer config as Edit
    "qwen-image-edit-2511": QWEN_IMAGE_EDIT_2511,
    "qwen-image-tiny": QWEN_IMAGE_TINY,
    "qwen-image-tiny-2511": QWEN_IMAGE_TINY_2511,
}


# ----------------------------------------------------------------------------------------------- functions
def timestep_embedding(t: Tensor, dim: int = 256) -> Tensor:
    """(b,) sigma in [0, 1] -> (b, dim) sinusoid, cosines first, angle = (t * freq) * 1000.

    The operation order follows diffusers' ``Timesteps(scale=1000)`` so fp32 results are bit-identical; the
    frequency table is cast to the dtype of ``t`` first, as there (matters in bf16).
    """
    half = dim // 2
    exponent = -math.log(10_000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent).to(t.dtype)[None]
    args = 1000 * args
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> tuple[Tensor, Tensor]:
    """(b, s, 3) float ids -> cos, sin of shape (b, s, 1, d/2): angle = id * theta^(-2k/D) per axis.

    Computed in fp32 like the official integer tables (diffusers ``QwenEmbedRope``), so integer ids give the
    very same angles; fractional ids are simply other points on the same curves.
    """
    angles = []
    for i, dim in enumerate(axes_dim):
        omega = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, device=ids.device).float().div(dim))
        angles.append(ids[..., i].float()[..., None] * omega)
    angles = torch.cat(angles, dim=-1)[:, :, None]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, pe: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of (b, s, h, d), as complex numbers, by ``pe``'s angles."""
    cos, sin = pe
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


def official_ids(img_shapes: Sequence[tuple[int, int, int]], txt_len: int) -> tuple[Tensor, Tensor]:
    """Ids diffusers builds from ``img_shapes``: image (sum f*h*w, 3) and text (txt_len, 3), float32.

    Args:
        img_shapes: [(frames, h, w), ...] in packed tokens, target first, then the references.
        txt_len: number of text tokens (padding included: diffusers places every text slot).
    Image i, frame k has frame id i + k; rows are centred, -(h - h//2) ... h//2 - 1, and so are columns.
    Text token j sits at m + j on all three axes, m = max over images of max(h//2, w//2).
    """
    if not img_shapes:
        raise ValueError("img_shapes needs at least the target image")
    if txt_len < 0:
        raise ValueError(f"txt_len must be >= 0, got {txt_len}")
    parts, m = [], 0
    for i, shape in enumerate(img_shapes):
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"img_shapes[{i}] must be (frames, h, w) with positive sizes, got {shape}")
        f, h, w = (int(s) for s in shape)
        frame = torch.arange(f, dtype=torch.float32) + i
        rows = torch.arange(h, dtype=torch.float32) - (h - h // 2)
        cols = torch.arange(w, dtype=torch.float32) - (w - w // 2)
        grid = torch.stack(torch.meshgrid(frame, rows, cols, indexing="ij"), dim=-1)  # f h w 3
        parts.append(grid.reshape(-1, 3))
        m = max(m, h // 2, w // 2)
    txt = (m + torch.arange(txt_len, dtype=torch.float32))[:, None].expand(-1, 3).contiguous()
    return torch.cat(parts), txt


# ----------------------------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    """RMS norm with a weight (diffusers ``RMSNorm``): statistics in fp32, eps 1e-6."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return x.to(self.weight.dtype) * self.weight


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """Holder for diffusers key ``time_text_embed.timestep_embedder`` (no text/guidance terms in Qwen)."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)


class Attention(nn.Module):
    """Joint attention (diffusers ``attn``): image ``to_*`` and text ``add_*`` projections, QK-norm, RoPE."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_q_proj, self.add_k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # key to_out.0 (a Dropout sits at index 1)
        self.to_add_out = nn.Linear(dim, dim)

    def forward(
        self, img: Tensor, txt: Tensor, pe: tuple[Tensor, Tensor], mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        heads = lambda x: x.unflatten(-1, (-1, self.head_dim))  # b s (h d) -> b s h d
        q = torch.cat([self.norm_added_q(heads(self.add_q_proj(txt))), self.norm_q(heads(self.to_q(img)))], 1)
        k = torch.cat([self.norm_added_k(heads(self.add_k_proj(txt))), self.norm_k(heads(self.to_k(img)))], 1)
        v = torch.cat([heads(self.add_v_proj(txt)), heads(self.to_v(img))], 1)
        q, k = apply_rope(q, pe), apply_rope(k, pe)
        out = attend(q, k, v, mask, layout="bshd").flatten(2)  # backend of models.attention
        l = txt.shape[1]
        return self.to_out[0](out[:, l:]), self.to_add_out(out[:, :l])


class GELUProj(nn.Module):
    """Linear then tanh-GELU (diffusers ``GELU``; key ``net.0.proj``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        # keys net.0.proj / net.2: a parameter-free Dropout sits at index 1
        self.net = nn.ModuleList([GELUProj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


def _ln(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def _modulate(x: Tensor, mod: Tensor, is_ref: Tensor | None) -> tuple[Tensor, Tensor]:
    """x * (1 + scale) + shift and the gate; ``mod`` is (b, 3c), or (2b, 3c) = [t rows, t=0 rows] with
    ``is_ref`` (b, n, 1) choosing the t = 0 rows for reference tokens (zero_cond_t)."""
    shift, scale, gate = mod.chunk(3, dim=-1)
    if is_ref is None:
        shift, scale, gate = shift[:, None], scale[:, None], gate[:, None]
    else:
        b = x.shape[0]
        shift, scale, gate = (torch.where(is_ref, p[b:, None], p[:b, None]) for p in (shift, scale, gate))
    return x * (1 + scale) + shift, gate


class TransformerBlock(nn.Module):
    """Dual-stream block: per-stream AdaLN modulation, joint attention, per-stream tanh-GELU MLPs."""

    def __init__(self, cfg: QwenImageConfig):
        super().__init__()
        d = cfg.hidden_size
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))  # key img_mod.1
        self.img_norm1, self.img_norm2 = _ln(d), _ln(d)
        self.attn = Attention(d, cfg.head_dim)
        self.img_mlp = FeedForward(d, cfg.mlp_hidden)
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))  # key txt_mod.1
        self.txt_norm1, self.txt_norm2 = _ln(d), _ln(d)
        self.txt_mlp = FeedForward(d, cfg.mlp_hidden)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        img_vec: Tensor,
        txt_vec: Tensor,
        pe: tuple[Tensor, Tensor],
        mask: Tensor | None,
        is_ref: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = self.img_mod(img_vec).chunk(2, dim=-1)
        txt_mod1, txt_mod2 = self.txt_mod(txt_vec).chunk(2, dim=-1)
        img_in, img_gate1 = _modulate(self.img_norm1(img), img_mod1, is_ref)
        txt_in, txt_gate1 = _modulate(self.txt_norm1(txt), txt_mod1, None)
        img_a, txt_a = self.attn(img_in, txt_in, pe, mask)
        img = img + img_gate1 * img_a
        txt = txt + txt_gate1 * txt_a
        img_in, img_gate2 = _modulate(self.img_norm2(img), img_mod2, is_ref)
        img = img + img_gate2 * self.img_mlp(img_in)
        txt_in, txt_gate2 = _modulate(self.txt_norm2(txt), txt_mod2, None)
        txt = txt + txt_gate2 * self.txt_mlp(txt_in)
        if img.dtype == torch.float16:  # the reference clips fp16 activations to the finite range
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


class NormOut(nn.Module):
    """diffusers ``AdaLayerNormContinuous``: LN, then (1 + scale, shift) from SiLU(vec), scale first."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = _ln(dim)
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(vec).to(x.dtype)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale)[:, None] + shift[:, None]


class QwenImage(nn.Module):
    """The Qwen-Image MMDiT; ``forward`` takes explicit (frame, row, col) ids for image and text tokens.

    Hook point: ``stack_hook(run, img, txt) -> (img, txt)``, when set (``models.hooks.stack_hook``), replaces
    the call ``run(img, txt)`` of the block stack on the embedded streams (feature caches use it).
    """

    stack_hook = None

    def __init__(self, cfg: QwenImageConfig):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.time_text_embed = TimeTextEmbed(d)
        self.txt_norm = RMSNorm(cfg.joint_attention_dim)
        self.img_in = nn.Linear(cfg.in_channels, d)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, d)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.norm_out = NormOut(d)
        self.proj_out = nn.Linear(d, cfg.out_dim)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor | float,
        *,
        txt_mask: Tensor | None = None,
    ) -> Tensor:
        """Velocity of every image token.

        Args:
            img: (b, n, in_channels) packed latent tokens, target first, then any reference tokens.
            img_ids: (b, n, 3) or (n, 3) float (frame, row, col) of ``img``; frame > 0 marks a reference.
            txt: (b, l, joint_attention_dim) Qwen2.5-VL hidden states (padded right for ragged batches).
            txt_ids: (b, l, 3) or (l, 3) float ids of ``txt``.
            timesteps: (b,) or scalar sigma in [0, 1] (the model scales by 1000).
            txt_mask: optional (b, l), nonzero for real text tokens; padded keys are not attended to.
        Returns:
            (b, n, patch_size^2 * out_channels).
        """
        cfg = self.config
        if img.ndim != 3 or img.shape[-1] != cfg.in_channels:
            raise ValueError(f"img must be (b, n, {cfg.in_channels}), got {tuple(img.shape)}")
        b = img.shape[0]
        if txt.ndim != 3 or txt.shape[-1] != cfg.joint_attention_dim or txt.shape[0] != b:
            raise ValueError(f"txt must be ({b}, l, {cfg.joint_attention_dim}), got {tuple(txt.shape)}")
        img_ids, txt_ids = _batched_ids(img_ids, img, "img_ids"), _batched_ids(txt_ids, txt, "txt_ids")
        t = torch.as_tensor(timesteps, device=img.device)
        if t.ndim > 1 or t.numel() not in (1, b):
            raise ValueError(f"timesteps must be a scalar or ({b},), got shape {tuple(t.shape)}")
        t = t.reshape(-1).expand(b)
        mask = None
        if txt_mask is not None:
            if tuple(txt_mask.shape) != tuple(txt.shape[:2]):
                raise ValueError(f"txt_mask must be {tuple(txt.shape[:2])}, got {tuple(txt_mask.shape)}")
            keep_img = torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)
            mask = torch.cat([txt_mask.to(img.device, torch.bool), keep_img], dim=1)[:, None, None]

        img = self.img_in(img)
        t = t.to(img.dtype)
        is_ref = None
        if cfg.zero_cond_t:
            t = torch.cat([t, t * 0])  # Edit-2511: a second embedding at t = 0 for the reference tokens
            is_ref = (img_ids[..., 0] > 0)[..., None]
        vec = self.time_text_embed.timestep_embedder(timestep_embedding(t).to(img.dtype))
        txt_vec = vec[:b]
        txt = self.txt_in(self.txt_norm(txt))
        pe = rope(torch.cat([txt_ids, img_ids], 1), cfg.axes_dim, cfg.theta)

        def run(img: Tensor, txt: Tensor) -> tuple[Tensor, Tensor]:
            for block in self.transformer_blocks:
                img, txt = block(img, txt, vec, txt_vec, pe, mask, is_ref)
            return img, txt

        img, txt = run(img, txt) if self.stack_hook is None else self.stack_hook(run, img, txt)
        return self.proj_out(self.norm_out(img, txt_vec))


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


def target_velocity(
    model: QwenImage,
    x: Tensor,
    sigma: Tensor | float,
    txt: Tensor,
    txt_ids: Tensor,
    txt_mask: Tensor | None = None,
    *,
    refs: Tensor | None,
    img_ids: Tensor,
) -> Tensor:
    """Velocity of the target tokens ``x`` (b, n, c) with the reference tokens appended to the image stream.

    Bind ``refs`` ((b or 1, n_ref, c) packed reference latents, or None) and ``img_ids`` (target then
    reference ids, e.g. from ``official_ids``) with ``functools.partial`` to get
    ``f(x, sigma, txt, txt_ids, txt_mask)``, the per-branch function the guidance helpers in
    ``samplers.guidance`` expect. ``refs`` with batch 1 (or a divisor of b) is repeated to the batch of ``x``,
    so a CFG batch [cond; uncond] shares the same references.
    """
    img = x
    if refs is not None:
        if refs.ndim != 3 or refs.shape[-1] != x.shape[-1] or x.shape[0] % refs.shape[0]:
            raise ValueError(
                f"refs must be (b', n_ref, {x.shape[-1]}) with b' dividing {x.shape[0]}, "
                f"got {tuple(refs.shape)}"
            )
        img = torch.cat([x, refs.to(x).repeat(x.shape[0] // refs.shape[0], 1, 1)], dim=1)
    return model(img, img_ids, txt, txt_ids, sigma, txt_mask=txt_mask)[:, : x.shape[1]]


# ----------------------------------------------------------------------------------------------- FLOPs
def flops(
    cfg: QwenImageConfig, n_img: int, n_txt: int, batch: int = 1, zero_cond_t: bool | None = None
) -> dict[str, float]:
    """Analytic FLOPs (2 x MACs) of one forward: every matmul, attention's QK^T and PV included (dense).

    ``n_img`` counts every image token (target + references). With ``zero_cond_t`` (default: the config's)
    the time MLP and the image modulation also run for t = 0. Elementwise work (norms, RoPE, softmax) is not
    counted, matching ``torch.utils.flop_counter``.
    """
    zero = cfg.zero_cond_t if zero_cond_t is None else zero_cond_t
    d, m, s, rows = cfg.hidden_size, cfg.mlp_hidden, n_img + n_txt, 2 if zero else 1
    embed = n_img * cfg.in_channels * d + n_txt * cfg.joint_attention_dim * d
    time = rows * (256 * d + d * d)
    block = s * (4 * d * d + 2 * d * m) + (rows + 1) * 6 * d * d
    final = 2 * d * d + n_img * d * cfg.out_dim
    linear = embed + time + cfg.num_layers * block + final
    attn = cfg.num_layers * 2 * s * s * d
    return {
        "total": 2.0 * batch * (linear + attn),
        "linear": 2.0 * batch * linear,
        "attention": 2.0 * batch * attn,
    }


# ----------------------------------------------------------------------------------------------- loading
def load_qwen_image(
    path_or_repo: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    config: QwenImageConfig | None = None,
) -> QwenImage:
    """Load the transformer from (a) a diffusers ``transformer/`` folder (sharded or not), (b) a repo root
    holding one, (c) a Hugging Face repo id (downloads ``transformer/*.json`` and ``*.safetensors`` only), or
    (d) a single ``.safetensors`` file in the same key layout, which needs ``config``.

    ``config`` overrides config.json; ``dtype`` casts floating tensors.
    """
    src = locate(path_or_repo, "transformer", what="Qwen-Image transformer")
    if src.is_file():
        if config is None:
            raise ValueError(
                f"{src} is a single file without a config.json: pass config= (e.g. QWEN_IMAGE_EDIT)"
            )
        ckpt = strip_prefix(open_checkpoint(src), "model.diffusion_model.")
    else:
        ckpt = open_checkpoint(src)
        if config is None:
            config = config_from_diffusers(read_config(src / "config.json"))
    model = build_on_meta(lambda: QwenImage(config))
    return load_checkpoint(model, ckpt, dtype=dtype, device=device)


def config_from_diffusers(c: dict) -> QwenImageConfig:
    """``QwenImageConfig`` from a diffusers ``QwenImageTransformer2DModel`` config.json (missing keys take
    diffusers' defaults, which are the released model's)."""
    for flag in ("guidance_embeds", "use_additional_t_cond", "use_layer3d_rope"):
        if c.get(flag, False):
            raise ValueError(
                f"transformer config sets {flag}=true, which this implementation does not support"
            )
    base = QWEN_IMAGE_EDIT
    in_channels = c.get("in_channels", base.in_channels)
    return QwenImageConfig(
        patch_size=c.get("patch_size", base.patch_size),
        in_channels=in_channels,
        # diffusers: a missing key is its default (16); an explicit null falls back to in_channels
        out_channels=c.get("out_channels", base.out_channels) or in_channels,
        num_layers=c.get("num_layers", base.num_layers),
        num_heads=c.get("num_attention_heads", base.num_heads),
        head_dim=c.get("attention_head_dim", base.head_dim),
        joint_attention_dim=c.get("joint_attention_dim", base.joint_attention_dim),
        axes_dim=tuple(c.get("axes_dims_rope", base.axes_dim)),
        theta=base.theta,  # diffusers hard-codes 10000
        zero_cond_t=bool(c.get("zero_cond_t", False)),
    )
