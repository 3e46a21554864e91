"""One edit API over every model family, and the parts the end-to-end pipelines share.

:class:`EditPipeline` holds the one ``edit`` of :class:`specedit.kontext.pipeline.KontextPipeline` and
:class:`specedit.qwen.pipeline.QwenEditPipeline`; ``specedit.toy.model.ToyEditor.edit`` takes the same keywords.
Every edit returns an :class:`EditOutput`.

Inputs. ``prompts`` a string: one edit, and ``images`` is its image or a list of its images (several
references; the family says which one is edited: Kontext the first, Qwen-Image-Edit the last, as in their
reference pipelines). ``prompts`` a list of b strings: b edits, and ``images`` is one image shared by all or a
list of b entries, entry i being edit i's image or list of images; ``negative_prompt`` is one string for all
or a list of b. An image is a PIL image, a path, a uint8 (H, W, 3) array or a float tensor (3, H, W) /
(1, 3, H, W) in [-1, 1]. The edits of one batch must share their working sizes (give ``height``/``width``, or
edit them one at a time).

Seeds. Edit i of a batch draws its initial noise as a batch-1 edit seeded ``seed + i`` would (a CPU
generator, the same on every device), so output i is the batch-1 edit of (images i, prompt i) with seed
``seed + i``. A ``torch.Generator`` may stand in for ``seed``: the seed is then one draw from it,
``int(torch.randint(2**62, (1,), generator=generator))``, so the same generator state gives the same edit.

Batches. A :class:`~specedit.method.Baseline` (no verification, so one token set for every sample) runs as
one batch of b. Any other method runs once per sample, each with its own seed: mixed-resolution sampling needs
one token set per batch and each sample's verifier chooses its own. The per-sample results are stacked
(``EditOutput.result`` then holds every run's events, so its NFE counts all b runs).

Offloading. :func:`borrowed` runs a module on another device on temporary copies of its tensors; the module
keeps its home tensors (e.g. CPU weights memory-mapped from the checkpoint), which are never freed nor copied
back. :class:`OnDemand` wraps a module kept on a home device so that each call runs, borrowed, on its input's
device; the pipelines keep offloaded VAEs that way and borrow their text encoders around prompt encoding.

Shape legend: b batch, z latent channels, h w latent pixels, H W image pixels, l text tokens.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass, replace
from functools import wraps
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from models.attention import use_backend
from models.imageio import load_image, pil_to_tensor, resize, tensor_to_pil
from models.loading import download, is_repo_id, read_config
from models.packing import pack
from samplers.field import NoiseField, area_resize
from samplers.guidance import Prompt, pad_prompts
from samplers.layout import scaled_grid
from samplers.mixed_res import FullResSampler, sync
from specedit.method import Baseline, EditResult
from specedit.viz import mask_overlay

TOKENS_PER_CELL = 4  # SpecEdit: a fine grid divisible by 4 (2x2 coarse cells, drafts 4x coarser per side)
OUTPUTS = ("pil", "np", "latent")


# ----------------------------------------------------------------------------------------------- methods
def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be >= 1 (an integer), got {steps!r}")
    return steps


def resolve_method(method, family: str, steps: int):
    """The method object of ``method``: "baseline" (``steps`` Euler steps on the model's schedule), a name of
    ``specedit.presets.methods(family)`` (its own step counts), or any object with ``run(editor, seed)``.
    ``steps`` is checked in every case and a bad name fails here, before any encoding."""
    check_steps(steps)
    if isinstance(method, str):
        if method == "baseline":
            return Baseline(FullResSampler(steps))
        from specedit import presets  # late: the presets' family registry imports the pipelines

        return presets.get(method, family)
    if callable(getattr(method, "run", None)):
        return method
    raise ValueError(
        f"method must be 'baseline', a preset name or an object with run(editor, seed), got {method!r:.80}"
    )


def full_resolution(method) -> bool:
    """Whether ``method`` samples the fine grid only (no coarse or mixed stage)."""
    return isinstance(method, Baseline) and isinstance(method.sampler, FullResSampler)


def grid_multiple(patch: int, vae_factor: int) -> int:
    """Image sides are multiples of this many pixels for SpecEdit: 4 tokens x ``patch`` latent pixels x the
    VAE's ``vae_factor`` (64 px for FLUX.1-Kontext and Qwen-Image-Edit)."""
    return TOKENS_PER_CELL * patch * vae_factor


def resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
    """``seed`` (default 0), or one draw ``int(torch.randint(2**62, (1,), generator=generator))``."""
    if generator is not None:
        if seed is not None:
            raise ValueError(f"give seed or generator, not both (seed={seed})")
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return int(torch.randint(2**62, (1,), generator=generator))
    seed = 0 if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return seed


# ----------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Sample:
    """One edit of a batch: its images (PIL images or [-1, 1] tensors), prompt and negative prompt."""

    images: list
    prompt: str
    negative: str | None


def split_batch(images, prompts, negative_prompt=None) -> list[Sample]:
    """The edits of one call (see the module docstring for the forms of ``images`` and ``prompts``)."""
    if isinstance(prompts, str):
        entries, texts = [images], [prompts]
    elif isinstance(prompts, Sequence) and prompts and all(isinstance(p, str) for p in prompts):
        texts = list(prompts)
        entries = [images] * len(texts) if _is_image(images) else images
        if not isinstance(entries, Sequence) or isinstance(entries, str) or len(entries) != len(texts):
            n = len(entries) if isinstance(entries, Sequence) else type(entries).__name__
            raise ValueError(
                f"{len(texts)} prompts need one image (shared) or {len(texts)} image entries, got {n}"
            )
    else:
        raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r:.80}")
    negatives = _per_sample(negative_prompt, len(texts))
    opened: dict[int, Any] = {}  # an input shared by several edits is opened (and later encoded) once
    return [
        Sample(_image_set(e, i, opened), t, n) for i, (e, t, n) in enumerate(zip(entries, texts, negatives))
    ]


