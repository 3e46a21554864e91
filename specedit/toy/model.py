"""The toy editor: a small FLUX.1-Kontext-architecture editor built only from this library's modules.

- autoencoder: ``models.flux_ae`` at a small config, 4x per side, 8 latent channels (128^2 image -> 32^2 x 8
  latent -> a 16 x 16 grid of 32-channel tokens: 4 x 4 draft cells, 8 x 8 coarse cells);
- text encoder: ``models.clip`` at a small config, whose hidden states are the text stream and whose pooled
  output is the global vector; a word-level tokenizer built with ``tokenizers`` from the instruction
  vocabulary (``specedit.toy.data.vocabulary``);
- transformer: ``models.flux`` at d = 192 with 3 double + 6 single blocks, Kontext conditioning (reference
  tokens at id axis 0 = 1), no guidance embedding.

``ToyEditor.load()`` reads the weights shipped in ``specedit/toy/weights`` (safetensors, config.json and
manifest.json, the files' sha256); ``ToyEditor.save()`` writes such a folder as one set.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers.models import WordLevel
from torch import Tensor

from models.clip import CLIPText, CLIPTextConfig
from models.flux import Flux, FluxConfig
from models.flux_ae import AutoEncoder, FluxAEConfig
from models.loading import build_on_meta, load_checkpoint, open_checkpoint
from models.tokenization import FastTokenizer
from specedit.kontext.editor import KontextEditor
from specedit.toy import atomic
from specedit.toy.data import vocabulary

WEIGHTS = Path(__file__).parent / "weights"
IMAGE_SIZE = 128
TEXT_TOKENS = 16
SPECIALS = ("<unk>", "<bos>")  # ids 0, 1; the words follow; <eos> is the highest id (CLIP's argmax pooling)

TOY_AE = FluxAEConfig(
    in_channels=3,
    out_ch=3,
    ch=32,
    ch_mult=(1, 2, 2),
    num_res_blocks=1,
    z_channels=8,
    norm_groups=1,  # one group: the last norm keeps inter-channel (colour) structure; 8 learned colours far slower
    scale_factor=1.0,
    shift_factor=0.0,
)
# (the AE's scale/shift are set from the trained latents' statistics)
TOY_TEXT = CLIPTextConfig(
    vocab_size=len(vocabulary()) + len(SPECIALS) + 1,
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    max_positions=TEXT_TOKENS,
    eps=1e-5,
    eos_token_id=None,
)
TOY_DIT = FluxConfig(
    in_channels=4 * TOY_AE.z_channels,
    out_channels=4 * TOY_AE.z_channels,
    vec_in_dim=128,
    context_in_dim=128,
    hidden_size=192,
    mlp_ratio=4.0,
    num_heads=4,
    depth=3,
    depth_single_blocks=6,
    axes_dim=(8, 20, 20),
    theta=10_000,
    qkv_bias=True,
    guidance_embed=False,
)


def toy_tokenizer(max_length: int = TEXT_TOKENS, vocab_size: int | None = None) -> FastTokenizer:
    """Word-level tokenizer of the instruction vocabulary: <bos> words <eos>, padded with <eos>. ``vocab_size``
    (the text encoder's) keeps the first words of :func:`vocabulary` that fit, so an editor trained before the
    vocabulary grew keeps its ids (its unknown words become <unk>)."""
    words = vocabulary()
    if vocab_size is not None:
        if not len(SPECIALS) + 1 < vocab_size <= len(words) + len(SPECIALS) + 1:
            raise ValueError(
                f"a toy text encoder's vocab_size must be in 4..{len(words) + 3}, got {vocab_size}"
            )
        words = words[: vocab_size - len(SPECIALS) - 1]
    vocab = {t: i for i, t in enumerate([*SPECIALS, *words, "<eos>"])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return FastTokenizer(tok, max_length=max_length, pad_token="<eos>", eos_token="<eos>")


def images_to_tensor(images) -> Tensor:
    """uint8 (H, W, 3) arrays / a (b, H, W, 3) uint8 array or tensor / PIL images -> (b, 3, H, W) float32 in
    [-1, 1]. A floating-point tensor is taken as (b, 3, H, W) in [-1, 1] already."""
    if isinstance(images, Tensor) and images.is_floating_point():
        return images.float()
    if isinstance(images, Tensor):
        batch = images
    else:
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
        batch = torch.from_numpy(arr)
    return batch.permute(0, 3, 1, 2).float() / 127.5 - 1


@dataclass(eq=False)
class ToyEditor:
    """The toy editor's three networks and its tokenizer."""

    dit: Flux
    ae: AutoEncoder
    text: CLIPText
    tokenizer: FastTokenizer

    @classmethod
    def create(cls, *, ae_config: FluxAEConfig = TOY_AE, seed: int = 0) -> ToyEditor:
        """Freshly initialised networks (for training)."""
        torch.manual_seed(seed)
        return cls(Flux(TOY_DIT), AutoEncoder(ae_config), CLIPText(TOY_TEXT), toy_tokenizer())

    @classmethod
    def load(cls, path: str | os.PathLike = WEIGHTS, *, dtype=torch.float32, device="cpu") -> ToyEditor:
        """Load the weights written by :meth:`save` (default: the ones shipped with the package). A folder with a
        manifest.json is checked against it first (:func:`verify_manifest`); one without (older runs) is not."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"no toy editor in {path} (config.json missing); train one: specedit train-toy"
            )
        verify_manifest(path)
        cfg = json.loads((path / "config.json").read_text())
        ae_cfg = FluxAEConfig(**{**cfg["ae"], "ch_mult": tuple(cfg["ae"]["ch_mult"])})
        dit_cfg = FluxConfig(**{**cfg["dit"], "axes_dim": tuple(cfg["dit"]["axes_dim"])})
        text_cfg = CLIPTextConfig(**cfg["text"])
        nets = []
        for name, factory in (
            ("transformer", lambda: Flux(dit_cfg)),
            ("ae", lambda: AutoEncoder(ae_cfg)),
            ("text_encoder", lambda: CLIPText(text_cfg)),
        ):
            module = build_on_meta(factory)
            nets.append(
                load_checkpoint(
                    module, open_checkpoint(path / f"{name}.safetensors"), dtype=dtype, device=device
                )
            )
        return cls(*nets, toy_tokenizer(text_cfg.max_positions, text_cfg.vocab_size))

    @classmethod
    def average(cls, paths: list[str | os.PathLike]) -> ToyEditor:
        """The uniform mean of saved editors' transformer and text-encoder weights (a "model soup", Wortsman et
        al. 2022, arXiv:2203.05482), e.g. of consecutive fine-tuning stages. All must share one configuration and
        one autoencoder (checked before averaging), which the result keeps; it is computed in fp32."""
        if len(paths) < 2:
            raise ValueError(f"averaging needs two or more toy editors, got {len(paths)}")
        editors = [cls.load(p) for p in paths]
        first = editors[0]
        for path, other in zip(paths[1:], editors[1:]):
            if (other.dit.config, other.text.config) != (first.dit.config, first.text.config):
                raise ValueError(f"{path}: another network configuration than {paths[0]}; cannot average")
            same_ae = other.ae.config == first.ae.config and all(
                torch.equal(a, b)
                for a, b in zip(first.ae.state_dict().values(), other.ae.state_dict().values())
            )
            if not same_ae:
                raise ValueError(
                    f"{path}: another autoencoder than {paths[0]}; only editors sharing one average"
                )
        for name in ("dit", "text"):
            states = [getattr(e, name).state_dict() for e in editors]
            mean = {k: torch.stack([s[k].float() for s in states]).mean(0) for k in states[0]}
            getattr(first, name).load_state_dict(mean)
        return first

    def save(
        self,
        path: str | os.PathLike,
        *,
        dtype=torch.float16,
        extra: dict | None = None,
        manifest: dict | None = None,
    ) -> Path:
        """Write the editor as one set: the three networks (safetensors, ``dtype``), config.json (with ``extra``)
        and manifest.json (``manifest``'s fields, e.g. the training step, and the sha256 of the four files) go
        to a temporary sibling folder that then replaces ``path`` (:func:`specedit.toy.atomic.replace_folder`).

        An existing toy editor folder at ``path`` is replaced and its other files (e.g. a model card) are
        carried over; a file or a non-empty folder without config.json at ``path`` is refused."""
        path = Path(path)
        _check_replaceable(path)
        atomic.clean_stale(path.parent, lambda name: name == path.name)  # what a killed save left
        tmp = atomic.temp_sibling(path)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for name, module in (("transformer", self.dit), ("ae", self.ae), ("text_encoder", self.text)):
                state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}
                save_file(state, tmp / f"{name}.safetensors")
            cfg = {
                "dit": asdict(self.dit.config),
                "ae": asdict(self.ae.config),
                "text": asdict(self.text.config),
                **(extra or {}),
            }
            (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
            write_manifest(tmp, **(manifest or {}))
            _carry_over(path, tmp)
            return atomic.replace_folder(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def take_weights(self, donor: ToyEditor) -> ToyEditor:
        """Copy ``donor``'s transformer and text encoder into this editor. A donor with a smaller vocabulary
        (trained before the vocabulary grew) gives its words' embeddings; <eos> moves to the last id, and the
        new words start from small random vectors."""
        self.dit.load_state_dict(donor.dit.state_dict())
        state = donor.text.state_dict()
        key = "text_model.embeddings.token_embedding.weight"
        old, new = state[key], self.text.state_dict()[key]
        if old.shape[0] < new.shape[0]:
            grown = torch.randn(new.shape, generator=torch.Generator().manual_seed(0)) * 0.02
            grown[: old.shape[0] - 1] = old[:-1]
            grown[-1] = old[-1]  # <eos>: the highest id in both
            state[key] = grown.to(old.dtype)
        self.text.load_state_dict(state)
        return self

    def with_latent_stats(self, shift: float, scale: float) -> ToyEditor:
        """The same networks with the AE's latent normalisation set to (z - shift) * scale."""
        self.ae.config = replace(self.ae.config, shift_factor=float(shift), scale_factor=float(scale))
        return self

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    def encode_prompt(self, prompts: str | list[str]) -> tuple[Tensor, Tensor]:
        """(b, TEXT_TOKENS, 128) text states and (b, 128) pooled vector."""
        ids = self.tokenizer(prompts).to(self.device)
        return self.text(ids)

    def editor(self, images, prompts: str | list[str]) -> KontextEditor:
        """The SpecEdit adapter for editing ``images`` (uint8 arrays, PIL or [-1, 1] tensors) as ``prompts`` say."""
        x = images_to_tensor(images).to(self.device, next(self.ae.parameters()).dtype)
        txt, y = self.encode_prompt(prompts)
        source = self.ae.encode(x)
        if txt.shape[0] != source.shape[0]:
            raise ValueError(f"{source.shape[0]} images but {txt.shape[0]} prompts")
        return KontextEditor(self.dit, self.ae, txt, y, source, guidance=0.0)

    def edit(self, images, prompts: str | list[str], **options):
        """Edit ``images`` as ``prompts`` say: ``specedit.pipeline.EditPipeline.edit`` with the same keywords
        (``method="baseline"`` of 50 steps or a name of ``specedit.presets.methods("toy")``, ``seed``,
        ``output``, ...), returning a ``specedit.pipeline.EditOutput`` (see ``specedit.toy.pipeline``)."""
        from specedit.toy.pipeline import ToyPipeline  # late: the toy pipeline builds on specedit.kontext

        return ToyPipeline(self).edit(images, prompts, **options)


def save_weights(state: dict[str, Tensor], path: str | os.PathLike) -> None:
    """A safetensors file of ``state``, written atomically (temporary file, then rename)."""
    atomic.save_tensors(state, path)


# ----------------------------------------------------------------------------------------------- weight folders
EDITOR_FILES = ("transformer.safetensors", "ae.safetensors", "text_encoder.safetensors", "config.json")
MANIFEST = "manifest.json"


def write_manifest(path: str | os.PathLike, **fields) -> Path:
    """``path/manifest.json``: ``fields`` (e.g. ``step``) and ``files``, the sha256 of each of the editor's
    files (EDITOR_FILES) in ``path``; other files (a model card) are not covered and may change."""
    path = Path(path)
    missing = [n for n in EDITOR_FILES if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{path / missing[0]} is missing: no manifest for an incomplete toy editor")
    files = {n: atomic.sha256(path / n) for n in EDITOR_FILES}
    return atomic.write_json(path / MANIFEST, {**fields, "files": files})


def verify_manifest(path: str | os.PathLike) -> dict | None:
    """``path``'s manifest (None when there is none) after checking every file it lists: a missing file or a
    sha256 that differs (a damaged or partly copied folder) is a one-line error naming the file."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return None
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = dict(manifest["files"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ValueError(
            f"{path / MANIFEST} is not a toy editor manifest (no files with their sha256)"
        ) from None
    for name, digest in files.items():
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing (listed in {MANIFEST})")
        if atomic.sha256(path / name) != digest:
            raise ValueError(f"{path / name} does not match its sha256 in {MANIFEST} (damaged or changed)")
    return manifest


def _check_replaceable(path: Path) -> None:
    """Refuse to replace anything but a toy editor folder or an empty one."""
    atomic.check_folder(path, "toy editor folder")
    if path.is_dir() and not (path / "config.json").is_file() and any(path.iterdir()):
        raise ValueError(f"{path} is not empty and holds no toy editor (no config.json): not replacing it")


def _carry_over(old: Path, new: Path) -> None:
    """Copy the files of the editor folder ``old`` that are not the editor's own (e.g. a model card) into ``new``."""
    if not old.is_dir():
        return
    for item in old.iterdir():
        if item.name in (*EDITOR_FILES, MANIFEST) or (new / item.name).exists():
            continue
        if item.is_dir():
            shutil.copytree(item, new / item.name, symlinks=True)
        else:
            shutil.copy2(item, new / item.name, follow_symlinks=False)
