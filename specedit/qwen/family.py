"""The Qwen-Image-Edit family record: fits, cost model, benchmark sizes, tiny and random-weight editors.

``FITTED``: NT-DM fits (``samplers.ntdm.fit_ntdm(steps, ends, h_ori, z_bounds=(1, 100))``) of the stage shifts
and rewind Z for each SpecEdit split, against Qwen-Image-Edit's full-resolution shift at 1024^2
(h_ori = e^0.6935 = 2.001, 4096 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models import qwen_image, qwen_image_vae
from models.init import random_module, randomized_module
from samplers.schedules import LIGHTNING_SCHEDULE, QWEN_SCHEDULE
from specedit.families import Distilled, Family, ModelEntry
from specedit.qwen.editor import QwenCosts, QwenEditor
from specedit.qwen.flops import flops_report
from specedit.qwen.pipeline import QwenEditPipeline

FITTED = {
    30: ((9.418, 1.957, 1.105), 5.144),
    18: ((3.426, 1.315, 1.276), 2.561),
    11: ((2.981, 0.904, 1.369), 2.352),
    9: ((3.653, 1.689, 1.710), 3.080),
}
TEXT_TOKENS = 1400  # DiT text tokens per branch at 1024^2: the prompt plus the 1369 Qwen2.5-VL image tokens


@dataclass(frozen=True)
class QwenSize:
    """A model size to benchmark: transformer and VAE configs and the text length of each CFG branch."""

    model: qwen_image.QwenImageConfig
    vae: qwen_image_vae.QwenImageVAEConfig
    text_tokens: int


SIZES = {
    "full": QwenSize(qwen_image.QWEN_IMAGE_EDIT, qwen_image_vae.QWEN_IMAGE_VAE, TEXT_TOKENS),
    "tiny": QwenSize(qwen_image.QWEN_IMAGE_TINY, qwen_image_vae.QWEN_IMAGE_VAE_TINY, 8),
}


def costs(
    grid: tuple[int, int], *, text_tokens: int | None = None, ref_grid=None, cfg: bool = True
) -> QwenCosts:
    """Full-size Qwen-Image-Edit costs at a fine token grid: true CFG with ``text_tokens`` (default 1400) per
    branch (``cfg`` False: the conditional branch only, as Lightning runs), one reference of grid ``ref_grid``
    (default: the target's)."""
    n = text_tokens or TEXT_TOKENS
    size = SIZES["full"]
    return QwenCosts(size.model, size.vae, n, n if cfg else None, grid, (tuple(ref_grid or grid),))


def random_editor(config: str, height: int, width: int, *, device="cpu", dtype=torch.float32,
                  seed: int = 0, cfg: bool = True) -> QwenEditor:  # fmt: skip
    """A Qwen-Image-Edit editor with random weights at size ``config``: random prompt states for both CFG
    branches (batched CFG; ``cfg`` False: no negative prompt, one branch), one reference (the source), for
    latency benchmarks."""
    size = SIZES[config]
    model = random_module(lambda: qwen_image.QwenImage(size.model), device=device, dtype=dtype, seed=seed)
    vae = random_module(
        lambda: qwen_image_vae.QwenImageVAE(size.vae), device=device, dtype=dtype, seed=seed + 1
    )
    g = torch.Generator().manual_seed(seed + 2)
    rand = lambda *shape: torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    f, c = size.vae.factor, size.model.joint_attention_dim
    source = rand(1, size.vae.z_dim, height // f, width // f)
    neg = rand(1, size.text_tokens, c)
    return QwenEditor(model, vae, rand(1, size.text_tokens, c), source, neg_txt=neg if cfg else None)


def tiny_editor(batch: int = 1, seed: int = 0, grid: tuple[int, int] = (8, 12)) -> QwenEditor:
    """A tiny random Qwen-Image-Edit-2509 editor: non-square source, one extra reference of another size,
    prompts of 7 and 5 tokens (the batched CFG forward pads and masks the negative one)."""
    model = randomized_module(lambda: qwen_image.QwenImage(qwen_image.QWEN_IMAGE_TINY), seed=seed + 1)
    vae = randomized_module(
        lambda: qwen_image_vae.QwenImageVAE(qwen_image_vae.QWEN_IMAGE_VAE_TINY), seed=seed + 2
    )
    g = torch.Generator().manual_seed(seed)
    one = lambda *shape: torch.randn(1, *shape, generator=g).expand(batch, *shape).clone()
    z, c = vae.latent_channels, qwen_image.QWEN_IMAGE_TINY.joint_attention_dim
    source = one(z, 2 * grid[0], 2 * grid[1])
    return QwenEditor(model, vae, one(7, c), source, neg_txt=one(5, c), refs=(one(z, 14, 8),))


# Qwen-Image(-Edit, -2509, -2511) Lightning LoRAs (lightx2v/Qwen-Image-Lightning): 8- and 4-step students,
# distilled on a fixed shift of 3 with CFG off (true_cfg_scale 1); file names such as
# "Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors" name the step count.
LIGHTNING = Distilled(
    steps={8: 8, 4: 4},
    schedule=LIGHTNING_SCHEDULE,
    cfg_scale=1.0,
    pattern=r"(?i)lightning.*?(\d+)-?steps",
    source="lightx2v/Qwen-Image-Lightning",
)

FAMILY = Family(
    name="qwen",
    models={
        "qwen-image-edit": ModelEntry("Qwen/Qwen-Image-Edit", {"variant": "edit"}),
        "qwen-image-edit-2509": ModelEntry("Qwen/Qwen-Image-Edit-2509", {"variant": "edit-plus"}),
        "qwen-image-edit-2511": ModelEntry("Qwen/Qwen-Image-Edit-2511", {"variant": "edit-plus"}),
    },
    schedule=QWEN_SCHEDULE,
    patch=2,
    vae_factor=8,
    fit_tokens=4096,
    fitted=FITTED,
    costs=costs,
    tiny_editor=tiny_editor,
    random_editor=random_editor,
    bench_configs=tuple(SIZES),
    flops_report=flops_report,
    pipeline=QwenEditPipeline,
    distilled=LIGHTNING,
)
