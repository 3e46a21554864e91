"""Qwen-Image-Edit and Qwen-Image-Edit-2509 end to end: images + instruction -> edited image, baseline or SpecEdit.

Mirrors diffusers' ``QwenImageEditPipeline`` / ``QwenImageEditPlusPipeline`` (0.42.1) with our models:

1. Sizes. Every input image gets a VAE working size of about ``area`` pixels at its aspect ratio
   (``calculate_dimensions``: w = sqrt(area * r), h = w / r, each rounded to a multiple of 32). The output
   takes the *last* image's working size (Edit has exactly one image).
2. Prompt. Edit: the instruction with the working-size image; Edit-2509: "Picture i: ..." with every image
   resized to about ``condition_area`` (384^2 at full size) pixels. The positive and the negative prompt are
   encoded separately with the same image(s) by Qwen2.5-VL (real 3-D M-RoPE; diffusers 0.42.1 uses 1-D
   positions there, diffusers issue #14194), the 64-token system prefix dropped after encoding.
3. References. Each image, LANCZOS-resized to its working size, is VAE-encoded (posterior mean, normalised).
4. Sampling. A :class:`specedit.qwen.QwenEditor` holds it all; a method (the 50-step baseline, or SpecEdit)
   samples the latent with true CFG (scale 4.0, per-token norm rescale) and the VAE decodes it.

Deviations, all documented where they happen: SpecEdit needs the fine token grid divisible by 4, so with a
mixed-resolution method the VAE working sizes are rounded to multiples of 64 px instead of 32 (the VL image
keeps the official rounding); an explicit ``height``/``width`` resizes the source (last) image to exactly
that size for the VAE, because SpecEdit verifies against a source of the output's size (diffusers keeps the
reference at its own working size). The initial noise is ``NoiseField.sample(shape, seed)``: the same draw
as diffusers' ``randn_tensor`` with ``torch.Generator().manual_seed(seed)`` on the CPU.

Shape legend: b batch, z latent channels, H W latent pixels, l text tokens, c channels.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from models import qwen2_5_vl, qwen_image, qwen_image_vae
from models.imageio import load_image, pil_to_tensor, resize
from models.loading import resolve
from models.qwen_processor import (
    DROP_TOKENS,
    QwenProcessor,
    encode_edit_prompts,
    load_qwen_processor,
    smart_resize,
)
from samplers.mixed_res import FullResSampler
from samplers.schedules import QWEN_SCHEDULE, ShiftSchedule
from specedit import presets
from specedit.method import Baseline
from specedit.qwen.editor import QwenEditor
from specedit.viz import EditOutput

VARIANTS = {"QwenImageEditPipeline": "edit", "QwenImageEditPlusPipeline": "edit-plus"}
AREA = 1024 * 1024  # VAE working area (diffusers VAE_IMAGE_SIZE)
CONDITION_AREA_RATIO = (384 / 1024) ** 2  # 2509: VL images at 384^2 for a 1024^2 working area
HUB_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    *(f"{d}/*.{e}" for d in ("transformer", "vae", "text_encoder") for e in ("json", "safetensors")),
    *(f"{d}/*.{e}" for d in ("processor", "tokenizer") for e in ("json", "txt", "jinja")),
]


def calculate_dimensions(area: float, ratio: float, multiple: int = 32) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels at aspect ``ratio`` (= width / height), each rounded to
    ``multiple`` (32 in the official pipelines), at least one multiple."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    rounded = lambda x: max(multiple, round(x / multiple) * multiple)
    return rounded(width), rounded(height)


def schedule_from_diffusers(c: dict) -> ShiftSchedule:
    """The shift schedule of a ``FlowMatchEulerDiscreteScheduler`` ``scheduler_config.json`` (the edit
    pipelines use dynamic shifting; missing keys take the values the pipelines fall back to)."""
    if not c.get("use_dynamic_shifting", False) or c.get("time_shift_type", "exponential") != "exponential":
        raise ValueError(
            "scheduler config: only dynamic exponential shifting (the Qwen-Image setting) is supported"
        )
    for flag in (
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "invert_sigmas",
        "stochastic_sampling",
    ):
        if c.get(flag, False):
            raise ValueError(
                f"scheduler config sets {flag}=true, which the Qwen-Image-Edit pipelines never do"
            )
    return ShiftSchedule(
        base_seq_len=c.get("base_image_seq_len", 256),
        max_seq_len=c.get("max_image_seq_len", 4096),
        base_shift=c.get("base_shift", 0.5),
        max_shift=c.get("max_shift", 1.15),
        shift_terminal=c.get("shift_terminal"),
    )


class QwenOutput(EditOutput):
    """A Qwen-Image-Edit edit (see ``EditOutput``); seconds: "encode_prompt", "encode_image", "sample", "decode",
    "total"; one_off: FLOPs of the prompt encoding (both branches), the reference encoding, the final decode."""


def resolve_method(method, steps: int = 50):
    """ "baseline" (``steps`` full-resolution steps), a name of ``specedit.presets.methods("qwen")`` (its own
    step counts), or any object with ``run(editor, seed, progress=...)``."""
    if isinstance(method, str):
        if method == "baseline":
            if steps < 1:
                raise ValueError(f"steps must be >= 1, got {steps}")
            return Baseline(FullResSampler(steps))
        return presets.get(method, "qwen")
    if callable(getattr(method, "run", None)):
        return method
    raise ValueError(f"method must be a name or an object with .run(editor, seed), got {method!r:.80}")


def _full_resolution(method) -> bool:
    return isinstance(method, Baseline) and isinstance(method.sampler, FullResSampler)


@dataclass(eq=False)
class QwenEditPipeline:
    """Qwen-Image-Edit (``variant="edit"``) or Edit-2509 (``"edit-plus"``) with our models.

    area: VAE working area in pixels (1024^2 officially); condition_area: 2509's VL image area (None: 384^2
    scaled like ``area``). multiple: side rounding of the working sizes (32 officially; mixed-resolution
    methods raise it to 64 px at full size so the token grid is divisible by 4). offload_text_encoder: keep
    the VL encoder on the CPU between prompt encodings.
    """

    transformer: qwen_image.QwenImage
    vae: qwen_image_vae.QwenImageVAE
    text_encoder: qwen2_5_vl.Qwen2_5_VL
    processor: QwenProcessor
    variant: str = "edit"
    schedule: ShiftSchedule = QWEN_SCHEDULE
    device: str | torch.device = "cpu"
    offload_text_encoder: bool = True
    area: float = AREA
    condition_area: float | None = None
    multiple: int = 32

    def __post_init__(self):
        if self.variant not in ("edit", "edit-plus"):
            raise ValueError(f"variant must be 'edit' or 'edit-plus', got {self.variant!r}")
        self.device = torch.device(self.device)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike = "Qwen/Qwen-Image-Edit",
        *,
        variant: str | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        offload_text_encoder: bool = True,
        **kw,
    ) -> QwenEditPipeline:
        """Load from one local repo folder (``transformer/``, ``vae/``, ``text_encoder/``, ``processor/`` or
        ``tokenizer/``, optional ``scheduler/`` and ``model_index.json``) or a hub id (only those folders are
        downloaded). The variant comes from ``model_index.json``'s ``_class_name`` unless given. ``dtype``
        casts every model (None keeps the stored dtypes); ``kw`` sets the other fields (area, multiple, ...).
        """
        root = resolve(path_or_repo, HUB_PATTERNS)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder: expected a Qwen-Image-Edit repo root")
        missing = [d + "/" for d in ("transformer", "vae", "text_encoder") if not (root / d).is_dir()]
        if not ((root / "processor").is_dir() or (root / "tokenizer").is_dir()):
            missing.append("processor/ (or tokenizer/)")
        if missing:
            raise FileNotFoundError(
                f"{root} is not a Qwen-Image-Edit repo folder: missing {', '.join(missing)}"
            )
        variant = variant or _variant(root)
        schedule = QWEN_SCHEDULE
        if (root / "scheduler" / "scheduler_config.json").is_file():
            schedule = schedule_from_diffusers(
                json.loads((root / "scheduler" / "scheduler_config.json").read_text())
            )
        te_device = "cpu" if offload_text_encoder else device
        return cls(
            transformer=qwen_image.load_qwen_image(root, dtype=dtype, device=device),
            vae=qwen_image_vae.load_qwen_image_vae(root, dtype=dtype, device=device),
            text_encoder=qwen2_5_vl.load_qwen2_5_vl(root, dtype=dtype, device=te_device),
            processor=load_qwen_processor(root),
            variant=variant,
            schedule=schedule,
            device=device,
            offload_text_encoder=offload_text_encoder,
            **kw,
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @torch.no_grad()
    def prepare(
        self,
        images,
        prompt: str,
        *,
        negative_prompt: str | None = " ",
        true_cfg_scale: float = 4.0,
        height: int | None = None,
        width: int | None = None,
        multiple: int | None = None,
        batched_cfg: bool = True,
    ) -> QwenEditor:
        """Encode the prompts and references of one edit into a :class:`QwenEditor` (see the module docstring).

        images: one image or a list (Edit: exactly one; 2509: one or more, the last one is edited); PIL
        images, paths or uint8 (h, w, 3) arrays. negative_prompt None or true_cfg_scale <= 1: no CFG.
        multiple: side rounding of the VAE working sizes (default: the pipeline's).
        """
        return self._prepare(
            images, prompt, negative_prompt, true_cfg_scale, height, width, multiple, batched_cfg
        )[0]

    @torch.no_grad()
    def edit(
        self,
        images,
        prompt: str,
        *,
        method="baseline",
        steps: int = 50,
        true_cfg_scale: float = 4.0,
        negative_prompt: str | None = " ",
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        batched_cfg: bool = True,
        progress: bool = False,
    ) -> QwenOutput:
        """Edit ``images`` by ``prompt`` with ``method`` ("baseline" = ``steps`` full-resolution steps, a name
        of ``specedit.presets.methods("qwen")``, or an object with ``run(editor, seed, progress=...)``)."""
        m = resolve_method(method, steps)
        # mixed-resolution methods need a token grid divisible by 4: 4 tokens x 2 latent px x the VAE factor
        multiple = (
            self.multiple if _full_resolution(m) else math.lcm(self.multiple, 8 * self.vae.config.factor)
        )
        t0 = time.perf_counter()
        editor, reference, seconds, one_off = self._prepare(
            images, prompt, negative_prompt, true_cfg_scale, height, width, multiple, batched_cfg
        )
        t1 = time.perf_counter()
        result = m.run(editor, seed, progress=progress)
        _sync(result.latent)
        t2 = time.perf_counter()
        # as diffusers' postprocess: x / 2 + 0.5 clamped, then round(255 x) for the PIL images
        pixels = (editor.decode(result.latent).float() / 2 + 0.5).clamp(0, 1).cpu()
        t3 = time.perf_counter()
        arrays = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        f = self.vae.config.factor
        b, _, H, W = result.latent.shape
        one_off["vae_decode"] = b * qwen_image_vae.flops(self.vae.config, f * H, f * W)["decode"]
        seconds.update(sample=t2 - t1, decode=t3 - t2, total=t3 - t0)
        return QwenOutput(
            images=[Image.fromarray(a) for a in arrays],
            pixels=pixels,
            latent=result.latent,
            result=result,
            editor=editor,
            reference=reference,
            seconds=seconds,
            one_off=one_off,
        )

    # ------------------------------------------------------------------------------------------- internals
    def _prepare(self, images, prompt, negative_prompt, true_cfg_scale, height, width, multiple, batched_cfg):
        images = self._images(images)
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be one string (batch 1), got {type(prompt).__name__}")
        m = multiple or self.multiple
        f = self.vae.config.factor
        if m % (2 * f):
            raise ValueError(f"multiple={m} must be a multiple of {2 * f} px (one packed token)")
        ratios = [im.width / im.height for im in images]
        sizes = [calculate_dimensions(self.area, r, m) for r in ratios]  # (w, h) per VAE image
        if height is not None or width is not None:
            w, h = (width or sizes[-1][0]) // m * m, (height or sizes[-1][1]) // m * m
            if w < m or h < m:
                raise ValueError(f"height/width {height}x{width} must be at least {m} px")
            sizes[-1] = (w, h)  # the source is encoded at the output size (SpecEdit edits in place)
        if self.variant == "edit":  # the working-size image, at the official rounding
            vl_images = [resize(images[0], *calculate_dimensions(self.area, ratios[0]))]
        else:
            area = self.condition_area or self.area * CONDITION_AREA_RATIO
            vl_images = [resize(im, *calculate_dimensions(area, r)) for im, r in zip(images, ratios)]
        seconds, one_off = {}, {}

        t0 = time.perf_counter()
        te = self.text_encoder
        template = "edit" if self.variant == "edit" else "edit-plus"
        cfg = negative_prompt is not None and true_cfg_scale > 1
        if self.offload_text_encoder:
            te.to(self.device)
        try:
            txt, txt_mask = encode_edit_prompts(te, self.processor, prompt, vl_images, template=template)
            neg = None
            if cfg:
                neg = encode_edit_prompts(te, self.processor, negative_prompt, vl_images, template=template)
        finally:
            if self.offload_text_encoder:
                te.to("cpu")
        _sync(txt)
        seconds["encode_prompt"] = time.perf_counter() - t0
        one_off["text_encoder"] = sum(
            self._vl_flops(int(mk.sum()) + DROP_TOKENS, vl_images)
            for mk in [txt_mask] + ([neg[1]] if cfg else [])
        )

        t0 = time.perf_counter()
        p = next(self.vae.parameters())
        latents = [
            self.vae.encode(pil_to_tensor(resize(im, w, h)).to(p.device, p.dtype)).to(self.dtype)
            for im, (w, h) in zip(images, sizes)
        ]
        _sync(latents[-1])
        seconds["encode_image"] = time.perf_counter() - t0
        one_off["vae_encode"] = sum(qwen_image_vae.flops(self.vae.config, h, w)["encode"] for w, h in sizes)

        editor = QwenEditor(
            model=self.transformer,
            vae=self.vae,
            txt=txt.to(self.device, self.dtype),
            source=latents[-1],
            txt_mask=_mask(txt_mask, self.device),
            neg_txt=None if neg is None else neg[0].to(self.device, self.dtype),
            neg_mask=None if neg is None else _mask(neg[1], self.device),
            refs=tuple(latents[:-1]),
            cfg_scale=true_cfg_scale,
            batched_cfg=batched_cfg,
            schedule=self.schedule,
        )
        return editor, resize(images[-1], *sizes[-1]), seconds, one_off

    def _images(self, images) -> list[Image.Image]:
        if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike)):
            images = [images]
        if not isinstance(images, Sequence) or len(images) == 0:
            raise ValueError("Qwen-Image-Edit needs at least one input image (the image being edited)")
        if self.variant == "edit" and len(images) != 1:
            raise ValueError(
                f"Qwen-Image-Edit edits exactly one image, got {len(images)}; use Qwen-Image-Edit-2509 "
                "(variant 'edit-plus') for several"
            )
        out = []
        for i, im in enumerate(images):
            im = Image.fromarray(im) if isinstance(im, np.ndarray) else load_image(im)
            if not isinstance(im, Image.Image):
                raise ValueError(
                    f"images[{i}] must be a PIL image, a path or a uint8 array, got {type(im).__name__}"
                )
            out.append(im)
        return out

    def _vl_flops(self, n_tokens: int, vl_images: list[Image.Image]) -> float:
        c = self.processor.image
        grids = []
        for im in vl_images:
            h, w = smart_resize(
                im.height, im.width, factor=c.factor, min_pixels=c.min_pixels, max_pixels=c.max_pixels
            )
            grids.append((1, h // c.patch_size, w // c.patch_size))
        return qwen2_5_vl.flops(self.text_encoder.config, n_tokens, grids)["total"]


def _variant(root: Path) -> str:
    index = root / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"no model_index.json in {root}: pass variant='edit' or variant='edit-plus'")
    name = json.loads(index.read_text()).get("_class_name")
    if name not in VARIANTS:
        raise ValueError(f"{index}: _class_name {name!r} is not one of {', '.join(VARIANTS)}; pass variant=")
    return VARIANTS[name]


def _mask(mask: Tensor, device) -> Tensor | None:
    """None when every token is real (the pipelines drop an all-ones mask, and so take the unmasked path)."""
    return None if bool(mask.all()) else mask.to(device)


def _sync(x: Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
