"""Test-side helper: a tiny, complete FLUX.1-Kontext-dev repo folder in the official diffusers layout.

``write_tiny_kontext_repo(root)`` writes what ``black-forest-labs/FLUX.1-Kontext-dev`` ships, each
component tiny and with every parameter randomised:

    model_index.json, scheduler/scheduler_config.json (FLUX.1-dev's), transformer/ (FluxTransformer2DModel),
    vae/ (AutoencoderKL, FLUX style: no quant convs, official scale/shift), text_encoder/ (CLIPTextModel),
    text_encoder_2/ (T5EncoderModel), tokenizer/ (CLIP vocab.json + merges.txt), tokenizer_2/ (T5
    spiece.model + tokenizer.json)

Sizes are chosen so the BFL single files written by ``write_bfl_single_files`` load without a config: the
transformer keeps the official head dim 128 and RoPE axes (16, 56, 56), the AE the official 32 norm groups
and 0.3611 / 0.1159 scale / shift. The T5 width equals the transformer's ``joint_attention_dim`` and the CLIP
width its ``pooled_projection_dim``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from refs import randomize_, tiny_ae_kwargs
from refs_text import clip_tokenizer_files, t5_tokenizer_files, tiny_clip_kwargs, tiny_t5_kwargs
from safetensors.torch import save_file

TEXT_DIM = 32  # T5 d_model = joint_attention_dim
POOLED_DIM = 32  # CLIP hidden = pooled_projection_dim
LATENT_CHANNELS = 4  # the tiny AE: 3 levels, so 4x down-sampling (the real one: 16 channels, 8x)

# FLUX.1-dev's scheduler/scheduler_config.json, which Kontext-dev shares
SCHEDULER_CONFIG = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
)
MODEL_INDEX = {
    "_class_name": "FluxKontextPipeline",
    "_diffusers_version": "0.35.0.dev0",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def tiny_kontext_transformer_kwargs(**over) -> dict:
    """diffusers FluxTransformer2DModel kwargs: tiny, but with the official head dim and RoPE axes."""
    kw = dict(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        out_channels=None,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=128,
        num_attention_heads=1,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    kw.update(over)
    return kw


def write_tiny_kontext_repo(root: Path, *, seed: int = 0) -> Path:
    """Write the tiny repo folder at ``root`` (created) and return it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from models.tokenization import load_clip_tokenizer, load_t5_tokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    t5_tokenizer_files(root / "tokenizer_2", layout="both")
    clip_tokenizer_files(root / "tokenizer")
    t5_vocab = load_t5_tokenizer(root).vocab_size
    clip_vocab = load_clip_tokenizer(root).vocab_size

    torch.manual_seed(seed)  # the constructors' own init, overwritten by randomize_ anyway
    transformer = FluxTransformer2DModel(**tiny_kontext_transformer_kwargs())
    vae = AutoencoderKL(**tiny_ae_kwargs(latent_channels=LATENT_CHANNELS, norm_num_groups=32))
    t5 = T5EncoderModel(T5Config(**tiny_t5_kwargs(vocab_size=t5_vocab, d_model=TEXT_DIM)))
    clip = CLIPTextModel(CLIPTextConfig(**tiny_clip_kwargs(vocab_size=clip_vocab, hidden_size=POOLED_DIM)))
    for i, (name, module) in enumerate(
        [("transformer", transformer), ("vae", vae), ("text_encoder_2", t5), ("text_encoder", clip)]
    ):
        randomize_(module.eval(), std=0.1 if name == "text_encoder_2" else 0.05, seed=seed * 10 + i)
        module.save_pretrained(root / name)
    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return root


def write_bfl_single_files(repo: Path, root: Path) -> Path:
    """Write ``flux1-kontext-dev.safetensors`` and ``ae.safetensors`` (BFL layout, converted by our loaders
    from ``repo``'s diffusers folders) into ``root``, plus ``repo``'s text encoders and tokenizers as folders."""
    import shutil

    from models.flux import load_flux
    from models.flux_ae import load_flux_ae

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, model in (
        ("flux1-kontext-dev.safetensors", load_flux(repo / "transformer")),
        ("ae.safetensors", load_flux_ae(repo / "vae")),
    ):
        save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, root / name)
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(repo / sub, root / sub)
    return root