def _per_sample(negative, b: int) -> list:
    if negative is None or isinstance(negative, str):
        return [negative] * b
    if isinstance(negative, Sequence) and len(negative) == b and all(isinstance(n, str) for n in negative):
        return list(negative)
    raise ValueError(f"negative_prompt must be None, a string or a list of {b} strings, got {negative!r:.80}")


def _is_image(x) -> bool:
    return isinstance(x, (Image.Image, np.ndarray, Tensor, str, os.PathLike))


def _image_set(entry, i: int, opened: dict) -> list:
    items = [entry] if _is_image(entry) else entry
    if not isinstance(items, Sequence) or isinstance(items, str) or len(items) == 0:
        raise ValueError(f"edit {i} has no input image (give at least the image being edited)")
    for k, x in enumerate(items):
        if id(x) not in opened:
            opened[id(x)] = open_image(x, f"images of edit {i}, item {k}")
    return [opened[id(x)] for x in items]


def open_image(x, where: str = "image") -> Image.Image | Tensor:
    """An input image as an RGB PIL image, or a float tensor (1, 3, H, W) in [-1, 1] (kept as given)."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[-1] != 3:
            raise ValueError(f"{where}: an array must be uint8 (H, W, 3), got {x.dtype} {x.shape}")
        return Image.fromarray(x)
    if not isinstance(x, (Image.Image, Tensor, str, os.PathLike)):
        raise ValueError(
            f"{where} must be a PIL image, a path, a uint8 array or a tensor, got {type(x).__name__}"
        )
    x = load_image(x)
    if not isinstance(x, Tensor):
        return x
    t = x[None] if x.ndim == 3 else x
    if t.ndim != 4 or t.shape[:2] != (1, 3) or not t.is_floating_point():
        raise ValueError(
            f"{where}: an image tensor must be float (1, 3, H, W) or (3, H, W) in [-1, 1], "
            f"got {x.dtype} {tuple(x.shape)}"
        )
    lo, hi = float(t.min()), float(t.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"{where}: an image tensor must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return t.detach().float().cpu()


def as_pil(image: Image.Image | Tensor) -> Image.Image:
    """A PIL image as is; a [-1, 1] tensor quantised to 8 bits."""
    return image if isinstance(image, Image.Image) else tensor_to_pil(image[0])


def image_size(image: Image.Image | Tensor) -> tuple[int, int]:
    """(width, height) of an opened input image."""
    return image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])


def working_image(image: Image.Image | Tensor, size: tuple[int, int]) -> Image.Image:
    """``image`` LANCZOS-resized to ``size`` = (width, height) as an 8-bit PIL image (what an edit shows)."""
    return resize(as_pil(image), *size)


def working_tensor(image: Image.Image | Tensor, size: tuple[int, int]) -> Tensor:
    """``image`` at ``size`` = (width, height) as (1, 3, H, W) float32 in [-1, 1]: a tensor already at that size
    as given, anything else LANCZOS-resized as 8-bit RGB (as the official pipelines resize VAE inputs)."""
    if isinstance(image, Tensor) and image_size(image) == tuple(size):
        return image
    return pil_to_tensor(resize(as_pil(image), *size))


def encode_images(samples: list[Sample], sizes: list[tuple[int, int]], encode) -> list[list[Tensor]]:
    """``encode(x)`` of every image of every sample, ``x`` (1, 3, H, W) the image at its working size
    (:func:`working_tensor`; ``sizes``: one per image, shared by the samples). An image shared by several
    samples is encoded once."""
    done: dict = {}
    out = []
    for s in samples:
        for im, size in zip(s.images, sizes):
            if (id(im), size) not in done:
                done[(id(im), size)] = encode(working_tensor(im, size))
        out.append([done[(id(im), size)] for im, size in zip(s.images, sizes)])
    return out


def same_sizes(plans: list, what: str = "working sizes") -> list:
    """The first sample's plan, after checking that every sample of the batch has the same one."""
    for i, p in enumerate(plans[1:], start=1):
        if p != plans[0]:
            raise ValueError(
                f"edit {i} of the batch has {what} {p} but edit 0 has {plans[0]}: the edits of one batch "
                "must share them (give height/width or edit them separately)"
            )
    return plans[0]


