"""Qwen-Image-Edit, Edit-2509 and Edit-2511 end to end: images + instruction -> edited image, baseline or SpecEdit.

Mirrors diffusers' ``QwenImageEditPipeline`` (variant "edit") / ``QwenImageEditPlusPipeline`` ("edit-plus":
Edit-2509 and Edit-2511, whose repos name that class in ``model_index.json``; 2511's transformer config sets
``zero_cond_t``, which ``models.qwen_image`` applies, so the pipeline steps are 2509's) with our models.
``edit`` is :class:`specedit.pipeline.EditPipeline`'s (batches, seeds, outputs):

1. Sizes. Every input image gets a VAE working size of about ``area`` pixels at its aspect ratio
   (``calculate_dimensions``: w = sqrt(area * r), h = w / r, each rounded to a multiple of 32). The output
   takes the *last* image's working size (Edit has exactly one image).
2. Prompt. Edit: the instruction with the working-size image; Edit-plus: "Picture i: ..." with every image
   resized to about ``condition_area`` (384^2 at full size) pixels. The positive and the negative prompt are
   encoded separately with the same image(s) by Qwen2.5-VL (real 3-D M-RoPE; diffusers 0.42.1 uses 1-D
   positions there, diffusers issue #14194), the 64-token system prefix dropped after encoding.
3. References. Each image, LANCZOS-resized to its working size, is VAE-encoded (posterior mean, normalised).
4. Sampling. A :class:`specedit.qwen.QwenEditor` holds it all; a method (the 50-step baseline, or SpecEdit)
   samples the latent with true CFG (scale 4.0, per-token norm rescale) and the VAE decodes it.

``negative_prompt`` None means " " (the official examples' negative prompt); ``true_cfg_scale`` <= 1 turns true
CFG off. Qwen-Image-Edit has no distilled guidance: passing ``guidance`` raises.

Deviations, all documented where they happen: SpecEdit needs the fine token grid divisible by 4, so with a
mixed-resolution method the VAE working sizes are rounded to multiples of 64 px instead of 32 (the VL image
keeps the official rounding); an explicit ``height``/``width`` resizes the source (last) image to exactly
that size for the VAE, because SpecEdit verifies against a source of the output's size (diffusers keeps the
reference at its own working size). The initial noise is ``NoiseField.sample(shape, seed)``: the same draw
as diffusers' ``randn_tensor`` with ``torch.Generator().manual_seed(seed)`` on the CPU.

Shape legend: b batch, z latent channels, H W latent pixels, l text tokens, c channels.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from models import qwen2_5_vl, qwen_image, qwen_image_vae
from models.imageio import resize
from models.loading import build_on_meta, load_checkpoint, open_checkpoint, read_config
from models.qwen_processor import (
    DROP_TOKENS,
    QwenProcessor,
    encode_edit_prompts,
    load_qwen_processor,
    smart_resize,
)
from samplers.mixed_res import sync
from samplers.schedules import QWEN_SCHEDULE, ShiftSchedule, read_schedule
from specedit.pipeline import (
    Component,
    EditPipeline,
    OnDemand,
    Placement,
    Sample,
    as_pil,
    borrowed,
    component_config,
    encode_images,
    grid_multiple,
    image_size,
    model_source,
    resolve_root,
    same_sizes,
    stack_editors,
    working_image,
)
from specedit.qwen.editor import QwenEditor

VARIANTS = {"QwenImageEditPipeline": "edit", "QwenImageEditPlusPipeline": "edit-plus"}
# model name (``specedit edit --model``) -> (hub id, variant)
QWEN_MODELS = {
    "qwen-image-edit": ("Qwen/Qwen-Image-Edit", "edit"),
    "qwen-image-edit-2509": ("Qwen/Qwen-Image-Edit-2509", "edit-plus"),
    "qwen-image-edit-2511": ("Qwen/Qwen-Image-Edit-2511", "edit-plus"),
}
AREA = 1024 * 1024  # VAE working area (diffusers VAE_IMAGE_SIZE)
CONDITION_AREA_RATIO = (384 / 1024) ** 2  # Edit-plus: VL images at 384^2 for a 1024^2 working area
NEGATIVE_PROMPT = " "  # the official examples' negative prompt
TRUE_CFG_SCALE = 4.0
COMPONENTS = {
    "transformer": Component(("transformer",)),
    "vae": Component(("vae",)),
    "text_encoder": Component(("text_encoder",)),
    "processor": Component(("processor", "tokenizer"), extensions=("json", "txt", "jinja")),
}


def calculate_dimensions(area: float, ratio: float, multiple: int = 32) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels at aspect ``ratio`` (= width / height), each rounded to
    ``multiple`` (32 in the official pipelines), at least one multiple."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    rounded = lambda x: max(multiple, round(x / multiple) * multiple)
    return rounded(width), rounded(height)


@dataclass(eq=False)
class QwenEditPipeline(EditPipeline):
    """Qwen-Image-Edit (``variant="edit"``) or Edit-2509 / Edit-2511 (``"edit-plus"``) with our models.

    vae: an :class:`~specedit.pipeline.OnDemand` kept on its home device, run on ``device``. area: VAE working
    area in pixels (1024^2 officially); condition_area: Edit-plus's VL image area (None: 384^2 scaled like
    ``area``). multiple: side rounding of the working sizes (32 officially; mixed-resolution methods raise it to
    64 px at full size so the token grid is divisible by 4). offload_text_encoders: keep the VL encoder on the
    CPU between prompt encodings (it runs on ``device`` on borrowed copies, so memory-mapped weights stay
    mapped).
    """

    family = "qwen"
    default_steps = 50
    default_id = "Qwen/Qwen-Image-Edit"

    transformer: qwen_image.QwenImage
    vae: OnDemand
    text_encoder: qwen2_5_vl.Qwen2_5_VL
    processor: QwenProcessor
    variant: str = "edit"
    schedule: ShiftSchedule = QWEN_SCHEDULE
    device: str | torch.device = "cpu"
    offload_text_encoders: bool = True
    area: float = AREA
    condition_area: float | None = None
    multiple: int = 32

    def __post_init__(self):
        if self.variant not in ("edit", "edit-plus"):
            raise ValueError(f"variant must be 'edit' or 'edit-plus', got {self.variant!r}")
        self.device = torch.device(self.device)
        if not isinstance(self.vae, OnDemand):
            self.vae = OnDemand(self.vae, self.device)

    @classmethod
    def load(
        cls,
        path_or_id: str | os.PathLike,
        where: Placement,
        *,
        variant: str | None = None,
        transformer: str | os.PathLike | None = None,
        vae: str | os.PathLike | None = None,
        text_encoder: str | os.PathLike | None = None,
        processor: str | os.PathLike | None = None,
        area: float = AREA,
        condition_area: float | None = None,
        multiple: int = 32,
    ) -> QwenEditPipeline:
        """``from_pretrained``'s loading: a local repo folder, a hub id (only the component folders are
        downloaded) or a name of ``QWEN_MODELS``. The variant comes from ``model_index.json``'s ``_class_name``
        unless given (or named by the model name).

        transformer, vae, text_encoder, processor: a component's own folder, hub id, or (the three models) one
        ``.safetensors`` file in the diffusers key layout, whose config is the ``config.json`` beside it, else
        the repo's component config. area, condition_area, multiple: see the class docstring.
        """
        if variant not in (None, "edit", "edit-plus"):
            raise ValueError(f"variant must be 'edit' or 'edit-plus', got {variant!r}")
        source = model_source(path_or_id, QWEN_MODELS)
        path_or_id, named = source if isinstance(source, tuple) else (source, None)
        given = dict(transformer=transformer, vae=vae, text_encoder=text_encoder, processor=processor)
        overrides = {k: v for k, v in given.items() if v is not None}
        root = resolve_root(path_or_id, COMPONENTS, overrides, what="Qwen-Image-Edit")
        paths = {name: overrides.get(name, root) for name in COMPONENTS}
        pipe = cls(
            transformer=where.place_transformer(
                lambda d: _load(paths["transformer"], root, "transformer", where.dtype, d)
            ),
            vae=OnDemand(
                where.place_vae(_load(paths["vae"], root, "vae", where.dtype, where.vae_home)), where.vae_home
            ),
            text_encoder=_text_encoder(
                where, _load(paths["text_encoder"], root, "text_encoder", where.dtype, where.text_home)
            ),
            processor=load_qwen_processor(paths["processor"]),
            variant=variant or named or _variant(root),
            schedule=read_schedule(root / "scheduler" / "scheduler_config.json", QWEN_SCHEDULE),
            device=where.device,
            offload_text_encoders=where.offload_text_encoders,
            area=area,
            condition_area=condition_area,
            multiple=multiple,
        )
        for module in (pipe.transformer, pipe.vae.module, pipe.text_encoder):
            module.requires_grad_(False)  # inference only: no autograd graph even outside no_grad
        return pipe

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    # ------------------------------------------------------------------------------------------- internals
    def transformer_module(self) -> torch.nn.Module:
        return self.transformer

    def _options(self, guidance: float | None, true_cfg_scale: float | None) -> float:
        if guidance is not None:
            raise ValueError(
                f"guidance={guidance}: Qwen-Image-Edit has no distilled guidance (that is FLUX.1-Kontext's); "
                "use true_cfg_scale"
            )
        return TRUE_CFG_SCALE if true_cfg_scale is None else float(true_cfg_scale)

    def _prepare(
        self, samples: list[Sample], scale: float, height, width, batched_cfg: bool, full_resolution: bool
    ):
        """Per-sample editors, edit 0's source at its working size, seconds and one-off FLOPs (both prompt
        branches, the reference encodes). Sizes are checked before anything is encoded."""
        f = self.vae.config.factor
        m = self.multiple if full_resolution else math.lcm(self.multiple, grid_multiple(2, f))
        if m % (2 * f):
            raise ValueError(f"multiple={m} must be a multiple of {2 * f} px (one packed token)")
        for i, s in enumerate(samples):
            if self.variant == "edit" and len(s.images) != 1:
                raise ValueError(
                    f"Qwen-Image-Edit edits exactly one image, got {len(s.images)} for edit {i}; use "
                    "Qwen-Image-Edit-2509 or -2511 (variant 'edit-plus') for several"
                )
        sizes = same_sizes([self._sizes(s.images, height, width, m) for s in samples])
        t0 = time.perf_counter()
        prompts, one_off = self._encode_prompts(samples, scale > 1)
        t1 = time.perf_counter()
        latents = encode_images(samples, sizes, lambda x: self.vae.encode(x.to(self.device)).to(self.dtype))
        sync(latents[0][-1])
        seconds = {"encode_prompt": t1 - t0, "encode_image": time.perf_counter() - t1}
        encoded = {(id(im), size) for s in samples for im, size in zip(s.images, sizes)}
        one_off["vae_encode"] = sum(
            qwen_image_vae.flops(self.vae.config, h, w)["encode"] for _, (w, h) in encoded
        )
        editors = [
            QwenEditor(
                model=self.transformer,
                vae=self.vae,
                source=lat[-1],
                refs=tuple(lat[:-1]),
                cfg_scale=scale,
                batched_cfg=batched_cfg,
                schedule=self.schedule,
                **p,
            )  # fmt: skip
            for lat, p in zip(latents, prompts)
        ]
        return editors, working_image(samples[0].images[-1], sizes[-1]), seconds, one_off

    def _sizes(self, images: list, height: int | None, width: int | None, m: int) -> list[tuple[int, int]]:
        """VAE working (width, height) of every image; ``height``/``width`` fix the last (source) image's."""
        sizes = [calculate_dimensions(self.area, w / h, m) for w, h in map(image_size, images)]
        if height is not None or width is not None:
            w, h = (width or sizes[-1][0]) // m * m, (height or sizes[-1][1]) // m * m
            if w < m or h < m:
                raise ValueError(f"height/width {height}x{width} must be at least {m} px")
            sizes[-1] = (w, h)  # the source is encoded at the output size (SpecEdit edits in place)
        return sizes

    def _vl_images(self, images: list) -> list[Image.Image]:
        """The images the VL encoder sees: Edit's working-size image at the official rounding, or every
        Edit-plus image at about ``condition_area``."""
        if self.variant == "edit":
            w, h = image_size(images[0])
            return [resize(as_pil(images[0]), *calculate_dimensions(self.area, w / h))]
        area = self.condition_area or self.area * CONDITION_AREA_RATIO
        return [resize(as_pil(im), *calculate_dimensions(area, w / h)) for im, (w, h) in
                zip(images, map(image_size, images))]  # fmt: skip

    def _encode_prompts(self, samples: list[Sample], cfg: bool) -> tuple[list[dict], dict]:
        """Each sample's prompt (and negative prompt) states as QwenEditor fields, and their one-off FLOPs."""
        template = "edit" if self.variant == "edit" else "edit-plus"
        out, flops = [], 0.0
        with borrowed(self.text_encoder, self.device) as te:
            for s in samples:
                vl = self._vl_images(s.images)
                branches = [("txt", "txt_mask", s.prompt)]
                branches += [
                    ("neg_txt", "neg_mask", NEGATIVE_PROMPT if s.negative is None else s.negative)
                ] * cfg
                states = {}
                for name, mask_name, text in branches:
                    txt, mask = encode_edit_prompts(te, self.processor, text, vl, template=template)
                    states[name] = txt.to(self.device, self.dtype)
                    # an all-real mask is dropped, as the pipelines do (the unmasked attention path)
                    states[mask_name] = None if bool(mask.all()) else mask.to(self.device)
                    flops += self._vl_flops(int(mask.sum()) + DROP_TOKENS, vl)
                out.append(states)
        sync(out[-1]["txt"])
        return out, {"text_encoder": flops}

    def _vl_flops(self, n_tokens: int, vl_images: list[Image.Image]) -> float:
        c = self.processor.image
        grids = []
        for im in vl_images:
            h, w = smart_resize(
                im.height, im.width, factor=c.factor, min_pixels=c.min_pixels, max_pixels=c.max_pixels
            )
            grids.append((1, h // c.patch_size, w // c.patch_size))
        return qwen2_5_vl.flops(self.text_encoder.config, n_tokens, grids)["total"]

    def _stack(self, editors: list[QwenEditor]) -> QwenEditor:
        return stack_editors(editors, text=(("txt", "txt_mask"), ("neg_txt", "neg_mask")))

    def _decode_flops(self, latent: Tensor) -> dict[str, float]:
        f = self.vae.config.factor
        b, _, H, W = latent.shape
        return {"vae_decode": b * qwen_image_vae.flops(self.vae.config, f * H, f * W)["decode"]}


# ----------------------------------------------------------------------------------------------- files
def _variant(root: Path) -> str:
    index = root / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"no model_index.json in {root}: pass variant='edit' or variant='edit-plus'")
    name = read_config(index).get("_class_name")
    if name not in VARIANTS:
        raise ValueError(f"{index}: _class_name {name!r} is not one of {', '.join(VARIANTS)}; pass variant=")
    return VARIANTS[name]


_LOADERS = {
    "transformer": (qwen_image.load_qwen_image, qwen_image.config_from_diffusers),
    "vae": (qwen_image_vae.load_qwen_image_vae, qwen_image_vae.config_from_diffusers),
    "text_encoder": (qwen2_5_vl.load_qwen2_5_vl, qwen2_5_vl.config_from_transformers),
}


def _text_encoder(where: Placement, encoder: qwen2_5_vl.Qwen2_5_VL) -> qwen2_5_vl.Qwen2_5_VL:
    """The VL encoder placed: with ``text_encoder_offload`` its vision blocks, then its decoder layers (the
    order an encoding runs them), stream through the device (:meth:`Placement.place_text_encoder`)."""
    return where.place_text_encoder(encoder, [encoder.visual.blocks, encoder.model.layers])


def _load(path, root: Path, name: str, dtype: torch.dtype | None, device: torch.device):
    """Component ``name`` from a folder, a repo root or a hub id (its loader), or from one ``.safetensors``
    file with the config :func:`~specedit.pipeline.component_config` finds."""
    load, from_config = _LOADERS[name]
    p = Path(os.fspath(path))
    if not p.is_file():
        return load(path, dtype=dtype, device=device)
    config = from_config(component_config(p, root, name))
    if name == "vae":  # the VAE loader takes folders only; the file holds the same keys
        module = build_on_meta(lambda: qwen_image_vae.QwenImageVAE(config))
        return load_checkpoint(module, open_checkpoint(p), dtype=dtype, device=device)
    return load(p, dtype=dtype, device=device, config=config)
