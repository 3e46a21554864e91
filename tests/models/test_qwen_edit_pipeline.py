"""Qwen-Image-Edit (and Edit-2509 "Plus") end to end against the diffusers pipelines, per step.

Tiny random models, precomputed prompt embeddings (positive and negative of different lengths), 4 steps,
true CFG 4.0. Our side: our VAE encodes the references, ``pack``, ``official_ids``, ``flow_sigmas`` with the
target token count, ``samplers.flow.sample`` with a true-CFG denoiser, our VAE decodes.
"""

from functools import partial

import pytest
import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from refs import max_rel_err, randomize_
from refs_qwen import (
    AREA,
    calculate_dimensions,
    random_pil,
    run_edit_pipeline,
    tiny_qwen_kwargs,
    tiny_qwen_vae_kwargs,
    to_tensor,
)

from models.packing import pack, unpack
from models.qwen_image import load_qwen_image, official_ids, target_velocity
from models.qwen_image_vae import load_qwen_image_vae
from samplers.flow import sample
from samplers.guidance import Prompt, guided_denoiser
from samplers.schedules import QWEN_SCHEDULE, flow_sigmas

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Random tiny transformer + VAE saved as a hub-like repo root, and the diffusers objects themselves."""
    root = tmp_path_factory.mktemp("qwen-edit")
    tr = randomize_(QwenImageTransformer2DModel(**tiny_qwen_kwargs()).eval(), seed=21)
    vae = randomize_(AutoencoderKLQwenImage(**tiny_qwen_vae_kwargs()).eval(), seed=22)
    tr.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    return root, tr, vae


def _our_edit(root, images, pe, ne, latents, *, target, batched, steps=4):
    """Our pipeline: references at their working sizes, the target at ``target`` = (width, height) px."""
    model, vae = load_qwen_image(root), load_qwen_image_vae(root)
    f = 2 * vae.config.factor  # pixels per packed token
    refs, shapes = [], [(1, target[1] // f, target[0] // f)]
    for img in images:
        w, h = calculate_dimensions(AREA, img.size[0] / img.size[1])
        refs.append(pack(vae.encode(to_tensor(img, w, h))))
        shapes.append((1, h // f, w // f))
    img_ids, pos_ids = official_ids(shapes, pe.shape[1])
    _, neg_ids = official_ids(shapes, ne.shape[1])
    branch = partial(target_velocity, model, refs=torch.cat(refs, 1), img_ids=img_ids)
    denoiser = guided_denoiser(branch, Prompt(pe, pos_ids), Prompt(ne, neg_ids), 4.0, batched=batched)
    sigmas = flow_sigmas(steps, latents.shape[1], QWEN_SCHEDULE)
    per_step = []
    x = sample(denoiser, latents, sigmas, callback=lambda s: per_step.append(s["x"]))
    image = vae.decode(unpack(x, shapes[0][1:]))
    return {"steps": torch.stack(per_step), "image": (image * 0.5 + 0.5).clamp(0, 1), "sigmas": sigmas}


@pytest.mark.parametrize(
    "plus,sizes", [(False, [(96, 160)]), (True, [(96, 160), (128, 128)])], ids=["edit", "edit-plus"]
)
@torch.no_grad()
def test_edit_pipeline_parity_per_step(tiny, plus, sizes):
    root, tr, vae = tiny
    g = torch.Generator().manual_seed(9)
    images = [random_pil(h, w, seed=10 + i) for i, (h, w) in enumerate(sizes)]
    pe = torch.randn(1, 9, 24, generator=g)
    ne = torch.randn(1, 5, 24, generator=g)  # the negative prompt has another length
    # the target follows the (last) input image's aspect at the working area
    target = calculate_dimensions(AREA, images[-1].size[0] / images[-1].size[1])
    n_tok = (target[0] // 8) * (target[1] // 8)  # tiny VAE /4, then 2x2 packing
    latents = torch.randn(1, n_tok, 16, generator=g)

    ref = run_edit_pipeline(tr, vae, images if plus else images[0], pe, ne, latents, plus=plus)
    ours = _our_edit(root, images, pe, ne, latents, target=target, batched=False)
    assert torch.equal(ours["sigmas"], ref["sigmas"])
    for i, (a, b) in enumerate(zip(ours["steps"], ref["steps"], strict=True)):
        assert max_rel_err(a, b) <= TOL, f"step {i}"
    assert max_rel_err(ours["image"], ref["image"]) <= TOL

    # both branches in one batched forward (prompts padded to one length): the same trajectory
    batched = _our_edit(root, images, pe, ne, latents, target=target, batched=True)
    assert max_rel_err(batched["steps"][-1], ref["steps"][-1]) <= TOL
    assert max_rel_err(batched["image"], ref["image"]) <= TOL