# ----------------------------------------------------------------------------------------------- files
def lora_file(source: str | os.PathLike) -> Path:
    """A LoRA file: a local path, or a hub file ``owner/repo/path/file.safetensors`` (downloaded once to the
    hub cache). Only ``.safetensors`` is read."""
    path = Path(source)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"LoRA {source}: only .safetensors files are read (got {path.suffix or 'no extension'!r})"
        )
    if path.is_file():
        return path
    parts = Path(source).as_posix().split("/")
    if len(parts) >= 3 and not path.is_absolute() and is_repo_id("/".join(parts[:2])):
        name = "/".join(parts[2:])
        return download("/".join(parts[:2]), [name]) / name
    raise ValueError(f"LoRA {source}: no such file (nor a hub file owner/repo/file.safetensors)")


def _distilled_steps(record, path: Path | None, distilled: bool | int | None, family: str) -> int | None:
    """The step count of a LoRA's distilled weights: recognised by ``record`` from the file name, or as the
    caller says (``distilled`` True: the record's largest, an int: that many, False: not distilled)."""
    if distilled is None:
        return record.match(str(path)) if record is not None and path is not None else None
    if distilled is False:
        return None
    if record is None:
        raise ValueError(f"family {family!r} has no step-distilled presets (distilled={distilled!r})")
    if distilled is True:
        return (record.match(str(path)) if path is not None else None) or max(record.steps.values())
    if isinstance(distilled, int) and distilled >= 1:
        return distilled
    raise ValueError(f"distilled must be None, a bool or a positive step count, got {distilled!r}")


def model_source(path_or_id, models: dict):
    """``models[path_or_id]`` for a model name (``specedit edit --model``) that is not an existing path, else
    ``path_or_id`` itself."""
    s = os.fspath(path_or_id)
    return models[s] if s in models and not Path(s).exists() else path_or_id


@dataclass(frozen=True)
class Component:
    """Where a repo keeps one component: any of ``folders``, or a ``single`` file in the root (a glob)."""

    folders: tuple[str, ...]
    single: str | None = None
    extensions: tuple[str, ...] = ("json", "safetensors")  # what a hub download fetches from the folder

    def found(self, root: Path) -> bool:
        return any((root / d).is_dir() for d in self.folders) or bool(
            self.single and any(root.glob(self.single))
        )

    def describe(self) -> str:
        other = [d + "/" for d in self.folders[1:]] + ([self.single] if self.single else [])
        return self.folders[0] + "/" + (f" (or {', '.join(other)})" if other else "")


def resolve_root(path_or_id, components: dict[str, Component], overrides: dict, *, what: str) -> Path:
    """The local repo folder (a hub id is downloaded: the components not overridden, the overridden ones'
    json configs, ``model_index.json`` and ``scheduler/``), checked for every component not overridden."""
    s = os.fspath(path_or_id)
    root = Path(s)
    if not root.exists():
        if not is_repo_id(s):
            raise FileNotFoundError(f"{s!r} is neither an existing folder nor a Hugging Face repo id")
        patterns = ["model_index.json", "scheduler/*.json"]
        for name, c in components.items():
            exts = ("json",) if name in overrides else c.extensions
            patterns += [f"{d}/*.{e}" for d in c.folders for e in exts]
        root = download(s, patterns)  # a gated repo without a token raises PermissionError naming HF_TOKEN
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: pass the {what} repo folder")
    missing = [c.describe() for name, c in components.items() if name not in overrides and not c.found(root)]
    if missing:
        first = next(n for n, c in components.items() if c.describe() == missing[0])
        raise FileNotFoundError(
            f"{root} lacks {', '.join(missing)}: not a {what} folder (or pass the component's path, e.g. {first}=...)"
        )
    return root


def component_config(file: Path, root: Path | None, folder: str) -> dict:
    """The config of a component given as one weights file: ``config.json`` beside the file, else the repo's
    ``folder/config.json``."""
    for c in (file.parent / "config.json", None if root is None else root / folder / "config.json"):
        if c is not None and c.is_file():
            return read_config(c)
    raise FileNotFoundError(
        f"{file} is a single weights file with no config.json beside it nor in {root}/{folder}/: put the "
        "component's config.json next to it"
    )


