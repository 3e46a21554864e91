"""Test-side helpers: randomised reference models and an independent BFL -> diffusers key mapping.

The mapping here is written from the spec table (the published FLUX key names of BFL and diffusers) and is deliberately
separate from the library's diffusers -> BFL converter, so a BFL-file parity test does not reuse the code
it checks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def randomize_(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Redraw every parameter: all-ones tensors (norm scales) become 1 + N(0, std), the rest N(0, std)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            base = 1.0 if p.numel() > 0 and bool(torch.all(p == 1)) else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    return model


def max_rel_err(ours: Tensor, ref: Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def flux_bfl_to_diffusers(
    sd: dict[str, Tensor], n_double: int, n_single: int, hidden: int
) -> dict[str, Tensor]:
    """BFL FLUX transformer state dict -> diffusers FluxTransformer2DModel state dict (spec table 1.3)."""
    out: dict[str, Tensor] = {}

    def lin(dst, src, bias=True):
        out[f"{dst}.weight"] = sd[f"{src}.weight"]
        if bias and f"{src}.bias" in sd:
            out[f"{dst}.bias"] = sd[f"{src}.bias"]

    lin("x_embedder", "img_in")
    lin("context_embedder", "txt_in")
    for theirs, ours in (
        ("timestep_embedder", "time_in"),
        ("guidance_embedder", "guidance_in"),
        ("text_embedder", "vector_in"),
    ):
        if f"{ours}.in_layer.weight" in sd:
            lin(f"time_text_embed.{theirs}.linear_1", f"{ours}.in_layer")
            lin(f"time_text_embed.{theirs}.linear_2", f"{ours}.out_layer")
    for i in range(n_double):
        b, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        lin(f"{t}.norm1.linear", f"{b}.img_mod.lin")
        lin(f"{t}.norm1_context.linear", f"{b}.txt_mod.lin")
        for stream, names in (
            ("img", ("to_q", "to_k", "to_v")),
            ("txt", ("add_q_proj", "add_k_proj", "add_v_proj")),
        ):
            for part in ("weight", "bias"):
                for name, chunk in zip(names, sd[f"{b}.{stream}_attn.qkv.{part}"].chunk(3, 0)):
                    out[f"{t}.attn.{name}.{part}"] = chunk
        out[f"{t}.attn.norm_q.weight"] = sd[f"{b}.img_attn.norm.query_norm.scale"]
        out[f"{t}.attn.norm_k.weight"] = sd[f"{b}.img_attn.norm.key_norm.scale"]
        out[f"{t}.attn.norm_added_q.weight"] = sd[f"{b}.txt_attn.norm.query_norm.scale"]
        out[f"{t}.attn.norm_added_k.weight"] = sd[f"{b}.txt_attn.norm.key_norm.scale"]
        lin(f"{t}.attn.to_out.0", f"{b}.img_attn.proj")
        lin(f"{t}.attn.to_add_out", f"{b}.txt_attn.proj")
        lin(f"{t}.ff.net.0.proj", f"{b}.img_mlp.0")
        lin(f"{t}.ff.net.2", f"{b}.img_mlp.2")
        lin(f"{t}.ff_context.net.0.proj", f"{b}.txt_mlp.0")
        lin(f"{t}.ff_context.net.2", f"{b}.txt_mlp.2")
    for i in range(n_single):
        b, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for part in ("weight", "bias"):
            w = sd[f"{b}.linear1.{part}"]
            q, k, v, mlp = w.split([hidden, hidden, hidden, w.shape[0] - 3 * hidden], 0)
            out[f"{t}.attn.to_q.{part}"], out[f"{t}.attn.to_k.{part}"] = q, k
            out[f"{t}.attn.to_v.{part}"], out[f"{t}.proj_mlp.{part}"] = v, mlp
        lin(f"{t}.proj_out", f"{b}.linear2")
        out[f"{t}.attn.norm_q.weight"] = sd[f"{b}.norm.query_norm.scale"]
        out[f"{t}.attn.norm_k.weight"] = sd[f"{b}.norm.key_norm.scale"]
        lin(f"{t}.norm.linear", f"{b}.modulation.lin")
    lin("proj_out", "final_layer.linear")
    for part in ("weight", "bias"):
        shift, scale = sd[f"final_layer.adaLN_modulation.1.{part}"].chunk(2, 0)
        out[f"norm_out.linear.{part}"] = torch.cat([scale, shift], 0)  # diffusers chunks (scale, shift)
    return out


def tiny_flux_kwargs(**over) -> dict:
    """diffusers FluxTransformer2DModel kwargs of a tiny random config that keeps every Kontext flag."""
    kw = dict(
        patch_size=1,
        in_channels=16,
        out_channels=None,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=20,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    kw.update(over)
    return kw


def tiny_ae_kwargs(**over) -> dict:
    """diffusers AutoencoderKL kwargs shaped like the FLUX AE, tiny."""
    kw = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )
    kw.update(over)
    return kw


# Qwen-Image-Lightning's published scheduler config (its README), as a diffusers config file holds it
LIGHTNING_CONFIG = {
    "base_image_seq_len": 256, "base_shift": math.log(3), "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": math.log(3), "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": None,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}  # fmt: skip
