"""Qwen-Image-Edit's prompt side: the Qwen2-VL image processor, the Qwen2 tokenizer, the Edit prompt templates
and prompt encoding with :class:`models.qwen2_5_vl.Qwen2_5_VL`.

Files (``Qwen/Qwen-Image-Edit`` and ``-2509``): ``processor/`` holds ``tokenizer.json`` (preferred here) and
``preprocessor_config.json``; ``tokenizer/`` holds ``vocab.json`` + ``merges.txt`` + ``added_tokens.json`` /
``tokenizer_config.json``. Both load with the ``tokenizers`` library; nothing is downloaded unless a hub id
is passed to :func:`load_qwen_processor`.

Images follow transformers' PIL backend of ``Qwen2VLImageProcessor``: ``smart_resize`` to multiples of 28,
PIL bicubic, x / 255, CLIP mean/std, then patch vectors in merge-block-major order with the still image
repeated over the two temporal taps.

Prompt encoding follows diffusers' ``QwenImageEdit(Plus)Pipeline._get_qwen_prompt_embeds``: template,
``<|image_pad|>`` expanded per image, encode, keep each prompt's real tokens, drop the first 64 (the system
prefix), right-pad with zeros. The positions are real 3-D M-RoPE (diffusers 0.42.1 falls back to 1-D ones:
diffusers issue #14194).

Shape legend: b batch, l tokens, n patches, c channels.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from models.loading import download, is_repo_id, read_config

if TYPE_CHECKING:
    import tokenizers

    from models.qwen2_5_vl import Qwen2_5_VL

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageProcessorConfig:
    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float

    @property
    def factor(self) -> int:
        """Side multiple of a resized image (one merge unit, 28 px)."""
        return self.patch_size * self.merge_size


# Qwen2.5-VL's preprocessor_config.json values (the transformers class default max_pixels, 1 003 520, would
# shrink a 1024^2 image to 980^2).
QWEN_IMAGE_PROCESSOR = ImageProcessorConfig(
    min_pixels=56 * 56,
    max_pixels=28 * 28 * 16384,
    patch_size=14,
    temporal_patch_size=2,
    merge_size=2,
    image_mean=CLIP_MEAN,
    image_std=CLIP_STD,
    rescale_factor=1 / 255,
)

# The Edit templates (diffusers pipeline_qwenimage_edit.py / _edit_plus.py).
EDIT_SYSTEM = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then "
    "explain how the user's text instruction should alter or modify the image. Generate a new image that "
    "meets the user's requirements while maintaining consistency with the original input where appropriate."
)
IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
PICTURE_SLOT = "Picture {}: " + IMAGE_SLOT  # 2509: one per image, numbered from 1
_HEAD = "<|im_start|>system\n" + EDIT_SYSTEM + "<|im_end|>\n<|im_start|>user\n"
_TAIL = "<|im_end|>\n<|im_start|>assistant\n"
EDIT_TEMPLATE = _HEAD + IMAGE_SLOT + "{}" + _TAIL
EDIT_PLUS_TEMPLATE = _HEAD + "{}" + _TAIL
# Tokens of _HEAD under the official tokenizer; their states are computed (context) then discarded.
DROP_TOKENS = 64


# ----------------------------------------------------------------------------------------------- images
def smart_resize(
    height: int, width: int, *, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 16384
) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor`` with the area brought inside [min, max] pixels."""
    if min(height, width) < 1 or max(height, width) / min(height, width) > 200:
        raise ValueError(f"image of {height}x{width}: sides must be >= 1 with an aspect ratio <= 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _rgb(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"array images must be uint8 (h, w, 3|4), got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image or a uint8 (h, w, 3) array, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        # transparency is composited onto white, as transformers does
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def preprocess_image(
    image: Image.Image | np.ndarray, cfg: ImageProcessorConfig = QWEN_IMAGE_PROCESSOR
) -> tuple[Tensor, Tensor]:
    """One image -> (pixel_values (n, c*t*p*p) float32, image_grid_thw (1, 3) long).

    Patch vectors are ordered (h/2, w/2, 2, 2) merge-block-major; each is (c, t, p, p) with the image copied
    to both temporal taps.
    """
    img = _rgb(image)
    h, w = smart_resize(
        img.height, img.width, factor=cfg.factor, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels
    )
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # c h w
    # rescale in float64 then cast, normalise in float32: the reference's exact arithmetic
    x = (x.double() * cfg.rescale_factor).float()
    x = (x - torch.tensor(cfg.image_mean)[:, None, None]) / torch.tensor(cfg.image_std)[:, None, None]
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h // p, w // p
    x = x.reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # hb wb m m c p p
    x = x[:, :, :, :, :, None].expand(-1, -1, -1, -1, -1, t, -1, -1)  # ... c t p p
    return x.reshape(gh * gw, 3 * t * p * p).contiguous(), torch.tensor([[1, gh, gw]])


def image_processor_config(c: dict) -> ImageProcessorConfig:
    """``ImageProcessorConfig`` from a ``preprocessor_config.json``.

    Pixel bounds come from top-level ``min_pixels``/``max_pixels`` (they win, as in transformers), else from
    ``size.shortest_edge``/``size.longest_edge`` (newer files) or ``size.min_pixels``/``size.max_pixels``.
    """
    for flag in ("do_resize", "do_rescale", "do_normalize"):
        if c.get(flag) is False:
            raise ValueError(f"preprocessor_config.json sets {flag}=false, which Qwen-Image-Edit never does")
    if c.get("resample", 3) != 3:
        raise ValueError(f"preprocessor_config.json resample={c['resample']}; only 3 (bicubic) is supported")
    size = c.get("size") or {}
    base = QWEN_IMAGE_PROCESSOR
    lo = c.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or base.min_pixels
    hi = c.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or base.max_pixels
    return ImageProcessorConfig(
        min_pixels=int(lo),
        max_pixels=int(hi),
        patch_size=c.get("patch_size", base.patch_size),
        temporal_patch_size=c.get("temporal_patch_size", base.temporal_patch_size),
        merge_size=c.get("merge_size", base.merge_size),
        image_mean=tuple(c.get("image_mean", base.image_mean)),
        image_std=tuple(c.get("image_std", base.image_std)),
        rescale_factor=float(c.get("rescale_factor", base.rescale_factor)),
    )


# ----------------------------------------------------------------------------------------------- tokenizer
# The Qwen2 pre-tokenizer split, as in the official tokenizer.json.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


class QwenTokenizer:
    """A ``tokenizers.Tokenizer`` with the Qwen special-token lookups the Edit prompts need."""

    def __init__(self, tok: tokenizers.Tokenizer, source: str = "<memory>"):
        self.tok, self.source = tok, source

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer {self.source} has no token {token!r}")
        return i

    @property
    def pad_id(self) -> int:
        return self.token_id("<|endoftext|>")


def load_qwen_tokenizer(folder: str | os.PathLike) -> QwenTokenizer:
    """The tokenizer in ``folder``: ``tokenizer.json`` if present, else ``vocab.json`` + ``merges.txt`` with
    the added tokens of ``tokenizer_config.json`` (``added_tokens_decoder``) or ``added_tokens.json``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return QwenTokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")), str(folder))
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_file.is_file() and merges_file.is_file()):
        raise FileNotFoundError(f"no tokenizer.json, nor vocab.json + merges.txt, in {folder}")
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    merges = []
    for line in merges_file.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#version"):
            a, _, b = line.partition(" ")
            merges.append((a, b))
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="")
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    added: dict[int, dict] = {}
    cfg_file, added_file = folder / "tokenizer_config.json", folder / "added_tokens.json"
    if cfg_file.is_file():
        added = {int(i): t for i, t in read_config(cfg_file).get("added_tokens_decoder", {}).items()}
    if not added and added_file.is_file():
        added = {
            int(i): {"content": c, "special": True} for c, i in json.loads(added_file.read_text()).items()
        }
    for i in sorted(added):  # in id order, so each lands on its id
        t = added[i]
        token = AddedToken(
            t["content"],
            single_word=t.get("single_word", False),
            lstrip=t.get("lstrip", False),
            rstrip=t.get("rstrip", False),
            normalized=t.get("normalized", False),
            special=t.get("special", True),
        )
        (tok.add_special_tokens if token.special else tok.add_tokens)([token])
        if tok.token_to_id(t["content"]) != i:
            raise ValueError(
                f"{folder}: added token {t['content']!r} should have id {i} but got "
                f"{tok.token_to_id(t['content'])} (vocab.json holds {len(vocab)} tokens)"
            )
    return QwenTokenizer(tok, str(folder))


# ----------------------------------------------------------------------------------------------- processor
@dataclass(frozen=True)
class QwenProcessor:
    """Tokenizer + image settings: texts with ``<|image_pad|>`` slots and their images -> model inputs."""

    tokenizer: QwenTokenizer
    image: ImageProcessorConfig = QWEN_IMAGE_PROCESSOR

    def __call__(self, texts: Sequence[str], images: Sequence[Image.Image | np.ndarray]) -> dict[str, Tensor]:
        """Tokenise ``texts`` (right-padded) with every ``<|image_pad|>`` expanded to its image's token count.

        ``images`` fill the slots in order, across the texts. Returns ``input_ids`` and ``attention_mask``
        (b, l) long, ``pixel_values`` (n, 1176) float32 and ``image_grid_thw`` (images, 3) long.
        """
        c, pad = self.image, self.tokenizer.token_id("<|image_pad|>")
        ids = [self.tokenizer.encode(t) for t in texts]
        n_slots = sum(x.count(pad) for x in ids)
        if n_slots != len(images):
            raise ValueError(
                f"the texts hold {n_slots} <|image_pad|> slots but {len(images)} images were given"
            )
        pixels, grids = zip(*(preprocess_image(im, self.image) for im in images)) if images else ((), ())
        counts = iter([int(g.prod()) // self.image.merge_size**2 for g in grids])
        ids = [[y for x in row for y in ([x] * next(counts) if x == pad else [x])] for row in ids]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "pixel_values": torch.cat(pixels)
            if pixels
            else torch.zeros(0, 3 * c.temporal_patch_size * c.patch_size**2),
            "image_grid_thw": torch.cat(grids) if grids else torch.zeros(0, 3, dtype=torch.long),
        }


def load_qwen_processor(path_or_repo: str | os.PathLike) -> QwenProcessor:
    """Tokenizer + image settings from a ``processor/`` or ``tokenizer/`` folder, a repo root holding them
    (``processor/`` preferred), or a hub id (downloads ``processor/*.json`` and ``*.txt`` only)."""
    s = os.fspath(path_or_repo)
    root = Path(s)
    if not root.exists():
        if not is_repo_id(s):
            raise FileNotFoundError(f"{s!r} is neither an existing folder nor a Hugging Face repo id")
        root = download(s, ["processor/*.json", "processor/*.txt"])

    def has_tokenizer(p: Path) -> bool:
        return (p / "tokenizer.json").is_file() or (p / "vocab.json").is_file()

    folder = next((p for p in (root, root / "processor", root / "tokenizer") if has_tokenizer(p)), None)
    if folder is None:
        raise FileNotFoundError(f"no Qwen tokenizer files in {root} (nor in its processor/ or tokenizer/)")
    pre = next((p for p in (folder, root / "processor") if (p / "preprocessor_config.json").is_file()), None)
    cfg = QWEN_IMAGE_PROCESSOR
    if pre is not None:
        cfg = image_processor_config(read_config(pre / "preprocessor_config.json"))
    return QwenProcessor(load_qwen_tokenizer(folder), cfg)


# ----------------------------------------------------------------------------------------------- prompts
def edit_prompt_text(prompt: str, n_images: int, template: str = "edit") -> str:
    """The full model input text of one prompt: ``"edit"`` (one image) or ``"edit-plus"`` (2509, 1+ images,
    each announced as ``"Picture i: "``)."""
    if n_images < 1:
        raise ValueError("Qwen-Image-Edit prompts need at least one image (the image being edited)")
    if template == "edit":
        if n_images != 1:
            raise ValueError(
                f"the 'edit' template has one image slot, got {n_images} images; use 'edit-plus'"
            )
        return EDIT_TEMPLATE.format(prompt)
    if template == "edit-plus":
        return EDIT_PLUS_TEMPLATE.format(
            "".join(PICTURE_SLOT.format(i + 1) for i in range(n_images)) + prompt
        )
    raise ValueError(f"unknown template {template!r}: expected 'edit' or 'edit-plus'")


def _per_prompt(images, n_prompts: int) -> list[list]:
    if isinstance(images, (Image.Image, np.ndarray)):
        return [[images]] * n_prompts
    images = list(images)
    if images and all(isinstance(x, (list, tuple)) for x in images):
        if len(images) != n_prompts:
            raise ValueError(f"{len(images)} per-prompt image lists for {n_prompts} prompts")
        return [list(x) for x in images]
    return [images] * n_prompts


@torch.no_grad()
def _check_vision_tokens(cfg, tok) -> None:
    """The tokenizer's vision token ids must be the ones the model was trained with."""
    for name, want in (
        ("<|image_pad|>", cfg.image_token_id),
        ("<|vision_start|>", cfg.vision_start_token_id),
        ("<|vision_end|>", cfg.vision_end_token_id),
    ):
        if tok.token_id(name) != want:
            raise ValueError(f"tokenizer id of {name} is {tok.token_id(name)} but the model expects {want}")


def encode_edit_prompts(
    model: Qwen2_5_VL,
    processor: QwenProcessor,
    prompts: str | Sequence[str],
    images,
    *,
    template: str = "edit",
    drop: int = DROP_TOKENS,
    max_length: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Prompt embeddings for the Qwen-Image-Edit DiT, as the official pipelines compute them.

    Args:
        prompts: one prompt or a batch. Positive and negative prompts are separate calls with the same images.
        images: the image(s) every prompt sees - one image, a list (shared by all prompts; ``"edit-plus"``
            numbers them "Picture 1..n"), or a list of per-prompt lists. Zero images is an error; ``"edit"``
            takes exactly one per prompt. Images are used as given: the pipelines resize them before this
            step (Edit to about 1024^2, 2509 to about 384^2), then ``smart_resize`` applies.
        drop: leading tokens whose states are discarded (64 = the system prefix under the official tokenizer).
        max_length: the official pipelines never truncate (truncation would cut the instruction or the image);
            neither does this. If given, a prompt whose kept length exceeds it raises ``ValueError``.
    Returns:
        embeds (b, l, c) in the model dtype, zero past each prompt's end, and mask (b, l) long.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    per = _per_prompt(images, len(prompts))
    texts = [edit_prompt_text(p, len(ims), template) for p, ims in zip(prompts, per)]
    _check_vision_tokens(model.config, processor.tokenizer)
    inputs = processor(texts, [im for ims in per for im in ims])
    lengths = inputs["attention_mask"].sum(1) - drop
    if (lengths < 1).any():
        raise ValueError(f"prompts of {(lengths + drop).tolist()} tokens leave nothing after dropping {drop}")
    if max_length is not None and (lengths > max_length).any():
        raise ValueError(
            f"prompt embeddings of {lengths.tolist()} tokens exceed max_length={max_length} (image tokens "
            "included); the official pipelines do not truncate, so shorten the prompt or shrink the image"
        )
    p = next(model.parameters())
    states = model.encode(
        inputs["input_ids"].to(p.device),
        inputs["attention_mask"].to(p.device),
        inputs["pixel_values"].to(p.device, p.dtype),
        inputs["image_grid_thw"],
    )
    width = int(lengths.max())
    embeds = states.new_zeros(len(prompts), width, states.shape[-1])
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=states.device)
    for i, n in enumerate(lengths.tolist()):  # each prompt's real tokens, system prefix dropped
        embeds[i, :n] = states[i][inputs["attention_mask"][i].bool().to(states.device)][drop:]
        mask[i, :n] = 1
    return embeds, mask
