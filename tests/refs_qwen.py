"""Test-side helpers for the Qwen-Image family: tiny diffusers configs, image preprocessing, and a driver that
runs the real diffusers edit pipelines on precomputed prompt embeddings (the module-level
``calculate_dimensions`` is patched to a small working area)."""

from __future__ import annotations

import importlib

import numpy as np
import torch
from PIL import Image

QWEN_SCHEDULER = dict(  # Qwen-Image(-Edit) scheduler_config.json
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    time_shift_type="exponential",
    use_dynamic_shifting=True,
)
AREA = 128 * 128  # working area of the patched pipelines (the real ones use 1024^2)


def tiny_qwen_kwargs(**over) -> dict:
    """diffusers QwenImageTransformer2DModel kwargs of a tiny config (every code path kept)."""
    kw = dict(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
        zero_cond_t=False,
    )
    kw.update(over)
    return kw


def tiny_qwen_vae_kwargs(**over) -> dict:
    """diffusers AutoencoderKLQwenImage kwargs of a tiny config (both resampler kinds, x4 spatial)."""
    kw = dict(
        base_dim=16,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True],
        dropout=0.0,
        latents_mean=[0.31, -0.52, 0.12, -0.94],
        latents_std=[1.41, 1.13, 1.87, 1.62],
    )
    kw.update(over)
    return kw


def random_pil(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def calculate_dimensions(area: float, ratio: float) -> tuple[int, int]:
    """(width, height) with about ``area`` pixels at aspect ``ratio``, each rounded to a multiple of 32."""
    width = (area * ratio) ** 0.5
    return round(width / 32) * 32, round(width / ratio / 32) * 32


def to_tensor(img: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL -> (1, 3, height, width) in [-1, 1] after a LANCZOS resize (as diffusers' VaeImageProcessor)."""
    arr = np.asarray(img.resize((width, height), resample=Image.LANCZOS)).astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(arr).permute(2, 0, 1)[None] - 1.0


def run_edit_pipeline(transformer, vae, images, prompt_embeds, negative_embeds, latents, *, plus, steps=4):
    """Run QwenImageEdit(Plus)Pipeline at the small working area; returns per-step latents, image, sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline

    name = "pipeline_qwenimage_edit_plus" if plus else "pipeline_qwenimage_edit"
    mod = importlib.import_module(f"diffusers.pipelines.qwenimage.{name}")
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        processor=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    orig = mod.calculate_dimensions
    mod.calculate_dimensions = lambda area, ratio: orig(area * AREA / (1024 * 1024), ratio)
    steps_out = []

    def record(_pipe, _i, _t, kw):
        steps_out.append(kw["latents"].clone())
        return {}

    try:
        image = pipe(
            image=images,
            prompt_embeds=prompt_embeds,
            prompt_embeds_mask=torch.ones(prompt_embeds.shape[:2], dtype=torch.long),
            negative_prompt_embeds=negative_embeds,
            negative_prompt_embeds_mask=torch.ones(negative_embeds.shape[:2], dtype=torch.long),
            true_cfg_scale=4.0,
            num_inference_steps=steps,
            latents=latents,
            callback_on_step_end=record,
            output_type="pt",
        ).images
    finally:
        mod.calculate_dimensions = orig
    return {"steps": torch.stack(steps_out), "image": image, "sigmas": pipe.scheduler.sigmas.clone()}
