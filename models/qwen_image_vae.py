"""Qwen-Image VAE (the Wan-2.1 causal 3-D VAE) run on single images, module tree = diffusers ``vae/`` keys.

The checkpoint holds 3-D causal convolutions (5-D kernels). For one frame every 3x3x3 causal conv sees two
zero frames of padding before the real one, so only its last temporal tap ``w[:, :, -1]`` touches data, and
the temporal up/down-sampling convs (``time_conv``) are never run on the first frame. This file therefore
keeps the official 5-D parameters (strict key and shape parity with diffusers ``AutoencoderKLQwenImage``) and
executes an exact 2-D network with ``conv2d(x, w[:, :, -1])``.

``encode`` returns the normalised posterior mean ``(mean - latents_mean_c) / latents_std_c``; ``decode`` maps
it back to an image clamped to [-1, 1] (the reference clamps inside ``decode``). ``decoder_features`` exposes
the decoder's intermediate maps (conv_in, the mid block, each up stage in execution order), named like
``models.flux_ae``.

Reference: diffusers ``autoencoder_kl_qwenimage.py``; Wan-2.1 ``wan/modules/vae.py``.

Shape legend: b batch, c channels, H W image pixels, h w latent pixels (H/8, W/8), z latent channels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.loading import build_on_meta, load_checkpoint, locate, open_checkpoint, read_config

LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class QwenImageVAEConfig:
    """Architecture and latent statistics of the VAE (diffusers ``vae/config.json`` fields)."""

    base_dim: int
    z_dim: int
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temporal_downsample: tuple[bool, ...]  # per down stage; only selects which stages own a time_conv
    in_channels: int
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample {self.temporal_downsample} needs len(dim_mult) - 1 = "
                f"{len(self.dim_mult) - 1} entries"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"latents_mean/std need z_dim = {self.z_dim} entries, got "
                f"{len(self.latents_mean)}/{len(self.latents_std)}"
            )

    @property
    def factor(self) -> int:
        """Pixels per latent pixel along each side."""
        return 2 ** (len(self.dim_mult) - 1)


QWEN_IMAGE_VAE = QwenImageVAEConfig(
    base_dim=96,
    z_dim=16,
    dim_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    temporal_downsample=(False, True, True),
    in_channels=3,
    latents_mean=LATENTS_MEAN,
    latents_std=LATENTS_STD,
)
# Sizes shrink; both resampler kinds (with and without time_conv), attention and shortcuts stay.
QWEN_IMAGE_VAE_TINY = replace(
    QWEN_IMAGE_VAE,
    base_dim=16,
    z_dim=4,
    dim_mult=(1, 2, 4),
    num_res_blocks=1,
    temporal_downsample=(False, True),
    latents_mean=(0.1, -0.2, 0.3, -0.4),
    latents_std=(1.5, 1.2, 1.8, 1.1),
)
PRESETS = {"qwen-image-vae": QWEN_IMAGE_VAE, "qwen-image-vae-tiny": QWEN_IMAGE_VAE_TINY}


# ----------------------------------------------------------------------------------------------- blocks
class CausalConv3d(nn.Conv3d):
    """A causal 3-D conv's parameters, applied to a single frame: only the last temporal tap meets data
    (the earlier taps see the causal zero padding), so it is ``conv2d`` with ``weight[:, :, -1]``."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int, int], stride=1):
        super().__init__(c_in, c_out, kernel, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        kh = self.kernel_size[1]
        return F.conv2d(x, self.weight[:, :, -1], self.bias, stride=self.stride[1:], padding=kh // 2)


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(c) and ``gamma`` (diffusers ``QwenImageRMS_norm``, no bias).

    ``gamma`` keeps the checkpoint's shape: (c, 1, 1, 1) in 3-D blocks, (c, 1, 1) in attention.
    """

    def __init__(self, c: int, video: bool = True):
        super().__init__()
        self.scale = c**0.5
        self.gamma = nn.Parameter(torch.ones((c, 1, 1, 1) if video else (c, 1, 1)))

    def forward(self, x: Tensor) -> Tensor:
        half = x.dtype in (torch.float16, torch.bfloat16)
        n = F.normalize(x.float() if half else x, dim=1).to(x.dtype)
        return n * self.scale * self.gamma.reshape(-1, 1, 1)


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = RMSNorm(c_in)
        self.conv1 = CausalConv3d(c_in, c_out, 3)
        self.norm2 = RMSNorm(c_out)
        self.conv2 = CausalConv3d(c_out, c_out, 3)
        self.conv_shortcut = CausalConv3d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over all h*w pixels, 1x1-conv projections, q/k/v fused in ``to_qkv``."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = RMSNorm(c, video=False)
        self.to_qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # contiguous channels: otherwise SDPA falls back to the math kernel and builds the (hw)^2 matrix
        qkv = (
            self.to_qkv(self.norm(x)).reshape(b, 1, 3 * c, h * w).transpose(-1, -2).contiguous()
        )  # b 1 (h w) 3c
        a = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))  # b 1 (h w) c
        return self.proj(a.squeeze(1).transpose(1, 2).reshape(b, c, h, w)) + x


class Resample(nn.Module):
    """2x down (pad right/bottom, stride-2 conv) or up (nearest x2, conv halving the channels).

    Stages that resample in time also own a ``time_conv``: loaded for key parity, never run on one frame.
    """

    def __init__(self, c: int, up: bool, temporal: bool):
        super().__init__()
        if up:  # key resample.1: the parameter-free upsampler sits at index 0
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(c, c // 2, 3, padding=1)
            )
            if temporal:
                self.time_conv = CausalConv3d(c, 2 * c, (3, 1, 1))
        else:  # key resample.1: ZeroPad2d at index 0 (asymmetric pad, as in training)
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c, c, 3, stride=2))
            if temporal:
                self.time_conv = CausalConv3d(c, c, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.resample(x)


class MidBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(c, c), ResidualBlock(c, c)])
        self.attentions = nn.ModuleList([AttentionBlock(c)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    def __init__(self, cfg: QwenImageVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3)
        blocks: list[nn.Module] = []  # flat list (diffusers key down_blocks.N): resnets, then a resampler
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(c_in, c_out))
                c_in = c_out
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(c_out, up=False, temporal=cfg.temporal_downsample[i]))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(self.mid_block(x))))


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_res_blocks: int, upsample: bool, temporal: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResidualBlock(c_in if j == 0 else c_out, c_out) for j in range(num_res_blocks + 1)
        )
        self.upsamplers = nn.ModuleList([Resample(c_out, up=True, temporal=temporal)]) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Decoder(nn.Module):
    def __init__(self, cfg: QwenImageVAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_up = cfg.temporal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3)
        self.mid_block = MidBlock(dims[0])
        ups = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(mult) - 1
            c_in = c_in // 2 if i > 0 else c_in  # every upsampler halves the channels
            ups.append(UpBlock(c_in, c_out, cfg.num_res_blocks, not last, not last and temporal_up[i]))
        self.up_blocks = nn.ModuleList(ups)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.in_channels, 3)

    def stages(self, z: Tensor):
        """Yield (name, feature) after conv_in, the mid block and every up stage, in execution order."""
        x = self.conv_in(z)
        yield "conv_in", x
        x = self.mid_block(x)
        yield "mid", x
        for k, block in enumerate(self.up_blocks):
            x = block(x)
            yield f"up{k}", x

    def forward(self, z: Tensor) -> Tensor:
        *_, (_, x) = self.stages(z)
        return self.conv_out(F.silu(self.norm_out(x)))


class QwenImageVAE(nn.Module):
    """The VAE on single images: ``encode`` / ``decode`` normalised latents, ``decoder_features``."""

    def __init__(self, cfg: QwenImageVAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)

    @property
    def latent_channels(self) -> int:
        return self.config.z_dim

    def encode(
        self, image: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """(b, 3, H, W) image in [-1, 1] -> (b, z, H/8, W/8) normalised latent (posterior mean by default).

        A (b, 3, 1, H, W) single-frame video is accepted too and gives a (b, z, 1, h, w) latent.
        """
        cfg, f = self.config, self.config.factor
        x, video = _frame(image, cfg.in_channels, "image")
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be a multiple of {f} on both sides")
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
        mu, sd = self._stats(z)
        z = (z - mu) / sd
        return z[:, :, None] if video else z

    def decode(self, latent: Tensor) -> Tensor:
        """(b, z, h, w) normalised latent -> (b, 3, 8h, 8w) image clamped to [-1, 1] (5-D in, 5-D out)."""
        z, video = _frame(latent, self.config.z_dim, "latent")
        x = self.decoder(self._denorm(z)).clamp(-1.0, 1.0)
        return x[:, :, None] if video else x

    def decoder_features(
        self, latent: Tensor, taps: tuple[str, ...] = ("conv_in", "mid", "up0")
    ) -> dict[str, Tensor]:
        """Decoder maps named in ``taps`` ("conv_in", "mid", "up0", "up1", ...) as (b, c, h', w'); "upK" is
        diffusers ``decoder.up_blocks[K]``'s output. Stops after the last requested tap."""
        names = ["conv_in", "mid", *(f"up{k}" for k in range(len(self.decoder.up_blocks)))]
        unknown = [t for t in taps if t not in names]
        if unknown:
            raise ValueError(f"unknown decoder taps {unknown}; choose from {names}")
        z, _ = _frame(latent, self.config.z_dim, "latent")
        out, want = {}, set(taps)
        for name, x in self.decoder.stages(self._denorm(z)):
            if name in want:
                out[name] = x
                if len(out) == len(want):
                    break
        return out

    def _stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        as_map = lambda v: torch.tensor(v, device=z.device).view(1, -1, 1, 1).to(z.dtype)
        return as_map(self.config.latents_mean), as_map(self.config.latents_std)

    def _denorm(self, z: Tensor) -> Tensor:
        mu, sd = self._stats(z)
        # z / (1 / std) + mean: the pipelines' order of operations, kept for bit parity
        return self.post_quant_conv(z / (1.0 / sd) + mu)


def _frame(x: Tensor, channels: int, name: str) -> tuple[Tensor, bool]:
    """Accept (b, c, h, w) or a single-frame (b, c, 1, h, w); return the 4-D view and whether it was 5-D."""
    if x.ndim == 5 and x.shape[1] == channels and x.shape[2] == 1:
        return x[:, :, 0], True
    if x.ndim == 4 and x.shape[1] == channels:
        return x, False
    raise ValueError(
        f"{name} must be (b, {channels}, h, w) or (b, {channels}, 1, h, w) (one frame), got {tuple(x.shape)}"
    )


# ----------------------------------------------------------------------------------------------- FLOPs
def flops(cfg: QwenImageVAEConfig, height: int, width: int, batch: int = 1) -> dict[str, float]:
    """Analytic FLOPs (2 x MACs) of ``encode`` and ``decode`` of one height x width image, as executed here
    (2-D convs, attention's QK^T and PV dense); norms, activations and resizing are not counted.

    The 3-D reference also multiplies the two zero-padded temporal taps of every 3x3x3 conv, so a
    FlopCounterMode count of diffusers' model is larger than this for the same work.
    """
    f = cfg.factor
    if height <= 0 or width <= 0 or height % f or width % f:
        raise ValueError(f"image size {height}x{width} must be positive multiples of {f}")
    conv = lambda ci, co, k, h, w: ci * co * k * k * h * w
    res = lambda ci, co, h, w: (
        conv(ci, co, 3, h, w) + conv(co, co, 3, h, w) + (ci != co) * conv(ci, co, 1, h, w)
    )
    mid = lambda c, h, w: (
        2 * res(c, c, h, w) + conv(c, 3 * c, 1, h, w) + 2 * (h * w) ** 2 * c + conv(c, c, 1, h, w)
    )

    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    h, w = height, width
    enc = conv(cfg.in_channels, dims[0], 3, h, w)
    for i, (ci, co) in enumerate(zip(dims[:-1], dims[1:])):
        for j in range(cfg.num_res_blocks):
            enc += res(ci if j == 0 else co, co, h, w)
        if i != len(cfg.dim_mult) - 1:
            h, w = h // 2, w // 2
            enc += conv(co, co, 3, h, w)
    enc += (
        mid(dims[-1], h, w)
        + conv(dims[-1], 2 * cfg.z_dim, 3, h, w)
        + conv(2 * cfg.z_dim, 2 * cfg.z_dim, 1, h, w)
    )

    mult = cfg.dim_mult
    dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
    h, w = height // f, width // f
    dec = conv(cfg.z_dim, cfg.z_dim, 1, h, w) + conv(cfg.z_dim, dims[0], 3, h, w) + mid(dims[0], h, w)
    for i, (ci, co) in enumerate(zip(dims[:-1], dims[1:])):
        ci = ci // 2 if i > 0 else ci
        for j in range(cfg.num_res_blocks + 1):
            dec += res(ci if j == 0 else co, co, h, w)
        if i != len(mult) - 1:
            h, w = 2 * h, 2 * w
            dec += conv(co, co // 2, 3, h, w)
    dec += conv(dims[-1], cfg.in_channels, 3, h, w)
    return {"encode": 2.0 * batch * enc, "decode": 2.0 * batch * dec}


# ----------------------------------------------------------------------------------------------- loading
def load_qwen_image_vae(
    path_or_repo: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    config: QwenImageVAEConfig | None = None,
) -> QwenImageVAE:
    """Load the VAE from (a) a diffusers ``vae/`` folder, (b) a repo root holding one, or (c) a Hugging Face
    repo id (downloads ``vae/*.json`` and ``vae/*.safetensors`` only). ``config`` overrides config.json."""
    src = locate(path_or_repo, "vae", what="Qwen-Image VAE", allow_file=False)
    if config is None:
        config = config_from_diffusers(read_config(src / "config.json"))
    model = build_on_meta(lambda: QwenImageVAE(config))
    return load_checkpoint(model, open_checkpoint(src), dtype=dtype, device=device)


def config_from_diffusers(c: dict) -> QwenImageVAEConfig:
    """``QwenImageVAEConfig`` from a diffusers ``AutoencoderKLQwenImage`` config.json (missing keys take
    diffusers' defaults, which are the released model's)."""
    if c.get("attn_scales"):
        raise ValueError(
            f"VAE config has attn_scales {c['attn_scales']}; only [] (no extra attention) is supported"
        )
    base = QWEN_IMAGE_VAE
    return QwenImageVAEConfig(
        base_dim=c.get("base_dim", base.base_dim),
        z_dim=c.get("z_dim", base.z_dim),
        dim_mult=tuple(c.get("dim_mult", base.dim_mult)),
        num_res_blocks=c.get("num_res_blocks", base.num_res_blocks),
        temporal_downsample=tuple(bool(v) for v in c.get("temperal_downsample", base.temporal_downsample)),
        in_channels=c.get("input_channels", base.in_channels),
        latents_mean=tuple(float(v) for v in c.get("latents_mean", base.latents_mean)),
        latents_std=tuple(float(v) for v in c.get("latents_std", base.latents_std)),
    )
