"""T5 and CLIP tokenizers: id parity with transformers on tokenizer files the tests build themselves.

In transformers 5, ``T5TokenizerFast`` is ``T5Tokenizer`` and ``CLIPTokenizerFast`` is ``CLIPTokenizer``
(one tokenizers-backed class each); the sentencepiece-only path is checked against the same reference.
"""

import json

import pytest
import torch
from refs_text import PROMPTS, clip_tokenizer_files, t5_tokenizer_files
from transformers import CLIPTokenizer, T5TokenizerFast

from models.tokenization import (
    FastTokenizer,
    SentencePieceT5Tokenizer,
    load_clip_tokenizer,
    load_t5_tokenizer,
)


@pytest.fixture(scope="module")
def t5_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5tok")
    return {
        layout: t5_tokenizer_files(root / layout / "tokenizer_2", layout=layout)
        for layout in ("both", "legacy", "spiece")
    }


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return clip_tokenizer_files(tmp_path_factory.mktemp("cliptok") / "tokenizer")


def _hf(tok, max_length):
    return tok(
        PROMPTS, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


@pytest.mark.parametrize("max_length", [512, 12])
@pytest.mark.parametrize("layout", ["both", "legacy", "spiece"])
def test_t5_parity(t5_dirs, layout, max_length):
    """tokenizer.json as transformers writes it, an older-converter tokenizer.json, and spiece.model alone
    all give transformers' ids (its reference folder holds the tokenizer.json of the same pieces)."""
    ours = load_t5_tokenizer(t5_dirs[layout], max_length=max_length)
    assert isinstance(ours, SentencePieceT5Tokenizer if layout == "spiece" else FastTokenizer)
    ids = ours(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), max_length)
    ref_dir = t5_dirs["legacy" if layout == "legacy" else "both"]
    theirs = _hf(T5TokenizerFast.from_pretrained(ref_dir), max_length)
    for prompt, a, b in zip(PROMPTS, ids, theirs):
        assert torch.equal(a, b), prompt
    assert (ids == 2).sum() < 0.05 * (ids != 0).sum()  # the tiny vocabulary covers the prompts (few <unk>)


def test_t5_layout(t5_dirs):
    ids = load_t5_tokenizer(t5_dirs["both"])(PROMPTS)
    short, long = ids[0], ids[-1]
    n = int((short != 0).sum())
    assert short[n - 1] == 1 and (short[n:] == 0).all()  # </s> then <pad> (id 0)
    assert long[-1] == 1 and (long != 0).all()  # truncated to 512, the final </s> kept
    assert load_t5_tokenizer(t5_dirs["both"])("").tolist() == [[1] + [0] * 511]


@pytest.mark.parametrize("max_length", [77, 10])
def test_clip_parity(clip_dir, max_length):
    ids = load_clip_tokenizer(clip_dir, max_length=max_length)(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), max_length)
    theirs = _hf(CLIPTokenizer.from_pretrained(clip_dir), max_length)
    for prompt, a, b in zip(PROMPTS, ids, theirs):
        assert torch.equal(a, b), prompt


def test_clip_layout(clip_dir):
    vocab = json.loads((clip_dir / "vocab.json").read_text(encoding="utf-8"))
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    tok = load_clip_tokenizer(clip_dir)
    ids = tok(PROMPTS)
    assert (ids[:, 0] == bos).all()
    n = int((ids[0] != eos).sum())
    assert (ids[0, n:] == eos).all() and ids[0].argmax() == n  # EOT, then EOT padding; argmax finds the first
    assert ids[-1, -1] == eos and (ids[-1, 1:-1] != eos).all()  # truncated to 77 with BOS and EOS kept
    assert torch.equal(ids[3], ids[4])  # NFD input normalised to NFC
    assert (ids[1:2, 1:] != eos).sum() > 10 and (ids == 0).sum() == 0
    assert tok("a dog").shape == (1, 77)


def test_repo_roots(tmp_path, t5_dirs, clip_dir):
    """Folders are found under a repo root (``tokenizer_2/``, ``tokenizer/``)."""
    t5_root = t5_dirs["both"].parent
    assert torch.equal(
        load_t5_tokenizer(t5_root)(PROMPTS[:2]), load_t5_tokenizer(t5_dirs["both"])(PROMPTS[:2])
    )
    clip_root = clip_dir.parent
    assert torch.equal(
        load_clip_tokenizer(clip_root)(PROMPTS[:2]), load_clip_tokenizer(clip_dir)(PROMPTS[:2])
    )


def test_errors(tmp_path, t5_dirs, clip_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*tokenizer\.json or spiece\.model"):
        load_t5_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*vocab\.json"):
        load_clip_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither an existing path"):
        load_clip_tokenizer(str(tmp_path / "nowhere"))
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "vocab.json").write_text(
        (clip_dir / "vocab.json").read_text(encoding="utf-8"), encoding="utf-8"
    )
    with pytest.raises(FileNotFoundError, match="no merges.txt"):
        load_clip_tokenizer(partial)
    (partial / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match=r"merges\.txt:2: a merge is two"):
        load_clip_tokenizer(partial)
    tok = load_t5_tokenizer(t5_dirs["spiece"])
    for bad in (3, [], ["ok", None]):
        with pytest.raises(ValueError, match="a str or a non-empty list of str"):
            tok(bad)
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        load_clip_tokenizer(clip_dir, max_length=1)
    with pytest.raises(ValueError, match="max_length must be at least 1"):
        load_t5_tokenizer(t5_dirs["both"], max_length=0)
