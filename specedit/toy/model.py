"""The toy editor: a small FLUX.1-Kontext-architecture editor built only from this library's modules.

- autoencoder: ``models.flux_ae`` at a small config, 4x per side, 8 latent channels (128^2 image -> 32^2 x 8
  latent -> a 16 x 16 grid of 32-channel tokens: 4 x 4 draft cells, 8 x 8 coarse cells);
- text encoder: ``models.clip`` at a small config, whose hidden states are the text stream and whose pooled
  output is the global vector; a word-level tokenizer built with ``tokenizers`` from the instruction
  vocabulary (``specedit.toy.data.vocabulary``);
- transformer: ``models.flux`` at d = 192 with 3 double + 6 single blocks, Kontext conditioning (reference
  tokens at id axis 0 = 1), no guidance embedding.

``ToyEditor.load()`` reads the weights shipped in ``specedit/toy/weights`` (safetensors + config.json).
"""

from __future__ import annotations

import json
import os
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
from specedit.kontext import KontextEditor
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


def toy_tokenizer(max_length: int = TEXT_TOKENS) -> FastTokenizer:
    """Word-level tokenizer of the instruction vocabulary: <bos> words <eos>, padded with <eos>."""
    words = vocabulary()
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
        """Load the weights written by :meth:`save` (default: the ones shipped with the package)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"no toy editor in {path} (config.json missing); train one: specedit train-toy"
            )
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
        return cls(*nets, toy_tokenizer(text_cfg.max_positions))

    def save(self, path: str | os.PathLike, *, dtype=torch.float16, extra: dict | None = None) -> None:
        """Write safetensors weights (``dtype``) and config.json to ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, module in (("transformer", self.dit), ("ae", self.ae), ("text_encoder", self.text)):
            state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}
            save_file(state, path / f"{name}.safetensors")
        cfg = {
            "dit": asdict(self.dit.config),
            "ae": asdict(self.ae.config),
            "text": asdict(self.text.config),
            **(extra or {}),
        }
        (path / "config.json").write_text(json.dumps(cfg, indent=1))

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

    @torch.no_grad()
    def edit(self, images, prompts: str | list[str], method, *, seed: int = 0):
        """Edit with any method of ``specedit.presets.methods()``; returns ((b, 3, H, W) in [-1, 1], EditResult)."""
        ed = self.editor(images, prompts)
        result = method.run(ed, seed)
        return ed.decode(result.latent).clamp(-1, 1), result


def save_weights(state: dict[str, Tensor], path: str | os.PathLike) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))