# ----------------------------------------------------------------------------------------------- devices
def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextmanager
def borrowed(module: nn.Module, device: str | torch.device):
    """Run ``module`` on ``device`` while it lives elsewhere: its parameters and buffers are swapped for copies
    on ``device`` for the duration and swapped back afterwards. Nothing is copied back and the home tensors
    (e.g. CPU weights memory-mapped from the checkpoint) are neither freed nor re-materialised, so an
    offloaded module costs one host-to-device copy per use. A module whose blocks stream themselves
    (``models.offload.offload_blocks``) is run as it is."""
    device = torch.device(device)
    if device_of(module) == device or getattr(module, "block_offload", None) is not None:
        yield module
        return
    saved = []
    for m in module.modules():
        for store in (m._parameters, m._buffers):
            for k, t in store.items():
                if t is not None:
                    saved.append((store, k, t))
                    copy = t.detach().to(device, non_blocking=True)
                    store[k] = nn.Parameter(copy, t.requires_grad) if isinstance(t, nn.Parameter) else copy
    try:
        yield module
    finally:
        for store, k, t in saved:
            store[k] = t


class OnDemand:
    """``module`` kept on ``home`` and run, borrowed (:func:`borrowed`), on the device of each call's first
    argument, which is cast to the module's dtype when it is floating point; results stay on that device, in
    the module's dtype. The module's own methods (``encode``, ``decode``, ...) and ``__call__`` are wrapped;
    ``nn.Module`` methods (``parameters``, ...) and plain attributes (``config``) pass through."""

    def __init__(self, module: nn.Module, home: str | torch.device):
        self.module, self.home = module, torch.device(home)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def __call__(self, x: Tensor, *args, **kwargs):
        return self._run(self.module.__call__, x, *args, **kwargs)

    def __getattr__(self, name: str):
        attr = getattr(self.module, name)
        if not callable(attr) or hasattr(nn.Module, name):
            return attr
        return wraps(attr)(lambda x, *args, **kwargs: self._run(attr, x, *args, **kwargs))

    def _run(self, fn, x: Tensor, *args, **kwargs):
        with borrowed(self.module, x.device):
            return fn(x.to(self.dtype) if x.is_floating_point() else x, *args, **kwargs)


# ----------------------------------------------------------------------------------------------- adapters
def check_references(refs: Sequence[Tensor], source: Tensor) -> None:
    """Raise unless every reference latent is (1 or b, z, even, even) for a (b, z, H, W) ``source``."""
    b, z = source.shape[:2]
    for i, r in enumerate(refs):
        if r.ndim != 4 or r.shape[1] != z or r.shape[0] not in (1, b) or r.shape[-1] % 2 or r.shape[-2] % 2:
            raise ValueError(f"refs[{i}] must be (1 or {b}, {z}, even, even), got {tuple(r.shape)}")


def check_inputs(model: torch.nn.Module, source: Tensor, tensors: dict, scalars: dict) -> None:
    """Raise, naming the input, unless every tensor and number is finite and the source latent has the
    transformer's dtype (the noise follows the source; mixing dtypes fails deep inside a matmul)."""
    for name, t in tensors.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} {tuple(t.shape)} contains NaN or inf")
    for name, x in scalars.items():
        if not math.isfinite(x):
            raise ValueError(f"{name} must be finite, got {x}")
    dtype = next(model.parameters(), source).dtype
    if source.dtype != dtype:
        raise ValueError(f"the source latent is {source.dtype} but the transformer's weights are {dtype}: "
                         f"cast one to the other")  # fmt: skip


