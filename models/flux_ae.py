"""FLUX autoencoder, module tree = BFL ``ae.safetensors`` keys (``encoder.down.N.block.M``, ``decoder.up.N``).

A KL autoencoder with 16 latent channels and an 8x spatial factor; one single-head attention in each mid
block, no quant convs. ``encode`` returns the normalised mean latent ``(z - shift) * scale``; ``decode`` maps
it back to an image in about [-1, 1] (not clamped, like the references). ``decoder_features`` exposes the
decoder's intermediate maps for SpecEdit's verifier (decoder.conv_in, the mid block, each up stage).

BFL ``decoder.up`` is indexed by resolution (``up.0`` is the highest); diffusers ``decoder.up_blocks`` by
execution order, so ``up_blocks.k`` = ``up.{n-1-k}``. Feature taps are named in execution order ("up0" is
the first up stage to run, i.e. diffusers ``up_blocks.0``).

Reference: github.com/black-forest-labs/flux ``modules/autoencoder.py``; diffusers ``AutoencoderKL``.

Shape legend: b batch, c channels, H W image pixels, h w latent pixels (H/8, W/8).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.loading import (
    Checkpoint,
    Derived,
    Remap,
    build_on_meta,
    load_checkpoint,
    locate,
    open_checkpoint,
    read_config,
)


@dataclass(frozen=True)
class FluxAEConfig:
    in_channels: int
    out_ch: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    norm_groups: int
    scale_factor: float
    shift_factor: float

    def __post_init__(self):
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_groups]
        if bad:
            raise ValueError(f"channel widths {bad} are not divisible by norm_groups {self.norm_groups}")

    @property
    def factor(self) -> int:
        """Pixels per latent pixel along each side."""
        return 2 ** (len(self.ch_mult) - 1)


FLUX_AE = FluxAEConfig(
    in_channels=3,
    out_ch=3,
    ch=128,
    ch_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    z_channels=16,
    norm_groups=32,
    scale_factor=0.3611,
    shift_factor=0.1159,
)
FLUX_AE_TINY = replace(FLUX_AE, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=4, norm_groups=8)
PRESETS = {"flux-ae": FLUX_AE, "flux-ae-tiny": FLUX_AE_TINY}


# ----------------------------------------------------------------------------------------------- blocks
def _norm(groups: int, c: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = _norm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w pixels, 1x1-conv projections."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(groups, c)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        n = self.norm(x)
        # contiguous channels: otherwise SDPA falls back to the math kernel and builds the (hw)^2 matrix
        q, k, v = (rearrange(m(n), "b c h w -> b 1 (h w) c").contiguous() for m in (self.q, self.k, self.v))
        a = rearrange(F.scaled_dot_product_attention(q, k, v), "b 1 (h w) c -> b c h w", h=h, w=w)
        return x + self.proj_out(a)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as in the checkpoints' training code


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, groups)
        self.attn_1 = AttnBlock(c, groups)
        self.block_2 = ResnetBlock(c, c, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ``block`` resnets, an empty ``attn`` list (kept for key parity), a resampler."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()
        if resample is not None:
            setattr(self, name, resample)
        self._resample = name if resample is not None else None

    def forward(self, x: Tensor) -> Tensor:
        for b in self.block:
            x = b(x)
        return getattr(self, self._resample)(x) if self._resample else x


class Encoder(nn.Module):
    def __init__(self, cfg: FluxAEConfig):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = cfg.ch
        for i, c in enumerate(widths):
            blocks = [ResnetBlock(c_in if j == 0 else c, c, g) for j in range(cfg.num_res_blocks)]
            last = i == len(widths) - 1
            self.down.append(Level(blocks, None if last else Downsample(c), "downsample"))
            c_in = c
        self.mid = Mid(c_in, g)
        self.norm_out = _norm(g, c_in)
        self.conv_out = nn.Conv2d(c_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: FluxAEConfig):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1], g)
        levels = []
        c_in = widths[-1]
        for i in reversed(range(len(widths))):
            c = widths[i]
            blocks = [ResnetBlock(c_in if j == 0 else c, c, g) for j in range(cfg.num_res_blocks + 1)]
            levels.insert(0, Level(blocks, Upsample(c) if i != 0 else None, "upsample"))
            c_in = c
        self.up = nn.ModuleList(levels)  # up[0] = highest resolution, runs last
        self.norm_out = _norm(g, c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.out_ch, 3, padding=1)

    def stages(self, z: Tensor):
        """Yield (name, feature) after conv_in, the mid block and every up stage, in execution order."""
        x = self.conv_in(z)
        yield "conv_in", x
        x = self.mid(x)
        yield "mid", x
        for k, level in enumerate(reversed(self.up)):
            x = level(x)
            yield f"up{k}", x

    def forward(self, z: Tensor) -> Tensor:
        *_, (_, x) = self.stages(z)
        return self.conv_out(F.silu(self.norm_out(x)))


class AutoEncoder(nn.Module):
    def __init__(self, cfg: FluxAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def latent_channels(self) -> int:
        return self.config.z_channels

    def encode(
        self, image: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """(b, 3, H, W) image in [-1, 1] -> (b, z, H/8, W/8) normalised latent (posterior mean by default)."""
        f = self.config.factor
        if image.ndim != 4 or image.shape[1] != self.config.in_channels:
            raise ValueError(f"encode expects (b, {self.config.in_channels}, H, W), got {tuple(image.shape)}")
        if image.shape[-2] % f or image.shape[-1] % f:
            raise ValueError(f"image size {tuple(image.shape[-2:])} must be a multiple of {f}")
        mean, logvar = self.encoder(image).chunk(2, dim=1)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        return (z - self.config.shift_factor) * self.config.scale_factor

    def decode(self, latent: Tensor) -> Tensor:
        """(b, z, h, w) normalised latent -> (b, 3, 8h, 8w) image, about [-1, 1], not clamped."""
        return self.decoder(self._denorm(latent))

    def decoder_features(
        self, latent: Tensor, taps: tuple[str, ...] = ("conv_in", "mid", "up0")
    ) -> dict[str, Tensor]:
        """Decoder maps named in ``taps`` ("conv_in", "mid", "up0", "up1", ...); stops at the last one."""
        names = ["conv_in", "mid", *(f"up{k}" for k in range(len(self.decoder.up)))]
        unknown = [t for t in taps if t not in names]
        if unknown:
            raise ValueError(f"unknown decoder taps {unknown}; choose from {names}")
        out, want = {}, set(taps)
        for name, x in self.decoder.stages(self._denorm(latent)):
            if name in want:
                out[name] = x
                if len(out) == len(want):
                    break
        return out

    def _denorm(self, latent: Tensor) -> Tensor:
        if latent.ndim != 4 or latent.shape[1] != self.config.z_channels:
            raise ValueError(f"latent must be (b, {self.config.z_channels}, h, w), got {tuple(latent.shape)}")
        return latent / self.config.scale_factor + self.config.shift_factor


# ----------------------------------------------------------------------------------------------- loading
def load_flux_ae(
    path_or_repo: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    config: FluxAEConfig | None = None,
) -> AutoEncoder:
    """Load the FLUX AE from (a) BFL ``ae.safetensors``, (b) a diffusers ``vae/`` folder, (c) a repo root
    holding either, or (d) a Hugging Face repo id (downloads ``vae/`` only).

    BFL files carry no config: widths are read from tensor shapes, norm groups default to 32 and the
    scale/shift to the official 0.3611/0.1159; pass ``config`` to override.
    """
    src = locate(path_or_repo, "vae", what="FLUX autoencoder", single_files=("ae.safetensors",))
    if src.is_file():
        ckpt = open_checkpoint(src)
        cfg = config or config_from_bfl(ckpt)
    else:
        cfg = config or config_from_diffusers(read_config(src / "config.json"))
        ckpt = diffusers_to_bfl(open_checkpoint(src), cfg)
    return load_checkpoint(build_on_meta(lambda: AutoEncoder(cfg)), ckpt, dtype=dtype, device=device)


def config_from_diffusers(c: dict) -> FluxAEConfig:
    """``FluxAEConfig`` from a diffusers ``AutoencoderKL`` config.json (FLUX style: no quant convs)."""
    if c.get("use_quant_conv", True) or c.get("use_post_quant_conv", True):
        raise ValueError("this AutoencoderKL has quant convs; the FLUX AE has none (use_quant_conv=false)")
    if not c.get("mid_block_add_attention", True):
        raise ValueError("the FLUX AE has mid-block attention; this config disables it")
    widths = list(c["block_out_channels"])
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first width")
    return FluxAEConfig(
        in_channels=c.get("in_channels", 3),
        out_ch=c.get("out_channels", 3),
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=c["layers_per_block"],
        z_channels=c["latent_channels"],
        norm_groups=c.get("norm_num_groups", 32),
        scale_factor=float(c.get("scaling_factor", 1.0)),
        shift_factor=float(c.get("shift_factor") or 0.0),
    )


def config_from_bfl(ckpt: Checkpoint) -> FluxAEConfig:
    """``FluxAEConfig`` read off the tensor shapes of a BFL AE state dict."""
    shapes = ckpt.shapes()
    try:
        ch, cin = shapes["encoder.conv_in.weight"][:2]
        z = shapes["decoder.conv_in.weight"][1]
        out = shapes["decoder.conv_out.weight"][0]
    except KeyError as e:
        raise ValueError(f"{ckpt.source} is not a BFL FLUX autoencoder (no {e.args[0]!r})") from None
    levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in levels)
    n_res = len({m.group(1) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    return replace(
        FLUX_AE, in_channels=cin, out_ch=out, ch=ch, ch_mult=mult, num_res_blocks=n_res, z_channels=z
    )


def diffusers_to_bfl(ckpt: Checkpoint, cfg: FluxAEConfig) -> Remap:
    """View a diffusers ``AutoencoderKL`` state dict in BFL key layout (lazy)."""
    n = len(cfg.ch_mult)
    conv = lambda w: w[..., None, None]  # diffusers attention projections are Linear, BFL's are 1x1 convs
    renames = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    ]
    plan: dict[str, str | Derived] = {}
    shapes = ckpt.shapes()
    for key in ckpt:
        new = key
        for pat, rep in renames:
            new = re.sub(pat, rep, new)
        if m := re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)$", new):
            kind = "block" if m.group(2) == "resnets" else "upsample"
            new = f"decoder.up.{n - 1 - int(m.group(1))}.{kind}.{m.group(3)}"
        if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", new) and len(shapes[key]) == 2:
            plan[new] = Derived((key,), conv)
        else:
            plan[new] = key
    return Remap(ckpt, plan)
