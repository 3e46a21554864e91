"""The FLUX.1-Kontext-dev editor end to end: load the official repo, encode, edit (baseline or SpecEdit), decode.

``KontextPipeline.from_pretrained`` loads every component of ``black-forest-labs/FLUX.1-Kontext-dev`` with our
own modules: the diffusers folders (transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/,
tokenizer_2/, scheduler/) or BFL's single files in the repo root (flux1-kontext-dev.safetensors,
ae.safetensors), from a local folder or the hub. ``prepare`` turns an (image, prompt) pair into the SpecEdit
adapter :class:`~specedit.kontext.KontextEditor`; ``edit`` runs a method on it and decodes.

The steps are BFL's CLI / diffusers' ``FluxKontextPipeline`` (research memo models.md section 5.3):
reference -> preferred Kontext resolution (LANCZOS) -> AE posterior mean, normalised; prompt -> T5 over 512
padded tokens with no mask, CLIP pooled over 77; target size = reference size (in-place edit, BFL's
convention); seeded noise drawn on a CPU generator; one guidance-distilled forward per step; AE decode.
One deviation, for SpecEdit's 2x2 coarse grid and 4x draft: image sides are rounded to multiples of 64 px
(see :func:`edit_size`).

Shape legend: b prompts, l text tokens (512), H W image pixels, h w latent pixels (H/8, W/8), hc wc coarse
cells (H/32, W/32).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from models.clip import CLIPText, load_clip
from models.flux import Flux, load_flux
from models.flux_ae import AutoEncoder, FluxAEConfig, load_flux_ae
from models.flux_kontext import preferred_resolution
from models.imageio import load_image, pil_to_tensor, resize, tensor_to_pil
from models.loading import download, is_repo_id
from models.t5 import T5Encoder, load_t5
from models.tokenization import TextTokenizer, load_clip_tokenizer, load_t5_tokenizer
from samplers.mixed_res import FullResSampler
from samplers.schedules import FLUX_SCHEDULE, ShiftSchedule
from specedit import presets
from specedit.kontext.editor import KontextEditor
from specedit.method import Baseline
from specedit.viz import EditOutput

REPO_ID = "black-forest-labs/FLUX.1-Kontext-dev"
# component -> (diffusers folder, BFL single file in the repo root that may replace it)
COMPONENTS = {
    "transformer": ("transformer", "flux1-*.safetensors"),
    "vae": ("vae", "ae.safetensors"),
    "text_encoder": ("text_encoder", None),
    "text_encoder_2": ("text_encoder_2", None),
    "tokenizer": ("tokenizer", None),
    "tokenizer_2": ("tokenizer_2", None),
}
_HUB_PATTERNS = {
    "transformer": ["transformer/*.json", "transformer/*.safetensors"],
    "vae": ["vae/*.json", "vae/*.safetensors"],
    "text_encoder": ["text_encoder/*.json", "text_encoder/*.safetensors"],
    "text_encoder_2": ["text_encoder_2/*.json", "text_encoder_2/*.safetensors"],
    "tokenizer": ["tokenizer/*.json", "tokenizer/*.txt"],
    "tokenizer_2": ["tokenizer_2/*.json", "tokenizer_2/*.model"],
}
TOKENS_PER_CELL = 4  # SpecEdit: a fine grid divisible by 4 (2x2 coarse cells, drafts 4x coarser per side)


# ----------------------------------------------------------------------------------------------- sizes
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


# ----------------------------------------------------------------------------------------------- devices
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextmanager
def borrowed(module: nn.Module, device: torch.device):
    """Run ``module`` on ``device`` while it lives elsewhere: its tensors are swapped for copies on ``device``
    for the duration and swapped back afterwards. Nothing is copied back and the home copy (e.g. the CPU
    weights, possibly memory-mapped from the file) is never freed, so an offloaded encoder costs one
    host-to-device copy per use."""
    if _device_of(module) == device:
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


class OnDemandAE:
    """The FLUX AE kept on ``home`` and run, on borrowed copies (:func:`borrowed`), on the input's device.

    Stands in for :class:`~models.flux_ae.AutoEncoder` wherever the editor uses it (``config``, ``encode``,
    ``decode``, ``decoder_features``); inputs are cast to the AE's dtype, outputs stay in it. With ``home``
    equal to the main device it only casts.
    """

    def __init__(self, ae: AutoEncoder, home: str | torch.device):
        self.ae, self.home = ae, torch.device(home)

    @property
    def config(self) -> FluxAEConfig:
        return self.ae.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.ae.parameters()).dtype

    def encode(self, image: Tensor) -> Tensor:
        """(b, 3, H, W) in [-1, 1] -> (b, z, H/8, W/8) normalised posterior mean."""
        with borrowed(self.ae, image.device) as ae:
            return ae.encode(image.to(self.dtype))

    def decode(self, latent: Tensor) -> Tensor:
        """(b, z, h, w) normalised latent -> (b, 3, 8h, 8w) image, about [-1, 1]."""
        with borrowed(self.ae, latent.device) as ae:
            return ae.decode(latent.to(self.dtype))

    def decoder_features(self, latent: Tensor, taps: tuple[str, ...] = ("conv_in", "mid", "up0")):
        with borrowed(self.ae, latent.device) as ae:
            return ae.decoder_features(latent.to(self.dtype), taps)


# ----------------------------------------------------------------------------------------------- output
class KontextOutput(EditOutput):
    """A Kontext edit (see ``EditOutput``); seconds: "encode" (image and prompt), "sample", "decode", "total"."""


# ----------------------------------------------------------------------------------------------- pipeline
@dataclass(eq=False)
class KontextPipeline:
    """The loaded FLUX.1-Kontext-dev components and where they live.

    ``model`` runs on ``device``. ``ae`` lives on its ``home`` device and runs on ``device``. With
    ``offload_text_encoders`` the T5 and CLIP encoders live on the CPU and run on ``device`` only inside
    :meth:`encode_prompt`, on copies freed right after (:func:`borrowed`): they are offloaded, not freed, so
    the next prompt needs no reload. What stays on ``device`` is the transformer (22.2 GiB in bf16) and,
    unless ``vae_device`` keeps it elsewhere, the AE (0.16 GiB in bf16); encoding adds T5-XXL's 9 GiB for
    a moment (peak 31.3 GiB, measured on an H100 with random full-size weights at 1216x896).
    """

    model: Flux
    ae: OnDemandAE
    t5: T5Encoder
    clip: CLIPText
    t5_tokenizer: TextTokenizer
    clip_tokenizer: TextTokenizer
    device: torch.device
    schedule: ShiftSchedule = FLUX_SCHEDULE
    offload_text_encoders: bool = True

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike = REPO_ID,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        offload_text_encoders: bool = True,
        vae_device: str | torch.device | None = None,
        max_sequence_length: int = 512,
        **components: str | os.PathLike,
    ) -> KontextPipeline:
        """Load from a local repo folder or a hub repo id (gated: needs ``HF_TOKEN``).

        Args:
            path_or_repo: a folder in the diffusers layout, optionally with BFL's single files in its root
                (preferred by the loaders when present), or a repo id, of which only the component folders'
                configs, weights and tokenizer files are downloaded.
            dtype: cast every floating weight (e.g. ``torch.bfloat16``); None keeps the files' dtypes.
            device: where the transformer runs (and everything else computes).
            offload_text_encoders: keep T5/CLIP on the CPU between prompts (see the class docstring).
            vae_device: where the AE is kept between encode/decode calls (e.g. "cpu"); None = ``device``.
            max_sequence_length: T5 tokens (512 as in BFL and diffusers; at most 512).
            components: optional explicit paths (or repo ids) per component, overriding the repo's:
                transformer, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2.
        """
        unknown = sorted(set(components) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"unknown components {unknown}; choose from {sorted(COMPONENTS)}")
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in [1, 512], got {max_sequence_length}")
        device = torch.device(device)
        root = _resolve_root(path_or_repo, components)
        paths = {name: components.get(name, root) for name in COMPONENTS}
        text_home = torch.device("cpu") if offload_text_encoders else device
        ae_home = device if vae_device is None else torch.device(vae_device)
        pipe = cls(
            model=load_flux(paths["transformer"], dtype=dtype, device=device),
            ae=OnDemandAE(load_flux_ae(paths["vae"], dtype=dtype, device=ae_home), ae_home),
            t5=load_t5(paths["text_encoder_2"], dtype=dtype, device=text_home),
            clip=load_clip(paths["text_encoder"], dtype=dtype, device=text_home),
            t5_tokenizer=load_t5_tokenizer(paths["tokenizer_2"], max_length=max_sequence_length),
            clip_tokenizer=load_clip_tokenizer(paths["tokenizer"]),
            device=device,
            schedule=_schedule(root),
            offload_text_encoders=offload_text_encoders,
        )
        for module in (pipe.model, pipe.ae.ae, pipe.t5, pipe.clip):
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
        return TOKENS_PER_CELL * 2 * self.ae.config.factor

    def reference(
        self,
        image: Image.Image | str | os.PathLike | Tensor,
        *,
        height: int | None = None,
        width: int | None = None,
    ) -> Tensor:
        """The input at its working size (:func:`edit_size`) as (1, 3, H, W) float32 in [-1, 1] on the CPU.

        ``image``: a PIL image, a path, or a tensor (1, 3, H, W) / (3, H, W) in [-1, 1]. Resizing is LANCZOS on
        the 8-bit image (a tensor that needs resizing is quantised to 8 bits first; one at the working size is
        used as is).
        """
        image = load_image(image)
        if isinstance(image, Tensor):
            x = image[None] if image.ndim == 3 else image
            if x.ndim != 4 or x.shape[:2] != (1, 3) or not x.is_floating_point():
                raise ValueError(
                    f"an image tensor must be float (1, 3, H, W) or (3, H, W) in [-1, 1], "
                    f"got {x.dtype} {tuple(image.shape)}"
                )
            lo, hi = float(x.min()), float(x.max())
            if lo < -1.001 or hi > 1.001:
                raise ValueError(f"an image tensor must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
            w, h = edit_size((x.shape[-1], x.shape[-2]), height=height, width=width, multiple=self.multiple)
            if tuple(x.shape[-2:]) == (h, w):
                return x.detach().float().cpu()
            image = tensor_to_pil(x[0])
        elif not isinstance(image, Image.Image):
            raise ValueError(f"image must be a PIL image, a path or a tensor, got {type(image).__name__}")
        w, h = edit_size(image.size, height=height, width=width, multiple=self.multiple)
        return pil_to_tensor(resize(image.convert("RGB"), w, h))

    @torch.no_grad()
    def prepare(
        self,
        image: Image.Image | str | os.PathLike | Tensor,
        prompt: str | list[str],
        *,
        height: int | None = None,
        width: int | None = None,
        guidance: float = 2.5,
    ) -> KontextEditor:
        """Encode the reference and the prompt into the SpecEdit adapter.

        The reference is resized to :func:`edit_size` (the nearest preferred Kontext resolution, or
        ``height`` x ``width``; sides rounded to multiples of 64 px, see there), encoded to the AE's posterior
        mean (normalised) and kept in the transformer's dtype; it also fixes the output size (in-place edit).
        A list of b prompts edits the same image b ways.
        """
        return self._prepare(image, prompt, height=height, width=width, guidance=guidance)[0]

    def _prepare(self, image, prompt, *, height, width, guidance) -> tuple[KontextEditor, Tensor]:
        ref = self.reference(image, height=height, width=width)
        dtype = next(self.model.parameters()).dtype
        source = self.ae.encode(ref.to(self.device)).to(dtype)  # (1, z, h, w)
        txt, y = self.encode_prompt(prompt)
        source = source.expand(txt.shape[0], -1, -1, -1).contiguous()
        editor = KontextEditor(self.model, self.ae, txt, y, source, guidance=guidance, schedule=self.schedule)
        return editor, ref

    # ------------------------------------------------------------------------------------------- editing
    def method(self, method, *, steps: int = 28):
        """A method object: "baseline" (the model's schedule, ``steps`` Euler steps), a name from
        ``specedit.presets.methods("flux")`` (its own step counts), or an object with ``run``."""
        if isinstance(method, str):
            if method == "baseline":
                if steps < 1:
                    raise ValueError(f"steps must be >= 1, got {steps}")
                return Baseline(FullResSampler(steps))
            return presets.get(method, "flux")
        if not callable(getattr(method, "run", None)):
            raise ValueError(f"method must be a name or an object with run(editor, seed), got {method!r:.80}")
        return method

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """(b, z, h, w) normalised latent -> (b, 3, H, W) float32 in [0, 1] on the CPU."""
        return ((self.ae.decode(latent).float() + 1) / 2).clamp(0, 1).cpu()

    @torch.no_grad()
    def edit(
        self,
        image: Image.Image | str | os.PathLike | Tensor,
        prompt: str | list[str],
        *,
        method="baseline",
        steps: int = 28,
        guidance: float = 2.5,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        progress: bool = False,
    ) -> KontextOutput:
        """Edit ``image`` as ``prompt`` says with ``method`` (see :meth:`method`; ``steps`` applies to
        "baseline" only). The initial noise comes from a CPU generator seeded with ``seed``, so a seed gives
        the same edit on every device."""
        runner = self.method(method, steps=steps)  # fail on a bad name before any encoding
        t0 = time.perf_counter()
        editor, ref = self._prepare(image, prompt, height=height, width=width, guidance=guidance)
        _sync(self.device)
        t1 = time.perf_counter()
        result = runner.run(editor, seed, progress=progress)
        _sync(self.device)
        t2 = time.perf_counter()
        pixels = self.decode(result.latent)
        t3 = time.perf_counter()
        # as diffusers' numpy_to_pil: round(255 x) of the [0, 1] image
        arrays = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return KontextOutput(
            images=[Image.fromarray(a) for a in arrays],
            pixels=pixels,
            latent=result.latent,
            result=result,
            editor=editor,
            reference=tensor_to_pil(ref[0]),
            seconds={"encode": t1 - t0, "sample": t2 - t1, "decode": t3 - t2, "total": t3 - t0},
        )


# ----------------------------------------------------------------------------------------------- files
def _resolve_root(path_or_repo: str | os.PathLike, overrides: dict) -> Path | None:
    """The local repo folder (downloaded for a repo id), checked for every component not overridden."""
    needed = [name for name in COMPONENTS if name not in overrides]
    s = os.fspath(path_or_repo)
    root = Path(s)
    if not root.exists():
        if not is_repo_id(s):
            raise FileNotFoundError(f"{s!r} is neither an existing folder nor a Hugging Face repo id")
        if not needed:
            return None
        patterns = ["model_index.json", "scheduler/*.json"]
        patterns += [p for name in needed for p in _HUB_PATTERNS[name]]
        root = download(s, patterns)  # a gated repo without a token raises PermissionError naming HF_TOKEN
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: pass the FLUX.1-Kontext-dev repo folder")
    missing = []
    for name in needed:
        folder, single = COMPONENTS[name]
        if not (root / folder).is_dir() and not (single and any(root.glob(single))):
            missing.append(f"{folder}/" + (f" (or {single})" if single else ""))
    if missing:
        raise FileNotFoundError(
            f"{root} lacks {', '.join(missing)}: a FLUX.1-Kontext-dev folder holds transformer/, vae/, "
            f"text_encoder/, text_encoder_2/, tokenizer/ and tokenizer_2/ (or pass a component's path, "
            f"e.g. text_encoder_2=...)"
        )
    return root


def _schedule(root: Path | None) -> ShiftSchedule:
    """The sigma schedule of ``scheduler/scheduler_config.json``; FLUX.1's when the file is absent."""
    path = None if root is None else root / "scheduler" / "scheduler_config.json"
    if path is None or not path.is_file():
        return FLUX_SCHEDULE
    try:
        c = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not c.get("use_dynamic_shifting", False) or c.get("time_shift_type", "exponential") != "exponential":
        raise ValueError(f"{path}: only the exponential resolution-dependent shift (FLUX's) is supported")
    return ShiftSchedule(
        base_seq_len=c.get("base_image_seq_len", 256),
        max_seq_len=c.get("max_image_seq_len", 4096),
        base_shift=c.get("base_shift", 0.5),
        max_shift=c.get("max_shift", 1.15),
        shift_terminal=c.get("shift_terminal"),
    )