def packed_references(latents: Sequence[Tensor], factor: float, batch: int) -> tuple[Tensor, tuple]:
    """Reference latents (1 or ``batch``, z, h_k, w_k) as one token stream for the editor adapters: each
    area-downsampled ``factor`` times per side (``samplers.layout.scaled_grid``), packed 2x2 and expanded to
    ``batch``, concatenated in order -> ((batch, sum r_k, 4z) tokens, their token grids)."""
    grids = tuple(scaled_grid((r.shape[-2] // 2, r.shape[-1] // 2), factor) for r in latents)
    tokens = [
        pack(area_resize(r, (2 * g[0], 2 * g[1]))).expand(batch, -1, -1) for r, g in zip(latents, grids)
    ]
    return torch.cat(tokens, 1), grids


# ----------------------------------------------------------------------------------------------- running
def run_method(method, editors: list, seed: int, stack, *, callback=None, progress: bool = False):
    """Run ``method`` on the b per-sample ``editors`` (see the module docstring); returns (the stacked result,
    the batch editor ``stack(editors)``)."""
    if len(editors) == 1:
        return method.run(editors[0], seed, callback=callback, progress=progress), editors[0]
    editor = stack(editors)
    if type(method) is Baseline:
        return _batched_baseline(method, editor, seed, callback, progress), editor
    runs = [method.run(e, seed + i, callback=callback, progress=progress) for i, e in enumerate(editors)]
    return stack_results(runs), editor


def _batched_baseline(method: Baseline, editor, seed: int, callback, progress: bool) -> EditResult:
    """One batched run whose sample i starts from the noise a batch-1 run seeded ``seed + i`` draws."""
    src = editor.source
    shape = (1, *src.shape[1:])
    fine = torch.cat([NoiseField.sample(shape, seed + i).fine for i in range(src.shape[0])])
    noise = NoiseField(fine.to(device=src.device, dtype=src.dtype), seed)
    traj = method.sampler.sample(editor, noise, None, callback=callback, progress=progress)
    return EditResult(latent=traj.latent, events=list(traj.events), seconds=dict(traj.seconds))


def stack_results(parts: list):
    """Per-sample results (dataclasses such as ``EditResult`` and its ``Verdict``) as one batch: tensors
    concatenated along dim 0, lists joined, dicts of numbers summed, nested dataclasses stacked likewise,
    anything else taken from the first."""
    first = parts[0]
    out = {}
    for f in (f for f in fields(first) if f.init):
        values = [getattr(p, f.name) for p in parts]
        v0 = values[0]
        if isinstance(v0, Tensor):
            out[f.name] = torch.cat(values)
        elif isinstance(v0, list):
            out[f.name] = [x for v in values for x in v]
        elif isinstance(v0, dict):
            out[f.name] = {
                k: sum(v.get(k, 0.0) for v in values) for k in dict.fromkeys(k for v in values for k in v)
            }
        elif is_dataclass(v0) and not isinstance(v0, type):
            out[f.name] = stack_results(values)
        else:
            out[f.name] = v0
    return replace(first, **out)


def stack_editors(editors: list, text: tuple[tuple[str, str], ...] = ()):
    """b batch-1 editors of one family and equal shapes as one editor of batch b: every tensor field (and
    tuple of tensors) concatenated along the batch, each (states, mask) pair in ``text`` right-padded to a
    common length with the padding masked out (``samplers.guidance.pad_prompts``), cache fields (a leading
    underscore) reset."""
    first, changes = editors[0], {}
    paired = {n for pair in text for n in pair}
    for f in (f for f in fields(first) if f.init):
        v0 = getattr(first, f.name)
        if f.name.startswith("_"):
            changes[f.name] = type(v0)()
        elif f.name not in paired and isinstance(v0, Tensor):
            changes[f.name] = torch.cat([getattr(e, f.name) for e in editors])
        elif isinstance(v0, tuple) and v0 and all(isinstance(t, Tensor) for t in v0):
            changes[f.name] = tuple(torch.cat(ts) for ts in zip(*(getattr(e, f.name) for e in editors)))
    for states, mask in text:
        if getattr(first, states) is not None:
            # pad_prompts carries text ids along; editors compute their own, so these are placeholders
            prompts = [getattr(e, states) for e in editors]
            p = pad_prompts(
                [Prompt(t, torch.zeros(t.shape[1], 1), getattr(e, mask)) for t, e in zip(prompts, editors)]
            )
            changes[states], changes[mask] = p.txt, p.mask
    return replace(first, **changes)


# ----------------------------------------------------------------------------------------------- output
def to_pil(pixels: Tensor) -> list[Image.Image]:
    """(b, 3, H, W) in [0, 1] -> b RGB images, ``round(255 x)`` as diffusers' ``numpy_to_pil``."""
    return [
        Image.fromarray(a) for a in (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    ]


def to_numpy(pixels: Tensor) -> np.ndarray:
    """(b, 3, H, W) in [0, 1] -> (b, H, W, 3) float32 in [0, 1], as diffusers' ``output_type="np"``."""
    return pixels.permute(0, 2, 3, 1).float().cpu().numpy()


@dataclass(frozen=True, eq=False)
class EditOutput:
    """One call's edits: the images, the latent, the method's account of its work and the editor.

    images: by ``output``, "pil": b PIL images; "np": (b, H, W, 3) float32 in [0, 1]; "latent": the latent
    (nothing decoded). pixels: (b, 3, H, W) float32 in [0, 1] on the CPU (None for "latent"). latent:
    (b, z, h, w) normalised. result: the method's ``EditResult`` (stacked over per-sample runs). editor: the
    batch's editor adapter. reference: the edited image of edit 0 at its working size. seconds: wall time
    per phase: "encode_prompt", "encode_image", "sample", "decode", "total". one_off: FLOPs of work done once
    per call outside sampling (prompt and image encoding, the final decode), where the family counts them.
    """

    images: Any
    latent: Tensor
    result: Any
    editor: Any
    reference: Image.Image | None = None
    pixels: Tensor | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    one_off: dict[str, float] = field(default_factory=dict)

    @property
    def image(self):
        """The first edit's image (a PIL image, an (H, W, 3) array or a (z, h, w) latent, as ``images``)."""
        return self.images[0]

    @property
    def mask(self) -> Tensor | None:
        """(hc, wc) bool cells the verifier sent to full resolution (first edit); None for baselines."""
        verdict = self.result.verdict
        return None if verdict is None else verdict.mask[0].detach().cpu()

    def flops(self) -> dict[str, float]:
        """FLOPs per sampling part (as ``EditResult.flops``); with one-off costs also "sampling", the one-off
        parts and a "total" that includes them."""
        out = self.result.flops(self.editor)
        if self.one_off:
            out["sampling"] = out.pop("total")
            out.update(self.one_off)
            out["total"] = out["sampling"] + sum(self.one_off.values())
        return out

    def overlay(self) -> Image.Image | None:
        """The reference with the verified cells tinted (None without a mask or a reference)."""
        return (
            None if self.mask is None or self.reference is None else mask_overlay(self.reference, self.mask)
        )


def finish(result, editor, output: str, seconds: dict, one_off: dict, reference, t0: float) -> EditOutput:
    """Decode (unless ``output`` is "latent") and convert; ``seconds`` gets "decode" and "total" (since ``t0``)."""
    t = time.perf_counter()
    pixels = images = None
    if output == "latent":
        images = result.latent
    else:
        pixels = (editor.decode(result.latent).float() / 2 + 0.5).clamp(0, 1).cpu()  # diffusers' postprocess
        images = to_pil(pixels) if output == "pil" else to_numpy(pixels)
    now = time.perf_counter()
    seconds = {**seconds, "decode": now - t, "total": now - t0}
    return EditOutput(images, result.latent, result, editor, reference, pixels, seconds, one_off)


# ----------------------------------------------------------------------------------------------- pipeline
@dataclass(frozen=True)
class Placement:
    """Where a pipeline's weights live. dtype: cast every floating weight (None keeps the files' dtypes). device:
    where the transformer runs and everything computes. offload_text_encoders: keep the text encoders on the CPU
    (they run on ``device`` on borrowed copies). vae_device: where the VAE is kept (None: ``device``).
    transformer_offload: None keeps the whole transformer on ``device``; an integer n >= 1 keeps its blocks in
    CPU memory (pinned on CUDA) and streams them through ``device``, at most n there at once, the next ones
    prefetched on a side stream (``models.offload``; 2 overlaps one copy with one block's compute). fp8: the
    transformer blocks' linear layers as float8_e4m3fn weights with per-output-channel scales, quantised at
    load time from the checkpoint (``models.fp8``). vae_tiling: None decodes and encodes whole images; an
    integer tile size in latent pixels (>= 2, e.g. 64: 512 px tiles at 8x) runs the VAE on tiles overlapping by
    a quarter tile, linearly blended (``models.tiling``). text_encoder_offload: None borrows the whole text
    encoder around prompt encoding; an integer n >= 1 (Qwen-Image-Edit's VL encoder) keeps its vision blocks
    and decoder layers memory-mapped on the CPU (not pinned: the map is kept) and streams them through
    ``device`` n at a time, the rest of the encoder (embeddings, norms, patch merger) on ``device``."""

    dtype: torch.dtype | None = None
    device: torch.device = torch.device("cpu")
    offload_text_encoders: bool = True
    vae_device: torch.device | None = None
    transformer_offload: int | None = None
    fp8: bool = False
    vae_tiling: int | None = None
    text_encoder_offload: int | None = None

    def __post_init__(self):
        from models.tiling import check_tiling

        for name in ("transformer_offload", "text_encoder_offload"):
            n = getattr(self, name)
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"{name} must be None or a number of resident blocks >= 1, got {n!r}")
        if not isinstance(self.fp8, bool):
            raise ValueError(f"fp8 must be True or False, got {self.fp8!r}")
        if self.vae_tiling is not None:
            check_tiling(self.vae_tiling, self.vae_tiling // 4 if isinstance(self.vae_tiling, int) else 0)

    def place_transformer(self, load) -> nn.Module:
        """``load(device)`` (the family's transformer loader) with fp8 and block offload applied: without
        either it loads on ``device``; with one it loads on the CPU (memory-mapped), quantises each layer on
        ``device`` (kept on the CPU when offloaded) and then moves the model or its non-block part there."""
        if not self.fp8 and self.transformer_offload is None:
            return load(self.device)
        from models.fp8 import quantize_fp8
        from models.offload import offload_blocks

        model = load(torch.device("cpu"))
        if self.fp8:
            keep = torch.device("cpu") if self.transformer_offload else self.device
            quantize_fp8(model, device=self.device, keep=keep)
        if self.transformer_offload is None:
            return model.to(self.device)
        offload_blocks(model, self.device, self.transformer_offload)
        return model

    def place_vae(self, vae: nn.Module) -> nn.Module:
        """``vae``, tiled (``models.tiling.TiledVAE``) when ``vae_tiling`` is set."""
        if self.vae_tiling is None:
            return vae
        from models.tiling import TiledVAE

        return TiledVAE(vae, self.vae_tiling)

    def place_text_encoder(self, encoder: nn.Module, lists) -> nn.Module:
        """``encoder`` (loaded on the CPU) with its block ``lists`` streamed through ``device`` when
        ``text_encoder_offload`` is set (``models.offload.offload_blocks`` with ``pin=False``)."""
        if self.text_encoder_offload is not None:
            from models.offload import offload_blocks

            offload_blocks(encoder, self.device, self.text_encoder_offload, lists=lists, pin=False)
        return encoder

    @property
    def text_home(self) -> torch.device:
        lean = self.offload_text_encoders or self.text_encoder_offload is not None
        return torch.device("cpu") if lean else self.device

    @property
    def vae_home(self) -> torch.device:
        return self.device if self.vae_device is None else self.vae_device


class EditPipeline:
    """The one ``from_pretrained`` and ``edit`` of every family's pipeline. A family sets ``family`` (its presets'
    name), ``default_steps`` and ``default_id``, and implements ``load`` (its components and settings),
    ``_options`` (check guidance options before any work), ``_prepare`` (samples -> per-sample editors, the
    reference image, seconds, one-off FLOPs), ``_stack`` (per-sample editors -> one batch editor) and
    ``_decode_flops`` (one-off FLOPs of the final decode)."""

    family: ClassVar[str]
    default_steps: ClassVar[int]
    default_id: ClassVar[str]
    loras: tuple[tuple[str, float], ...] = ()  # (name, scale) of each LoRA fused by load_lora, in order
    distilled_steps: int | None = None  # the step count of fused step-distilled weights (None: base weights)
    base_schedule = None  # the schedule to restore when distilled weights switched it
    attention: str = "sdpa"  # the models.attention backend edit samples with (set by use_attention)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        offload_text_encoders: bool = True,
        vae_device: str | torch.device | None = None,
        transformer_offload: int | None = None,
        fp8: bool = False,
        vae_tiling: int | None = None,
        text_encoder_offload: int | None = None,
        **options,
    ):
        """Load from a local repo folder, a hub id or a model name of the family's table (None: ``default_id``).

        dtype, device, offload_text_encoders, vae_device, transformer_offload (resident blocks), fp8, vae_tiling
        (tile size in latent pixels), text_encoder_offload (resident blocks): see :class:`Placement`; bad values
        raise before anything is loaded.
        options: the family's components (``transformer=``, ``vae=``, ``text_encoder=``, ...: a folder, a single
        file or a hub id instead of the repo's) and settings, as its ``load`` documents.
        """
        vae_home = None if vae_device is None else torch.device(vae_device)
        where = Placement(dtype, torch.device(device), offload_text_encoders, vae_home,
                          transformer_offload, fp8, vae_tiling, text_encoder_offload)  # fmt: skip
        return cls.load(cls.default_id if path_or_id is None else path_or_id, where, **options)

    # ------------------------------------------------------------------------------------------- LoRAs
    def transformer_module(self) -> nn.Module:
        """The denoising transformer LoRAs are fused into."""
        raise NotImplementedError

    def compile(self, mode: str | None = None, **options):
        """Compile the transformer in place (``models.compile.compile_transformer``; returns the pipeline):
        fullgraph, token counts dynamic (one graph for every stage and verifier bucket, compiled by the first
        edit), eager while a feature cache hooks the block stack. mode: ``torch.compile``'s (None,
        "max-autotune-no-cudagraphs", "reduce-overhead", ...); options: ``backend=``, ``fullgraph=``,
        ``dynamic_tokens=`` of :class:`models.compile.CompileOptions`."""
        from models.compile import CompileOptions, compile_transformer

        compile_transformer(self.transformer_module(), CompileOptions(mode, **options))
        return self

    def use_attention(self, name: str):
        """Sample with attention backend ``name`` (``models.attention.BACKENDS``: "sdpa", "flash", "cudnn",
        "efficient", "math", "fa3", "sage"); an unknown name or a missing package fails here."""
        from models.attention import check_backend

        self.attention = check_backend(name)
        return self

    def load_lora(self, source, scale: float = 1.0, *, distilled: bool | int | None = None) -> list[str]:
        """Fuse a LoRA into the transformer (``models.lora.fuse_lora``); returns the fused module paths.

        source: a ``.safetensors`` file, a hub file ``owner/repo/path/file.safetensors``, or a state dict.
        Step-distilled weights switch the pipeline to their schedule, CFG scale and step count (the defaults of
        ``edit`` until ``unload_loras``): the family's ``Distilled`` record recognises its published files by
        name (e.g. "Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors": Lightning schedule, CFG
        off, 4 steps); ``distilled`` True (or the step count) / False overrides the recognition.
        """
        from models.lora import fuse_lora
        from specedit.families import get_family

        if not math.isfinite(scale):
            raise ValueError(f"LoRA scale must be finite, got {scale}")
        record = get_family(self.family).distilled
        path = None if isinstance(source, dict) else lora_file(source)
        steps = _distilled_steps(record, path, distilled, self.family)
        fused = fuse_lora(self.transformer_module(), source if path is None else path, scale)
        self.loras = (*self.loras, ("state dict" if path is None else path.name, float(scale)))
        if steps is not None:
            if self.base_schedule is None:
                self.base_schedule = self.schedule
            self.schedule = record.schedule or self.base_schedule
            self.distilled_steps = steps
        return fused

    def unload_loras(self) -> list[str]:
        """Restore the transformer's weights bit for bit and the base schedule and defaults."""
        from models.lora import unfuse_lora

        restored = unfuse_lora(self.transformer_module())
        if self.base_schedule is not None:
            self.schedule, self.base_schedule = self.base_schedule, None
        self.loras, self.distilled_steps = (), None
        return restored

    def _distilled_defaults(self, method, runner, true_cfg_scale: float | None) -> float | None:
        """The CFG scale default of fused distilled weights; a method made for distilled weights is refused on
        base weights (a few-step schedule on base weights gives noise, not an edit)."""
        from specedit.families import get_family

        record = get_family(self.family).distilled
        if getattr(runner, "weights", "base") == "distilled" and self.distilled_steps is None:
            hint = f"; published ones: {record.source}" if record is not None and record.source else ""
            raise ValueError(
                f"method {method if isinstance(method, str) else type(runner).__name__!r} expects step-distilled "
                f"weights: fuse them first with load_lora(path) (--lora), or load_lora(path, distilled=True) for "
                f"a file not recognised by name{hint}"
            )
        if self.distilled_steps is not None and true_cfg_scale is None and record.cfg_scale is not None:
            return record.cfg_scale
        return true_cfg_scale

    @torch.no_grad()
    def edit(
        self,
        images,
        prompts,
        *,
        method="baseline",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        true_cfg_scale: float | None = None,
        negative_prompt=None,
        height: int | None = None,
        width: int | None = None,
        batched_cfg: bool = True,
        callback=None,
        progress: bool = False,
        output: str = "pil",
    ) -> EditOutput:
        """Edit ``images`` as ``prompts`` say with ``method`` ("baseline": ``steps`` Euler steps, by default the
        family's; a preset name of ``specedit.presets``; or an object with ``run(editor, seed)``). See the module
        docstring for batches, seeds and ``generator``; ``callback`` is passed to ``method.run``. The family
        documents ``guidance``, ``true_cfg_scale``, ``negative_prompt``, ``height`` and ``width``."""
        default = self.distilled_steps or self.default_steps
        runner = resolve_method(method, self.family, default if steps is None else steps)
        true_cfg_scale = self._distilled_defaults(method, runner, true_cfg_scale)
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        seed = resolve_seed(seed, generator)
        options = self._options(guidance, true_cfg_scale)
        samples = split_batch(images, prompts, negative_prompt)
        t0 = time.perf_counter()
        editors, reference, seconds, one_off = self._prepare(
            samples, options, height, width, batched_cfg, full_resolution(runner)
        )
        t1 = time.perf_counter()
        with use_backend(self.attention):
            result, editor = run_method(
                runner, editors, seed, self._stack, callback=callback, progress=progress
            )
        sync(result.latent)
        seconds["sample"] = time.perf_counter() - t1
        if output != "latent":
            one_off.update(self._decode_flops(result.latent))
        return finish(result, editor, output, seconds, one_off, reference, t0)

    def prepare(self, images, prompts, *, guidance=None, true_cfg_scale=None, negative_prompt=None,
                height=None, width=None, batched_cfg: bool = True, full_resolution: bool = False):  # fmt: skip
        """The batch's editor adapter (what ``edit`` samples with), without sampling. ``full_resolution``: size
        the images for a full-resolution method (the family may then keep its official rounding)."""
        samples = split_batch(images, prompts, negative_prompt)
        options = self._options(guidance, true_cfg_scale)
        editors = self._prepare(samples, options, height, width, batched_cfg, full_resolution)[0]
        return editors[0] if len(editors) == 1 else self._stack(editors)

    def _decode_flops(self, latent: Tensor) -> dict[str, float]:
        return {}
