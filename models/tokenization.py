"""FLUX's two tokenizers, built from the official files with ``tokenizers`` / ``sentencepiece`` only.

Both return fixed-length ids the way the FLUX pipelines ask for them (``padding="max_length",
truncation=True``): a (b, max_length) ``torch.long`` tensor.

* T5 (``tokenizer_2/``): ``tokenizer.json`` when present (loaded as written), else ``spiece.model`` through
  sentencepiece. Appends ``</s>``, truncates to ``max_length`` (512) keeping that final ``</s>``, pads with
  ``<pad>`` (id 0). No BOS.
* CLIP (``tokenizer/``: ``vocab.json`` + ``merges.txt``, no ``tokenizer.json`` in the official repos):
  NFC, whitespace runs -> one space, lowercase; the CLIP split regex; byte-level BPE whose word-final pieces
  end in ``</w>``; ``<|startoftext|>`` ... ``<|endoftext|>``; truncated to 77 keeping both, padded with the
  pad token (``<|endoftext|>`` in the official ``special_tokens_map.json``).

Nothing here touches the network unless a Hugging Face repo id is passed to a ``load_*`` function.
Reference: transformers ``T5Tokenizer`` / ``CLIPTokenizer``; openai/CLIP ``simple_tokenizer.py``.

Shape legend: b prompts, l = max_length.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from torch import Tensor

from models.loading import download, is_repo_id, read_config

# OpenAI CLIP's pre-tokenizer: contractions, letter runs, single digits, runs of other non-space symbols
CLIP_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"


class TextTokenizer:
    """``tok(text)``, text a str or a list of str -> (b, max_length) ``torch.long`` ids, padded, truncated."""

    def __init__(self, *, max_length: int, pad_id: int, eos_id: int, n_special: int):
        if max_length < n_special:
            raise ValueError(
                f"max_length must be at least {n_special} (the special tokens), got {max_length}"
            )
        self.max_length, self.pad_id, self.eos_id = max_length, pad_id, eos_id

    def __call__(self, text: str | Sequence[str]) -> Tensor:
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(
                f"expected a str or a non-empty list of str, got {type(text).__name__} {text!r:.80}"
            )
        return torch.tensor(self.encode_batch(list(texts)), dtype=torch.long)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError


class FastTokenizer(TextTokenizer):
    """A ``tokenizers.Tokenizer`` whose post-processor adds the special tokens; truncation and padding to
    ``max_length`` are delegated to it (it reserves room for the specials, as transformers does)."""

    def __init__(self, backend: Tokenizer, *, max_length: int, pad_token: str, eos_token: str):
        pad_id, eos_id = backend.token_to_id(pad_token), backend.token_to_id(eos_token)
        if pad_id is None or eos_id is None:
            raise ValueError(f"the tokenizer vocabulary lacks {pad_token!r} or {eos_token!r}")
        n_special = backend.post_processor.num_special_tokens_to_add(False) if backend.post_processor else 0
        super().__init__(max_length=max_length, pad_id=pad_id, eos_id=eos_id, n_special=n_special)
        self.backend = backend
        backend.enable_truncation(max_length)
        backend.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts)]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()


class SentencePieceT5Tokenizer(TextTokenizer):
    """T5 from ``spiece.model`` alone: sentencepiece pieces + ``</s>``, truncated and padded by hand.

    Sentinel tokens (``<extra_id_N>``) are not recognised in the text; FLUX prompts never contain them.
    """

    def __init__(self, model_file: str | os.PathLike, *, max_length: int):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=os.fspath(model_file))
        pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.piece_to_id("<pad>")
        eos_id = self.sp.eos_id()
        if eos_id < 0 or self.sp.id_to_piece(pad_id) != "<pad>":
            raise ValueError(
                f"{model_file} defines no </s> or <pad> piece; it is not a T5 sentencepiece model"
            )
        super().__init__(max_length=max_length, pad_id=pad_id, eos_id=eos_id, n_special=1)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        out = []
        for ids in self.sp.encode(texts):
            ids = ids[: self.max_length - 1] + [self.eos_id]  # truncation keeps the final </s>
            out.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return out

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()


# ----------------------------------------------------------------------------------------------- T5
def load_t5_tokenizer(path_or_repo: str | os.PathLike, *, max_length: int = 512) -> TextTokenizer:
    """The T5 tokenizer of a ``tokenizer_2/`` folder, a repo root holding one, or a hub repo id."""
    folder = _locate(path_or_repo, "tokenizer_2", ("tokenizer.json", "spiece.model"), ["*.json", "*.model"])
    specials = _special_tokens(folder)
    if (folder / "tokenizer.json").is_file():
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        eos = specials.get("eos_token", "</s>")
        if backend.post_processor is None:  # T5 always ends a sequence with </s>
            backend.post_processor = processors.TemplateProcessing(
                single=f"$A {eos}", special_tokens=[(eos, _id(backend, eos, folder))]
            )
        pad = specials.get("pad_token", "<pad>")
        _id(backend, pad, folder)
        return FastTokenizer(backend, max_length=max_length, pad_token=pad, eos_token=eos)
    return SentencePieceT5Tokenizer(folder / "spiece.model", max_length=max_length)


# ----------------------------------------------------------------------------------------------- CLIP
def load_clip_tokenizer(path_or_repo: str | os.PathLike, *, max_length: int = 77) -> TextTokenizer:
    """The CLIP tokenizer of a ``tokenizer/`` folder (vocab.json + merges.txt), a repo root, or a repo id."""
    folder = _locate(path_or_repo, "tokenizer", ("vocab.json",), ["*.json", "*.txt"])
    if not (folder / "merges.txt").is_file():
        raise FileNotFoundError(f"{folder} has vocab.json but no merges.txt")
    try:
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / 'vocab.json'} is not valid JSON: {e}") from None
    merges = read_merges(folder / "merges.txt")
    s = _special_tokens(folder)
    return clip_tokenizer(
        vocab,
        merges,
        bos=s.get("bos_token", "<|startoftext|>"),
        eos=s.get("eos_token", "<|endoftext|>"),
        pad=s.get("pad_token", "<|endoftext|>"),
        unk=s.get("unk_token", "<|endoftext|>"),
        max_length=max_length,
    )


def clip_tokenizer(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    *,
    bos: str = "<|startoftext|>",
    eos: str = "<|endoftext|>",
    pad: str = "<|endoftext|>",
    unk: str = "<|endoftext|>",
    max_length: int = 77,
) -> FastTokenizer:
    """Assemble the CLIP BPE tokenizer from its vocabulary and merge list."""
    missing = [t for t in dict.fromkeys((bos, eos, pad, unk)) if t not in vocab]
    if missing:
        raise ValueError(f"special tokens {missing} are not in the CLIP vocabulary")
    tok = Tokenizer(BPE(vocab, merges, unk_token=unk, end_of_word_suffix="</w>", fuse_unk=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # keep the regex matches, drop what lies between them (the spaces)
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    # written specials in a prompt map to their ids instead of being split into pieces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys((bos, eos))])
    return FastTokenizer(tok, max_length=max_length, pad_token=pad, eos_token=eos)


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``merges.txt`` -> [(left, right), ...] in rank order (a ``#version`` header line is skipped)."""
    merges = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if (n == 1 and line.startswith("#version")) or not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: a merge is two space-separated pieces, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


# ----------------------------------------------------------------------------------------------- files
def _locate(path_or_repo: str | os.PathLike, sub: str, markers: tuple[str, ...], patterns: list[str]) -> Path:
    s = os.fspath(path_or_repo)
    p = Path(s)
    if not p.exists():
        if not is_repo_id(s):
            raise FileNotFoundError(f"{s!r} is neither an existing path nor a Hugging Face repo id")
        p = download(s, [f"{sub}/{pat}" for pat in patterns])
    if p.is_dir() and any((p / m).is_file() for m in markers):
        return p
    if (p / sub).is_dir():
        return _locate(p / sub, sub, markers, patterns)
    raise FileNotFoundError(f"no tokenizer in {p}: expected {' or '.join(markers)}, or a {sub}/ folder")


def _special_tokens(folder: Path) -> dict[str, str]:
    """Special-token strings from special_tokens_map.json, else tokenizer_config.json (str or AddedToken)."""
    out: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the map wins: read it last
        path = folder / name
        if not path.is_file():
            continue
        data = read_config(path)
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            v = data.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                out[key] = v
    return out


def _id(tok: Tokenizer, token: str, folder: Path) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise ValueError(f"{folder / 'tokenizer.json'} has no token {token!r}")
    return i
