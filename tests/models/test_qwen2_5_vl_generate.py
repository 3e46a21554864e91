"""Qwen2.5-VL-Instruct as a text generator: LM head loading (untied and tied), first-step logits and greedy
generation with the KV cache, against transformers' ``Qwen2_5_VLForConditionalGeneration`` on tiny random
models loaded through our loader from safetensors + config.json.

The reference gets ``mm_token_type_ids`` (1 on ``<|image_pad|>``, 0 elsewhere) in the forward and in
``generate``: without them transformers >= 5 gives the image tokens 1-D positions and sets ``rope_deltas`` to 0,
so every new token's position would be 1-D too. With them, ``generate`` runs ``get_rope_index`` on the prompt
and places new tokens at prompt length + ``rope_deltas`` (= the largest prompt position + 1, then + 1 per
step); the tests check its ``rope_deltas`` against our positions. The tiny configs set no eos token, so both
sides generate ``max_new_tokens`` unless an eos id is passed.
"""

import json

import pytest
import torch
from refs import max_rel_err
from refs_vl import build_tokenizer_files, random_image, tiny_vl_reference
from safetensors import safe_open
from safetensors.torch import save_file

from models.loading import CheckpointError
from models.qwen2_5_vl import config_from_transformers, load_qwen2_5_vl
from models.qwen_processor import load_qwen_processor

TOL = 1e-5
NEW = 24
CHAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
)


