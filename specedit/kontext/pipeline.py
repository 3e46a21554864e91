"""The FLUX.1-Kontext-dev editor end to end: load the official repo, encode, edit (baseline or SpecEdit), decode.

``KontextPipeline.from_pretrained`` loads every component of ``black-forest-labs/FLUX.1-Kontext-dev`` with our
own modules: the diffusers folders (transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/,
tokenizer_2/, scheduler/) or BFL's single files in the repo root (flux1-kontext-dev.safetensors,
ae.safetensors), from a local folder or the hub; any component may be given on its own (a folder, a file or a
hub id). ``edit`` (:class:`specedit.pipeline.EditPipeline`: batches, seeds, outputs) runs a method and decodes.

The steps are BFL's CLI / diffusers' ``FluxKontextPipeline``: reference -> preferred Kontext resolution
(LANCZOS) -> AE posterior mean, normalised; prompt -> T5 over 512 padded tokens with no mask, CLIP pooled over
77; target size = reference size (in-place edit, BFL's convention); seeded noise drawn on a CPU generator; one
guidance-distilled forward per step; AE decode. One deviation, for SpecEdit's 2x2 coarse grid and 4x draft:
image sides are rounded to multiples of 64 px (see :func:`edit_size`).

Several images per edit: the first is edited (it fixes the output size and SpecEdit verifies against it);
the others are further references, each at its own preferred Kontext resolution (sides rounded alike), placed
after it by ``reference_method`` (``models.flux_kontext.reference_ids``; "offset", ComfyUI's default, or
"index"). ``height``/``width`` size the first image; the others then keep their own aspect ratio at its area
(:meth:`KontextPipeline.working_sizes`).

True CFG: ``true_cfg_scale`` > 1 with a ``negative_prompt`` runs both prompts each step and combines
``v_neg + scale (v_pos - v_neg)`` with no norm rescale, as diffusers' ``FluxKontextPipeline`` (whose default
scale is 1.0: off); the distilled ``guidance`` embedding stays on in both branches.

Shape legend: b prompts, l text tokens (512), H W image pixels, h w latent pixels (H/8, W/8).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from models.clip import CLIPText, load_clip
from models.flux import Flux, load_flux
from models.flux_ae import load_flux_ae
from models.flux_kontext import REFERENCE_METHODS, preferred_resolution
from models.t5 import T5Encoder, load_t5
from models.tokenization import TextTokenizer, load_clip_tokenizer, load_t5_tokenizer
from samplers.mixed_res import sync
from samplers.schedules import FLUX_SCHEDULE, ShiftSchedule, read_schedule
from specedit.kontext.editor import KontextEditor
from specedit.pipeline import (
    Component,
    EditPipeline,
    OnDemand,
    Placement,
    Sample,
    borrowed,
    encode_images,
    grid_multiple,
    image_size,
    model_source,
    open_image,
    resolve_root,
    same_sizes,
    stack_editors,
    working_image,
    working_tensor,
)

REPO_ID = "black-forest-labs/FLUX.1-Kontext-dev"
KONTEXT_MODELS = {"flux-kontext-dev": REPO_ID}  # model name (``specedit edit --model``) -> hub id
COMPONENTS = {
    "transformer": Component(("transformer",), "flux1-*.safetensors"),
    "vae": Component(("vae",), "ae.safetensors"),
    "text_encoder": Component(("text_encoder",)),
    "text_encoder_2": Component(("text_encoder_2",)),
    "tokenizer": Component(("tokenizer",), extensions=("json", "txt")),
    "tokenizer_2": Component(("tokenizer_2",), extensions=("json", "model")),
}
GUIDANCE = 2.5  # BFL's and diffusers' default for Kontext-dev


def edit_size(
    image_size: tuple[int, int], *, height: int | None = None, width: int | None = None, multiple: int = 64
) -> tuple[int, int]:
    """The (width, height) an image of ``image_size`` = (width, height) is edited at.

    Without ``height``/``width``: the preferred Kontext resolution nearest in aspect ratio (as BFL and
    diffusers do). Either way each side is then rounded to the nearest multiple of ``multiple`` (ties up),
    at least one multiple. Deviation from the official pipelines: SpecEdit needs a fine token grid divisible
    by 4, i.e. sides in multiples of 64 px with the 8x AE. Of the preferred sizes only 1024x1024 already is;
    the others move by at most 32 px per side (e.g. 1392x752 -> 1408x768), which keeps the aspect ratio within
    3.5 % and the area within +7 %. The baseline uses the same size, so all methods stay comparable.
    """
    if (height is None) != (width is None):
        raise ValueError(f"give both height and width or neither, got height={height}, width={width}")
    if height is None:
        width, height = preferred_resolution(*image_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    snap = lambda x: max(1, int(x / multiple + 0.5)) * multiple
    return snap(width), snap(height)


@dataclass(eq=False)
class KontextPipeline(EditPipeline):
    """The loaded FLUX.1-Kontext-dev components and where they live.

    ``model`` runs on ``device``. ``ae`` (:class:`~specedit.pipeline.OnDemand`) lives on its ``home`` device
    and runs on ``device``. With ``offload_text_encoders`` the T5 and CLIP encoders live on the CPU and run on
    ``device`` only inside :meth:`encode_prompt`, on borrowed copies (:func:`~specedit.pipeline.borrowed`):
    offloaded, not freed, so the next prompt needs no reload and memory-mapped weights stay mapped. What stays
    on ``device`` is the transformer (22.2 GiB in bf16) and, unless ``vae_device`` keeps it elsewhere, the AE
    (0.16 GiB in bf16); encoding adds T5-XXL's 9 GiB for a moment (peak 31.3 GiB, measured on an H100 with
    random full-size weights at 1216x896).
    """

    family = "kontext"
    default_steps = 28
    default_id = REPO_ID

    model: Flux
    ae: OnDemand
    t5: T5Encoder
    clip: CLIPText
    t5_tokenizer: TextTokenizer
    clip_tokenizer: TextTokenizer
    device: torch.device
    schedule: ShiftSchedule = FLUX_SCHEDULE
    offload_text_encoders: bool = True
    reference_method: str = "offset"

    def __post_init__(self):
        if self.reference_method not in REFERENCE_METHODS:
            raise ValueError(
                f"reference_method must be one of {REFERENCE_METHODS}, got {self.reference_method!r}"
            )
        self.device = torch.device(self.device)

    @classmethod
    def load(
        cls,
        path_or_id: str | os.PathLike,
        where: Placement,
        *,
        transformer: str | os.PathLike | None = None,
        vae: str | os.PathLike | None = None,
        text_encoder: str | os.PathLike | None = None,
        text_encoder_2: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
        tokenizer_2: str | os.PathLike | None = None,
        max_sequence_length: int = 512,
        reference_method: str = "offset",
    ) -> KontextPipeline:
        """``from_pretrained``'s loading: a local repo folder, a hub repo id (gated: needs ``HF_TOKEN``; only the
        components' configs, weights and tokenizer files are downloaded) or a name of ``KONTEXT_MODELS``.

        transformer, vae, text_encoder (CLIP), text_encoder_2 (T5), tokenizer, tokenizer_2: a component's own
        folder, single file (transformer: BFL's flux1-*.safetensors; vae: BFL's ae.safetensors) or hub id,
        instead of the repo's. max_sequence_length: T5 tokens (512 as in BFL and diffusers; at most 512).
        reference_method: placement of further references (``models.flux_kontext.reference_ids``).
        """
        if where.text_encoder_offload is not None:
            raise ValueError("text_encoder_offload streams Qwen-Image-Edit's VL encoder; FLUX.1-Kontext's T5 and "
                             "CLIP are borrowed whole (offload_text_encoders)")  # fmt: skip
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in [1, 512], got {max_sequence_length}")
        given = dict(transformer=transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                     tokenizer=tokenizer, tokenizer_2=tokenizer_2)  # fmt: skip
        overrides = {k: v for k, v in given.items() if v is not None}
        root = resolve_root(model_source(path_or_id, KONTEXT_MODELS), COMPONENTS, overrides,
                            what="FLUX.1-Kontext-dev")  # fmt: skip
        paths = {name: overrides.get(name, root) for name in COMPONENTS}
        dtype = where.dtype
        pipe = cls(
            model=where.place_transformer(lambda d: load_flux(paths["transformer"], dtype=dtype, device=d)),
            ae=OnDemand(
                where.place_vae(load_flux_ae(paths["vae"], dtype=dtype, device=where.vae_home)),
                where.vae_home,
            ),
            t5=load_t5(paths["text_encoder_2"], dtype=dtype, device=where.text_home),
            clip=load_clip(paths["text_encoder"], dtype=dtype, device=where.text_home),
            t5_tokenizer=load_t5_tokenizer(paths["tokenizer_2"], max_length=max_sequence_length),
            clip_tokenizer=load_clip_tokenizer(paths["tokenizer"]),
            device=where.device,
            schedule=read_schedule(Path(root) / "scheduler" / "scheduler_config.json", FLUX_SCHEDULE),
            offload_text_encoders=where.offload_text_encoders,
            reference_method=reference_method,
        )
        for module in (pipe.model, pipe.ae.module, pipe.t5, pipe.clip):
            module.requires_grad_(False)  # inference only: no autograd graph even outside no_grad
        return pipe

    # ------------------------------------------------------------------------------------------- encoding
    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str]) -> tuple[Tensor, Tensor]:
        """Prompt(s) -> txt (b, 512, 4096) T5 states over padded tokens, no mask; pooled (b, 768) CLIP at the
        first end-of-text token. Both on ``device``, each in its encoder's dtype."""
        t5_ids = self.t5_tokenizer(prompt)  # validates: a str or a non-empty list of str
        clip_ids = self.clip_tokenizer(prompt)
        with borrowed(self.t5, self.device) as t5:
            txt = t5(t5_ids.to(self.device))  # BFL/diffusers pass no attention mask: pads take part
        with borrowed(self.clip, self.device) as clip:
            _, pooled = clip(clip_ids.to(self.device))
        return txt, pooled

    @property
    def multiple(self) -> int:
        """Image sides are multiples of this many pixels: 4 tokens of 2x2 latent pixels (64 px at 8x)."""
        return grid_multiple(2, self.ae.config.factor)

    def working_size(self, image, *, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The (width, height) an opened input image is encoded at (:func:`edit_size`)."""
        return edit_size(image_size(image), height=height, width=width, multiple=self.multiple)

    def working_sizes(self, images: list, *, height: int | None = None, width: int | None = None) -> list:
        """The (width, height) of each opened image of one edit: the first at :func:`edit_size`; without
        ``height``/``width`` the others likewise (each at its preferred resolution, as ComfyUI's
        ``FluxKontextImageScale`` node), with them the others at the first one's area and their own aspect
        ratio, sides rounded as :func:`edit_size` does."""
        first = self.working_size(images[0], height=height, width=width)
        if height is None:
            return [first] + [self.working_size(im) for im in images[1:]]
        area, out = first[0] * first[1], [first]
        for w, h in map(image_size, images[1:]):
            out.append(edit_size((w, h), width=math.sqrt(area * w / h), height=math.sqrt(area * h / w),
                                 multiple=self.multiple))  # fmt: skip
        return out

    def reference(self, image, *, height: int | None = None, width: int | None = None) -> Tensor:
        """An input image at its working size (:func:`edit_size`) as (1, 3, H, W) float32 in [-1, 1] on the CPU.

        ``image``: a PIL image, a path, a uint8 (H, W, 3) array, or a tensor (1, 3, H, W) / (3, H, W) in
        [-1, 1]. Resizing is LANCZOS on the 8-bit image (a tensor that needs resizing is quantised to 8 bits
        first; one at the working size is used as is).
        """
        image = open_image(image)
        return working_tensor(image, self.working_size(image, height=height, width=width))

    # ------------------------------------------------------------------------------------------- editing
    def transformer_module(self) -> torch.nn.Module:
        return self.model

    def _options(self, guidance: float | None, true_cfg_scale: float | None) -> tuple[float, float]:
        guidance = GUIDANCE if guidance is None else float(guidance)
        return guidance, 1.0 if true_cfg_scale is None else float(true_cfg_scale)

    def _prepare(
        self, samples: list[Sample], options, height, width, batched_cfg: bool, full_resolution: bool
    ):
        """Per-sample editors, edit 0's first image at its working size, seconds and one-off FLOPs (none
        counted here). Sizes are checked before anything is encoded."""
        guidance, scale = options
        sizes = same_sizes([self.working_sizes(s.images, height=height, width=width) for s in samples])
        t0 = time.perf_counter()
        prompts = kontext_prompts(self.encode_prompt, samples, scale)
        sync(prompts[0][0])
        t1 = time.perf_counter()
        dtype = next(self.model.parameters()).dtype
        latents = encode_images(samples, sizes, lambda x: self.ae.encode(x.to(self.device)).to(dtype))
        sync(latents[0][0])
        seconds = {"encode_prompt": t1 - t0, "encode_image": time.perf_counter() - t1}
        common = dict(guidance=guidance, schedule=self.schedule, cfg_scale=scale, batched_cfg=batched_cfg)
        editors = kontext_editors(
            self.model, self.ae, *prompts, latents, ref_method=self.reference_method, **common
        )
        return editors, working_image(samples[0].images[0], sizes[0]), seconds, {}

    def _stack(self, editors: list[KontextEditor]) -> KontextEditor:
        return stack_editors(editors)


def kontext_prompts(encode, samples: list[Sample], scale: float):
    """``(encode(prompts), encode(negative prompts) or None)`` for the samples; true CFG (``scale`` > 1) needs
    every sample's negative prompt (Kontext has no default one)."""
    if scale > 1 and any(s.negative is None for s in samples):
        raise ValueError(
            f"true_cfg_scale={scale} needs a negative_prompt (FLUX.1-Kontext has no default one)"
        )
    positive = encode([s.prompt for s in samples])
    return positive, encode([s.negative for s in samples]) if scale > 1 else None


def kontext_editors(
    model, ae, positive, negative, latents: list[list[Tensor]], **options
) -> list[KontextEditor]:
    """One :class:`KontextEditor` per sample: ``positive`` / ``negative`` the batch's (txt, y) prompt states
    (``negative`` None: no true CFG), ``latents[i]`` sample i's [source, *refs]; ``options`` its other fields."""
    row = lambda t, i: None if t is None else t[i : i + 1]
    neg_txt, neg_y = negative or (None, None)
    return [
        KontextEditor(
            model,
            ae,
            row(positive[0], i),
            row(positive[1], i),
            lat[0],
            refs=tuple(lat[1:]),
            neg_txt=row(neg_txt, i),
            neg_y=row(neg_y, i),
            **options,
        )  # fmt: skip
        for i, lat in enumerate(latents)
    ]
