"""Test-side helpers for Qwen2.5-VL and its processor: tiny transformers references and tokenizer files.

The tokenizer files are built here from a byte-level BPE trained on a few sentences, in the two layouts
the Qwen-Image-Edit repos ship (``processor/tokenizer.json``; ``tokenizer/vocab.json`` + ``merges.txt`` +
``added_tokens.json`` + ``tokenizer_config.json``), so that no real tokenizer has to be downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from refs import randomize_

QWEN_SPECIAL = (  # the Qwen2.5 added tokens in id order (151643 ...); special flag as in the official files
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
# The Qwen2 pre-tokenizer split (the official tokenizer.json's Split regex).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
CORPUS = [
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image.",
    "Generate a new image that meets the user's requirements while maintaining consistency with the "
    "original input where appropriate.",
    "Picture 1: Picture 2: make the sky purple and add a red kite; replace the cat with a dog.",
    "Ünïcödé façade, 日本語のテキスト, emoji 🙂 and numbers 12345 67.89\n\ttabs  and   spaces",
    "system user assistant",
]


def build_tokenizer_files(root: Path, vocab_size: int = 400) -> dict[str, int]:
    """Write ``root/processor/tokenizer.json`` and ``root/tokenizer/{vocab.json, merges.txt, ...}``.

    Returns the special token ids. The base BPE vocabulary comes first, then the Qwen added tokens, as in
    the official files (there: 151643 base tokens).
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    base = tok.get_vocab_size()
    for content, special in QWEN_SPECIAL:
        t = AddedToken(content, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([t])
    ids = {c: tok.token_to_id(c) for c, _ in QWEN_SPECIAL}
    assert ids["<|endoftext|>"] == base

    proc = root / "processor"
    proc.mkdir(parents=True, exist_ok=True)
    tok.save(str(proc / "tokenizer.json"))
    # tokenizer/: the slow-tokenizer layout (vocab + merges + added tokens, no tokenizer.json)
    tdir = root / "tokenizer"
    tdir.mkdir(parents=True, exist_ok=True)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    (tdir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    (tdir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (tdir / "added_tokens.json").write_text(json.dumps({c: ids[c] for c, _ in QWEN_SPECIAL}))
    cfg = {
        "added_tokens_decoder": {
            str(ids[c]): {
                "content": c,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": s,
            }
            for c, s in QWEN_SPECIAL
        },
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 131072,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
    }
    (tdir / "tokenizer_config.json").write_text(json.dumps(cfg))
    (proc / "tokenizer_config.json").write_text(json.dumps(cfg))
    return ids


def tiny_vl_kwargs(
    vocab: int = 512, ids: dict[str, int] | None = None, text: dict | None = None, vision: dict | None = None
) -> dict:
    """transformers ``Qwen2_5_VLConfig`` kwargs of a tiny model ."""
    ids = ids or {
        "<|image_pad|>": vocab - 1,
        "<|video_pad|>": vocab - 2,
        "<|vision_start|>": vocab - 4,
        "<|vision_end|>": vocab - 3,
    }
    text_config = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
        use_sliding_window=False,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    text_config.update(text or {})
    vision_config = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        hidden_act="silu",
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        out_hidden_size=text_config["hidden_size"],
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    )
    vision_config.update(vision or {})
    return dict(
        text_config=text_config,
        vision_config=vision_config,
        tie_word_embeddings=False,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def tiny_vl_reference(seed: int = 0, **kw):
    """A randomised (std 0.1) transformers ``Qwen2_5_VLForConditionalGeneration`` in eval mode, sdpa."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(**tiny_vl_kwargs(**kw))
    cfg._attn_implementation = "sdpa"
    m = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    m.config._attn_implementation = "sdpa"
    return randomize_(m, std=0.1, seed=seed)


@torch.no_grad()
def reference_states(ref, input_ids, attention_mask, pixel_values, image_grid_thw):
    """transformers' final-normed last layer with CORRECT 3-D positions: ``mm_token_type_ids`` is passed.

    Without it transformers >= 5 falls back to 1-D positions (diffusers issue #14194)."""
    mm = (input_ids == ref.config.image_token_id).int()
    out = ref(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        mm_token_type_ids=mm,
        output_hidden_states=True,
    )
    return out.hidden_states[-1]


class MRopeTextEncoder(torch.nn.Module):
    """Wraps the transformers model so that diffusers' prompt encoding gets real 3-D positions.

    diffusers 0.42.1 calls the text encoder without ``mm_token_type_ids``; this adds them (0 text,
    1 image) and forwards everything else unchanged.
    """

    def __init__(self, ref):
        super().__init__()
        self.ref = ref

    @property
    def dtype(self):
        return self.ref.dtype

    def forward(self, input_ids=None, **kw):
        mm = (input_ids == self.ref.config.image_token_id).int()
        return self.ref(input_ids=input_ids, mm_token_type_ids=mm, **kw)


def random_image(h: int, w: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
    # smooth structure plus noise, so resampling filters matter
    yy, xx = np.mgrid[0:h, 0:w]
    arr[..., 0] = (arr[..., 0] // 4 + (128 + 100 * np.sin(xx / 7.0 + yy / 11.0)) * 0.75).astype(np.uint8)
    return Image.fromarray(arr)


def hf_processor(tokenizer_folder: Path, **image_kwargs):
    """transformers ``Qwen2VLProcessor`` over the PIL image processor and a ``Qwen2Tokenizer`` from files.

    Without torchvision, transformers 5.24 cannot type-check the (unused) video processor, so this subclass
    declares only the image processor and the tokenizer.
    """
    from transformers import Qwen2Tokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageTextProcessor(Qwen2VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    kw = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)
    kw.update(image_kwargs)
    return ImageTextProcessor(
        image_processor=Qwen2VLImageProcessorPil(**kw),
        tokenizer=Qwen2Tokenizer.from_pretrained(tokenizer_folder),
    )