def _save_new_names(ref, folder):
    """transformers >= 5 key names (``model.language_model.*``, ``model.visual.*``, top-level ``lm_head``)."""
    folder.mkdir()
    save_file({k: v.clone() for k, v in ref.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(ref.config.to_dict()))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tokenizer files, an untied reference saved in both key layouts (save_pretrained: the shipped legacy
    names), and a tied one saved by save_pretrained."""
    root = tmp_path_factory.mktemp("qwen_judge")
    ids = build_tokenizer_files(root)
    ref = tiny_vl_reference(seed=7, ids=ids)
    ref.save_pretrained(root / "shipped")
    _save_new_names(ref, root / "new")
    tied = tiny_vl_reference(seed=8, ids=ids, text=dict(tie_word_embeddings=True))
    tied.save_pretrained(root / "tied")
    return root, ids, ref, tied


def _prompts(root, texts, images):
    """Processor inputs, left-padded (the processor right-pads)."""
    inputs = load_qwen_processor(root)([CHAT.format(t) for t in texts], images)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for i, n in enumerate(mask.sum(1).tolist()):
        ids[i], mask[i] = ids[i].roll(ids.shape[1] - n), mask[i].roll(ids.shape[1] - n)
    return inputs


def _mm(ref, inputs):
    return (inputs["input_ids"] == ref.config.image_token_id).int()


def _ref_generate(ref, inputs, **kw):
    out = ref.generate(**inputs, mm_token_type_ids=_mm(ref, inputs), do_sample=False, **kw)
    return out[:, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize("layout", ["shipped", "new"])
@torch.no_grad()
def test_first_step_logits_match_transformers(files, layout):
    root, _, ref, _ = files
    ours = load_qwen2_5_vl(root / layout, lm_head=True)
    assert torch.equal(ours.lm_head.weight, ref.lm_head.weight)
    inputs = _prompts(root, ["Describe the image."], [random_image(112, 140, seed=1)])
    want = ref(**inputs, mm_token_type_ids=_mm(ref, inputs)).logits
    got = ours.logits(**inputs)
    assert got.shape == want.shape == (*inputs["input_ids"].shape, ours.config.vocab_size)
    assert max_rel_err(got[:, -1], want[:, -1]) <= TOL and max_rel_err(got, want) <= TOL
    one_d = ref(**inputs).logits  # what transformers computes without mm_token_type_ids
    assert max_rel_err(one_d, want) > 1e-3


@torch.no_grad()
def test_greedy_generate_matches_transformers(files):
    """One prompt, 24 new tokens: the same ids as transformers' greedy generate; the cached steps agree with
    a cache-free forward over prompt + generated tokens."""
    root, _, ref, _ = files
    ours = load_qwen2_5_vl(root / "new", lm_head=True)
    inputs = _prompts(root, ["Is the edit faithful to the instruction?"], [random_image(112, 140, seed=2)])
    want = _ref_generate(ref, inputs, max_new_tokens=NEW)
    got = ours.generate(**inputs, max_new_tokens=NEW, eos_token_id=None)
    assert got.shape == (1, NEW) and got.dtype == torch.long
    assert torch.equal(got, want)
    pos = ours.positions(inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"])
    assert ref.model.rope_deltas.tolist() == [[int(pos.max()) + 1 - inputs["input_ids"].shape[1]]]
    full = torch.cat([inputs["input_ids"], got], 1)
    l = inputs["input_ids"].shape[1]
    logits = ours.logits(full, None, inputs["pixel_values"], inputs["image_grid_thw"])
    assert torch.equal(logits[0, l - 1 : -1].argmax(-1), got[0])


@torch.no_grad()
def test_left_padded_batch_matches_transformers(files):
    """Two prompts of different lengths and image sizes, left-padded: the same ids as transformers, and
    each row as it generates alone."""
    root, _, ref, _ = files
    ours = load_qwen2_5_vl(root / "shipped", lm_head=True)
    texts = ["Describe the image.", "Does the second image follow the instruction: make the sky purple?"]
    images = [random_image(112, 140, seed=3), random_image(84, 56, seed=4)]
    inputs = _prompts(root, texts, images)
    assert not inputs["attention_mask"][:, 0].all()
    got = ours.generate(**inputs, max_new_tokens=NEW)
    assert torch.equal(got, _ref_generate(ref, inputs, max_new_tokens=NEW))
    for i in range(2):
        alone = _prompts(root, texts[i : i + 1], images[i : i + 1])
        assert torch.equal(ours.generate(**alone, max_new_tokens=NEW), got[i : i + 1])


@torch.no_grad()
def test_eos_stops_and_pads_like_transformers(files):
    """An eos id that both rows of the free run hold, first at different steps: each row ends at its first
    eos, the earlier one is padded, and generation stops once both have ended, as transformers does."""
    root, ids, ref, _ = files
    ours = load_qwen2_5_vl(root / "new", lm_head=True)
    texts = ["Describe the image.", "Is the edit faithful?"]
    inputs = _prompts(root, texts, [random_image(112, 140, seed=5), random_image(56, 84, seed=6)])
    free = ours.generate(**inputs, max_new_tokens=NEW)
    rows = free.tolist()
    eos = next(t for t in rows[0] if t in rows[1] and rows[0].index(t) != rows[1].index(t))
    ends = [r.index(eos) for r in rows]
    pad = ids["<|endoftext|>"]
    got = ours.generate(**inputs, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=pad)
    want = _ref_generate(ref, inputs, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(got, want) and got.shape == (2, max(ends) + 1)
    for r, free_row, end in zip(got.tolist(), rows, ends):
        assert r[: end + 1] == free_row[: end + 1] and set(r[end + 1 :]) <= {pad}
    unused = next(t for t in range(ours.config.vocab_size) if t not in free)
    assert torch.equal(
        ours.generate(**inputs, max_new_tokens=NEW, eos_token_id=[unused, eos], pad_token_id=pad), got
    )
    assert torch.equal(ours.generate(**inputs, max_new_tokens=NEW, eos_token_id=unused), free)


@torch.no_grad()
def test_tied_head(files, tmp_path):
    """tie_word_embeddings: the embedding matrix is the head; save_pretrained's folder (no lm_head.weight)
    and a file that stores the copy anyway both load; logits and generation match transformers."""
    root, _, _, tied = files
    emb = tied.model.language_model.embed_tokens.weight
    assert tied.lm_head.weight.data_ptr() == emb.data_ptr()
    assert config_from_transformers(tied.config.to_dict()).tie_word_embeddings
    with safe_open(root / "tied" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    _save_new_names(tied, tmp_path / "tied_with_copy")
    inputs = _prompts(root, ["Describe the image."], [random_image(112, 140, seed=7)])
    want = tied(**inputs, mm_token_type_ids=_mm(tied, inputs)).logits
    for folder in (root / "tied", tmp_path / "tied_with_copy"):
        ours = load_qwen2_5_vl(folder, lm_head=True)
        assert ours.lm_head is None and not any(k.startswith("lm_head") for k in ours.state_dict())
        assert ours.head_weight() is ours.model.embed_tokens.weight
        assert max_rel_err(ours.logits(**inputs), want) <= TOL
    got = ours.generate(**inputs, max_new_tokens=NEW)
    assert torch.equal(got, _ref_generate(tied, inputs, max_new_tokens=NEW))


@torch.no_grad()
def test_encoder_path_unchanged(files):
    """lm_head=False (the default): no head, lm_head.weight skipped, the same states as the judge model."""
    root, _, _, _ = files
    enc = load_qwen2_5_vl(root / "new")
    judge = load_qwen2_5_vl(root / "new", lm_head=True)
    assert enc.lm_head is None and "lm_head.weight" not in enc.state_dict()
    assert "lm_head.weight" in judge.state_dict()
    inputs = _prompts(root, ["Describe the image.", "Hi"], [random_image(56, 56, seed=8)] * 2)
    assert torch.equal(enc.encode(**inputs), judge.encode(**inputs))


# ----------------------------------------------------------------------------------------------- bad input
@torch.no_grad()
def test_bad_inputs(files, tmp_path):
    root, _, ref, _ = files
    ours = load_qwen2_5_vl(root / "new", lm_head=True)
    inputs = _prompts(root, ["Describe the image.", "Hi"], [random_image(56, 56, seed=9)] * 2)
    for bad in (0, -3, 2.0):
        with pytest.raises(ValueError, match=rf"^max_new_tokens must be an int >= 1, got {bad}$"):
            ours.generate(**inputs, max_new_tokens=bad)
    right = load_qwen_processor(root)(
        [CHAT.format("Describe the image."), CHAT.format("Hi")], [random_image(56, 56)] * 2
    )
    with pytest.raises(
        ValueError, match=r"^generate needs left padding, but prompt rows \[1\] end with padding$"
    ):
        ours.generate(**right, max_new_tokens=2)
    with pytest.raises(ValueError, match="^this Qwen2_5_VL was built without an LM head: pass lm_head=True$"):
        load_qwen2_5_vl(root / "new").generate(**inputs, max_new_tokens=2)
    headless = tmp_path / "headless"
    headless.mkdir()
    sd = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, headless / "model.safetensors")
    (headless / "config.json").write_text(json.dumps(ref.config.to_dict()))
    load_qwen2_5_vl(headless)  # the encoder needs no head
    with pytest.raises(CheckpointError, match=r"1 missing: lm_head\.weight"):
        load_qwen2_5_vl(headless, lm_head=True)
