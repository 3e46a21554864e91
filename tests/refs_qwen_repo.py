"""A tiny but complete Qwen-Image-Edit repo folder in the official layout, and diffusers' pipelines run on it.

``write_qwen_edit_repo`` writes ``model_index.json``, ``scheduler/``, ``transformer/``, ``vae/``,
``text_encoder/`` (a tiny random Qwen2.5-VL), ``processor/`` and ``tokenizer/`` (tokenizer files built by
``refs_vl``), with every parameter randomised. ``run_diffusers_edit`` runs the real
``QwenImageEdit(Plus)Pipeline`` on those very objects end to end (prompt encoding included) at a small
working area: the pipelines hard-code about 1024^2 through their module-level ``calculate_dimensions``,
which is patched to scale every area by ``area / 1024^2`` (refs_qwen's recipe). Its text encoder is wrapped
(``MRopeTextEncoder``) so that transformers computes the real 3-D M-RoPE positions: diffusers 0.42.1 does
not pass ``mm_token_type_ids`` and would silently use 1-D ones (diffusers issue #14194).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from refs import randomize_
from refs_qwen import QWEN_SCHEDULER, tiny_qwen_kwargs, tiny_qwen_vae_kwargs
from refs_vl import MRopeTextEncoder, build_tokenizer_files, hf_processor, tiny_vl_reference

CLASS_NAMES = {False: "QwenImageEditPipeline", True: "QwenImageEditPlusPipeline"}
PREPROCESSOR = {  # Qwen2.5-VL's preprocessor_config.json values
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
}


class PipelineTextEncoder(MRopeTextEncoder):
    """``MRopeTextEncoder`` with the ``device`` a diffusers pipeline asks its components for."""

    @property
    def device(self) -> torch.device:
        return self.ref.device


def write_model_index(root: Path, plus: bool) -> None:
    index = {
        "_class_name": CLASS_NAMES[plus],
        "_diffusers_version": "0.42.1",
        "processor": ["transformers", "Qwen2VLProcessor"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=1))


def write_qwen_edit_repo(root: Path, *, plus: bool = False, seed: int = 0) -> dict:
    """Write the folder; returns the reference objects: transformer, vae, text_encoder, scheduler, ids."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    root.mkdir(parents=True, exist_ok=True)
    ids = build_tokenizer_files(root)
    (root / "processor" / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    te = tiny_vl_reference(seed=seed + 1, ids=ids)
    te.save_pretrained(root / "text_encoder")
    width = te.config.text_config.hidden_size
    tr = QwenImageTransformer2DModel(**tiny_qwen_kwargs(joint_attention_dim=width))
    tr = randomize_(tr.eval(), seed=seed + 2)
    tr.save_pretrained(root / "transformer")
    vae = randomize_(AutoencoderKLQwenImage(**tiny_qwen_vae_kwargs()).eval(), seed=seed + 3)
    vae.save_pretrained(root / "vae")
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
    scheduler.save_pretrained(root / "scheduler")
    write_model_index(root, plus)
    return {"transformer": tr, "vae": vae, "text_encoder": te, "scheduler": scheduler, "ids": ids}


def linked_variant(root: Path, dst: Path, *, plus: bool) -> Path:
    """A second repo root sharing ``root``'s folders (symlinks) with its own ``model_index.json``."""
    dst.mkdir(parents=True, exist_ok=True)
    for sub in ("scheduler", "transformer", "vae", "text_encoder", "processor", "tokenizer"):
        (dst / sub).symlink_to(root / sub, target_is_directory=True)
    write_model_index(dst, plus)
    return dst


def run_diffusers_edit(
    refs: dict,
    root: Path,
    images,
    prompt,
    negative_prompt,
    latents,
    *,
    plus,
    area,
    steps=4,
    scale=4.0,
    scheduler: dict | None = None,
    lora: Path | None = None,
) -> dict:
    """The real pipeline end to end; returns the per-step latents, the [0, 1] image, sigmas and the prompt
    embeddings (and masks) each transformer forward received, in call order. ``scheduler``: another scheduler
    config; ``lora``: a LoRA file loaded with ``load_lora_weights`` and fused for this run only."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline

    name = "pipeline_qwenimage_edit_plus" if plus else "pipeline_qwenimage_edit"
    mod = importlib.import_module(f"diffusers.pipelines.qwenimage.{name}")
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(**(scheduler or QWEN_SCHEDULER)),
        vae=refs["vae"],
        text_encoder=PipelineTextEncoder(refs["text_encoder"]),
        tokenizer=None,
        processor=hf_processor(root / "processor"),
        transformer=refs["transformer"],
    )
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora()
    calls, steps_out = [], []

    def record_inputs(_module, _args, kw):
        mask = kw.get("encoder_hidden_states_mask")
        calls.append((kw["encoder_hidden_states"].clone(), None if mask is None else mask.clone()))

    def record_step(_pipe, _i, _t, kw):
        steps_out.append(kw["latents"].clone())
        return {}

    hook = refs["transformer"].register_forward_pre_hook(record_inputs, with_kwargs=True)
    orig = mod.calculate_dimensions
    mod.calculate_dimensions = lambda a, ratio: orig(a * area / (1024 * 1024), ratio)
    try:
        image = pipe(
            image=images,
            prompt=prompt,
            negative_prompt=negative_prompt,
            true_cfg_scale=scale,
            num_inference_steps=steps,
            latents=latents,
            callback_on_step_end=record_step,
            output_type="pt",
        ).images
    finally:
        mod.calculate_dimensions = orig
        hook.remove()
        if lora is not None:
            pipe.unfuse_lora()
            pipe.unload_lora_weights()
    return {
        "steps": torch.stack(steps_out),
        "image": image,
        "sigmas": pipe.scheduler.sigmas.clone(),
        "calls": calls,
    }
