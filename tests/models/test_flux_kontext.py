"""Per-step parity of our Kontext sampling (AE encode, packing, ids, schedule, Euler loop, decode)
against diffusers' FluxKontextPipeline, given the same prompt embeddings and initial noise."""

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxTransformer2DModel,
)
from PIL import Image
from refs import max_rel_err, randomize_, tiny_ae_kwargs, tiny_flux_kwargs

from models.flux import load_flux
from models.flux_ae import load_flux_ae
from models.flux_kontext import KontextCond, kontext_denoiser, preferred_resolution
from models.imageio import pil_to_tensor
from models.packing import grid_ids, pack, unpack
from samplers import FLUX_SCHEDULE, flow_sigmas, sample

TOL = 1e-5


@pytest.mark.parametrize("ref_hw,target_hw,steps", [((48, 64), (64, 64), 4), ((40, 56), (48, 80), 3)])
@torch.no_grad()
def test_per_step_parity_with_diffusers(tmp_path, ref_hw, target_hw, steps):
    tr = randomize_(FluxTransformer2DModel(**tiny_flux_kwargs()).eval(), seed=21)
    vae = randomize_(AutoencoderKL(**tiny_ae_kwargs()).eval(), seed=22)
    tr.save_pretrained(tmp_path / "transformer")
    vae.save_pretrained(tmp_path / "vae")
    sched = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
    )  # FLUX.1-Kontext-dev scheduler_config
    pipe = FluxKontextPipeline(
        scheduler=sched,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=tr,
    )
    g = torch.Generator().manual_seed(23)
    rng = np.random.default_rng(24)
    image = Image.fromarray(rng.integers(0, 256, (*ref_hw, 3), dtype=np.uint8))
    txt, pooled = torch.randn(1, 7, 24, generator=g), torch.randn(1, 20, generator=g)
    th, tw = target_hw
    grid = (th // 8, tw // 8)  # tiny VAE: /4, then 2x2 packing
    x_init = torch.randn(1, grid[0] * grid[1], 16, generator=g)
    ref_steps = []
    out = pipe(
        image=image,
        prompt_embeds=txt,
        pooled_prompt_embeds=pooled,
        height=th,
        width=tw,
        max_area=th * tw,
        _auto_resize=False,
        num_inference_steps=steps,
        guidance_scale=2.5,
        latents=x_init.clone(),
        output_type="pt",
        callback_on_step_end=lambda p, i, t, kw: ref_steps.append(kw["latents"].clone()) or {},
    ).images

    model, ae = load_flux(tmp_path / "transformer"), load_flux_ae(tmp_path / "vae")
    ref_latent = ae.encode(pil_to_tensor(image))
    ref_grid = (ref_latent.shape[-2] // 2, ref_latent.shape[-1] // 2)
    cond = KontextCond(
        txt=txt, y=pooled, ref=pack(ref_latent), ref_ids=grid_ids(ref_grid, axis0=1.0), guidance=2.5
    )
    ours_steps = []
    x = sample(
        kontext_denoiser(model, cond, grid_ids(grid)),
        x_init,
        flow_sigmas(steps, x_init.shape[1], FLUX_SCHEDULE),
        callback=lambda s: ours_steps.append(s["x"]),
    )
    assert len(ours_steps) == len(ref_steps) == steps
    for i, (a, b) in enumerate(zip(ours_steps, ref_steps)):
        assert max_rel_err(a, b) <= TOL, f"step {i}"
    ours_image = ((ae.decode(unpack(x, grid)) + 1) / 2).clamp(0, 1)
    assert max_rel_err(ours_image, out) <= TOL


def test_preferred_resolution():
    assert preferred_resolution(1024, 1024) == (1024, 1024)
    assert preferred_resolution(1920, 1080) == (1392, 752)
    assert preferred_resolution(600, 1400) == (672, 1568)
    with pytest.raises(ValueError, match="positive"):
        preferred_resolution(0, 10)
