"""Qwen-Image-Edit prompt side: image processor, tokenizer and processor parity with transformers, and prompt
encoding parity with diffusers' Edit / Edit-2509 pipelines, on tokenizer files built by the tests.

About the diffusers comparison: diffusers 0.42.1 calls the text encoder without ``mm_token_type_ids``, so
transformers 5.24 gives the image tokens 1-D positions (diffusers issue #14194). Our
encoder implements the real 3-D M-RoPE, so the pipelines' own output is *not* the target. The pipelines run
here with the text encoder wrapped (``MRopeTextEncoder``) to add ``mm_token_type_ids``; everything else -
template, processor, ``<|image_pad|>`` expansion, drop-64, per-prompt extraction with the attention mask and
zero padding - is diffusers' own code. ``test_diffusers_positions_are_one_dimensional`` shows the difference
the wrapper removes, stage by stage.
"""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from refs import max_rel_err
from refs_vl import (
    MRopeTextEncoder,
    build_tokenizer_files,
    hf_processor,
    random_image,
    reference_states,
    tiny_vl_reference,
)
from transformers import Qwen2Tokenizer, Qwen2TokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from models.qwen2_5_vl import load_qwen2_5_vl
from models.qwen_processor import (
    DROP_TOKENS,
    EDIT_PLUS_TEMPLATE,
    EDIT_TEMPLATE,
    PICTURE_SLOT,
    QWEN_IMAGE_PROCESSOR,
    ImageProcessorConfig,
    edit_prompt_text,
    encode_edit_prompts,
    image_processor_config,
    load_qwen_processor,
    load_qwen_tokenizer,
    preprocess_image,
    smart_resize,
)

TOL = 1e-5
PROMPTS = ["make the sky purple", "replace the cat with a dog and add a red kite 🙂"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A repo-like root: processor/ (tokenizer.json), tokenizer/ (vocab + merges), text_encoder/ (tiny)."""
    root = tmp_path_factory.mktemp("qwen_edit")
    ids = build_tokenizer_files(root)
    ref = tiny_vl_reference(seed=11, ids=ids)
    ref.save_pretrained(root / "text_encoder")
    return root, ids, ref


# ----------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize(
    "size,bounds",
    [
        ((100, 100), {}),
        ((333, 517), {}),  # odd sides, rounding
        ((1024, 1024), {}),  # -> 1036^2, 74 x 74 patches
        ((20, 30), {}),  # below min_pixels: upscaled
        ((50, 900), {}),  # 1:18
        ((400, 300), {"max_pixels": 28 * 28 * 20}),  # above a small max_pixels: downscaled
        ((64, 200), {"min_pixels": 28 * 28 * 40}),  # below a large min_pixels
    ],
)
def test_image_processor_parity(size, bounds):
    """Bit-equal to transformers' PIL backend (the one used without torchvision)."""
    cfg = ImageProcessorConfig(**{**QWEN_IMAGE_PROCESSOR.__dict__, **bounds})
    ref = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    img = random_image(*size, seed=size[0])
    want = ref(images=[img], return_tensors="pt")
    pv, grid = preprocess_image(img, cfg)
    assert torch.equal(grid, want["image_grid_thw"])
    assert torch.equal(pv, want["pixel_values"])
    h, w = grid[0, 1:].tolist()
    assert cfg.min_pixels <= h * w * 14 * 14 <= cfg.max_pixels


def test_image_inputs_and_patch_order():
    """RGBA (white composite), greyscale and uint8 arrays match too; patches are merge-block-major with the
    image repeated over the two temporal taps."""
    ref = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)
    for img in (random_image(60, 90, seed=1, mode="RGBA"), random_image(70, 50, seed=2).convert("L")):
        assert torch.equal(preprocess_image(img)[0], ref(images=[img], return_tensors="pt")["pixel_values"])
    arr = np.asarray(random_image(56, 84, seed=3))
    pv, grid = preprocess_image(arr)
    assert torch.equal(pv, preprocess_image(random_image(56, 84, seed=3))[0])
    x = pv.view(2, 3, 2, 2, 3, 2, 14, 14)  # (h/2, w/2, 2, 2, c, t, p, p) for the 56 x 84 image
    assert torch.equal(x[:, :, :, :, :, 0], x[:, :, :, :, :, 1])
    mean, std = torch.tensor(QWEN_IMAGE_PROCESSOR.image_mean), torch.tensor(QWEN_IMAGE_PROCESSOR.image_std)
    img = torch.from_numpy(arr.copy()).permute(2, 0, 1).double() / 255
    # patch (block row 1, block col 2, sub-row 0, sub-col 1) = pixel rows 28..41, cols 70..83
    want = ((img[:, 28:42, 70:84].float() - mean[:, None, None]) / std[:, None, None]).float()
    assert torch.allclose(x[1, 2, 0, 1, :, 0], want, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(arr.astype(np.float32))


def test_smart_resize_matches_transformers():
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(x) for x in rng.integers(1, 3000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo = int(rng.choice([56 * 56, 28 * 28 * 64]))
        hi = int(rng.choice([28 * 28 * 16384, 28 * 28 * 128, 28 * 28 * 1280]))
        assert smart_resize(h, w, min_pixels=lo, max_pixels=hi) == hf_smart_resize(h, w, 28, lo, hi)
    assert smart_resize(1024, 1024) == (1036, 1036) and smart_resize(384, 384) == (392, 392)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)


def test_preprocessor_config_keys(tmp_path):
    """min/max pixels from top-level keys (they win) or from size.{shortest,longest}_edge, as transformers
    reads them; other fields default to Qwen2.5-VL's."""
    new = {"size": {"shortest_edge": 28 * 28 * 8, "longest_edge": 28 * 28 * 30}, "patch_size": 14}
    old = {
        "min_pixels": 28 * 28 * 4,
        "max_pixels": 28 * 28 * 50,
        "size": {"shortest_edge": 1, "longest_edge": 2},
    }
    img = random_image(300, 500, seed=5)
    for c in (new, old, {}):
        ours = image_processor_config(c)
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(c))
        ref = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
        if not c:  # transformers' class default max_pixels (1 003 520) differs from the Qwen2.5-VL file's
            assert ours == QWEN_IMAGE_PROCESSOR
            continue
        assert (ours.min_pixels, ours.max_pixels) == (ref.size["shortest_edge"], ref.size["longest_edge"])
        want = ref(images=[img], return_tensors="pt")
        pv, grid = preprocess_image(img, ours)
        assert torch.equal(grid, want["image_grid_thw"]) and torch.equal(pv, want["pixel_values"])
    with pytest.raises(ValueError, match="resample=2"):
        image_processor_config({"resample": 2})


# ----------------------------------------------------------------------------------------------- tokenizer
TEXTS = [
    EDIT_TEMPLATE.format(PROMPTS[1]),
    EDIT_PLUS_TEMPLATE.format(PICTURE_SLOT.format(1) + PICTURE_SLOT.format(2) + PROMPTS[0]),
    "Ünïcödé  façade\n\n\t x's 12345 日本語",
    "<|im_start|><|im_end|>\n<tool_call> plain text<|endoftext|>",
]


@pytest.mark.parametrize("sub", ["processor", "tokenizer"])
def test_tokenizer_parity(files, sub):
    """tokenizer.json (processor/) and vocab.json + merges.txt + added tokens (tokenizer/) give transformers'
    ids, special tokens included."""
    root, ids, _ = files
    ours = load_qwen_tokenizer(root / sub)
    ref = Qwen2TokenizerFast.from_pretrained(root / sub)
    assert Qwen2TokenizerFast is Qwen2Tokenizer  # transformers 5: one class
    for text in TEXTS:
        assert ours.encode(text) == ref(text)["input_ids"]
        assert ours.decode(ours.encode(text)) == text
    for token, i in ids.items():
        assert ours.token_id(token) == i
    assert ours.pad_id == ids["<|endoftext|>"]
    with pytest.raises(ValueError, match="has no token"):
        ours.token_id("<|nope|>")


def test_processor_parity(files):
    """Texts with image slots + images -> the same ids, mask, pixel values and grids as Qwen2VLProcessor."""
    root, _, _ = files
    ours = load_qwen_processor(root)
    ref = hf_processor(root / "processor")
    texts = [edit_prompt_text(PROMPTS[0], 2, "edit-plus"), edit_prompt_text(PROMPTS[1], 1, "edit")]
    images = [random_image(90, 150, seed=1), random_image(200, 120, seed=2), random_image(64, 64, seed=3)]
    got = ours(texts, images)
    want = ref(text=texts, images=images, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(got[key], want[key]), key
    with pytest.raises(ValueError, match="3 <|image_pad|> slots but 2 images"):
        ours(texts, images[:2])


def test_load_processor_layouts(files, tmp_path):
    root, _, _ = files
    assert load_qwen_processor(root).tokenizer.source.endswith("processor")  # processor/ preferred
    slow = load_qwen_processor(root / "tokenizer")
    assert slow.image == QWEN_IMAGE_PROCESSOR
    (root / "processor" / "preprocessor_config.json").write_text(json.dumps({"max_pixels": 28 * 28 * 99}))
    try:
        assert load_qwen_processor(root).image.max_pixels == 28 * 28 * 99
    finally:
        (root / "processor" / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no Qwen tokenizer files"):
        load_qwen_processor(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an existing folder"):
        load_qwen_processor(str(tmp_path / "missing" / "dir"))


# ----------------------------------------------------------------------------------------------- prompts
def _pipes(ref, root, padding_side="right"):
    proc = hf_processor(root / "processor")
    proc.tokenizer.padding_side = padding_side
    kw = dict(scheduler=None, vae=None, tokenizer=None, processor=proc, transformer=None)
    return (
        QwenImageEditPipeline(text_encoder=MRopeTextEncoder(ref), **kw),
        QwenImageEditPlusPipeline(text_encoder=MRopeTextEncoder(ref), **kw),
    )


def test_templates_match_diffusers(files):
    root, _, ref = files
    edit, plus = _pipes(ref, root)
    assert edit.prompt_template_encode == EDIT_TEMPLATE
    assert plus.prompt_template_encode == EDIT_PLUS_TEMPLATE
    assert edit.prompt_template_encode_start_idx == plus.prompt_template_encode_start_idx == DROP_TOKENS
    assert edit_prompt_text("x", 1, "edit") == EDIT_TEMPLATE.format("x")
    two = "".join(f"Picture {i}: <|vision_start|><|image_pad|><|vision_end|>" for i in (1, 2))
    assert edit_prompt_text("x", 2, "edit-plus") == EDIT_PLUS_TEMPLATE.format(two + "x")


@pytest.mark.parametrize("padding_side", ["right", "left"])
@torch.no_grad()
def test_edit_prompt_embeds_match_diffusers(files, padding_side):
    """Edit: a batch of two prompts of different lengths, one image each (diffusers needs the image once per
    prompt; we pass it once). Either padding side in diffusers' processor gives our (right-padded) result."""
    root, _, ref = files
    ours = load_qwen2_5_vl(root)
    proc = load_qwen_processor(root)
    edit, _ = _pipes(ref, root, padding_side)
    img = random_image(150, 200, seed=3)
    want, want_mask = edit._get_qwen_prompt_embeds(PROMPTS, [img, img], device="cpu")
    got, mask = encode_edit_prompts(ours, proc, PROMPTS, img)
    assert torch.equal(mask, want_mask) and mask.dtype == torch.long
    assert max_rel_err(got, want) <= TOL
    assert not got[mask == 0].any()
    # per-prompt images give the same
    got2, _ = encode_edit_prompts(ours, proc, PROMPTS, [[img], [img]])
    assert torch.equal(got, got2)


@torch.no_grad()
def test_edit_plus_prompt_embeds_match_diffusers(files):
    """2509: two images ("Picture 1: ... Picture 2: ..."); diffusers takes one prompt at a time there."""
    root, _, ref = files
    ours, proc = load_qwen2_5_vl(root), load_qwen_processor(root)
    _, plus = _pipes(ref, root)
    images = [random_image(150, 200, seed=3), random_image(120, 90, seed=4)]
    rows = []
    for p in PROMPTS:
        want, want_mask = plus._get_qwen_prompt_embeds([p], images, device="cpu")
        got, mask = encode_edit_prompts(ours, proc, p, images, template="edit-plus")
        assert torch.equal(mask, want_mask)
        assert max_rel_err(got, want) <= TOL
        rows.append(got[0])
    # our batched call equals the prompts one by one (zero padded)
    batch, mask = encode_edit_prompts(ours, proc, PROMPTS, images, template="edit-plus")
    for i, row in enumerate(rows):
        assert max_rel_err(batch[i, : len(row)], row) <= TOL and mask[i].sum() == len(row)


@torch.no_grad()
def test_diffusers_positions_are_one_dimensional(files):
    """Why the wrapper: diffusers as shipped feeds the encoder 1-D positions. Stage by stage - its inputs
    equal ours, its output equals transformers run with 1-D positions, and that differs from the M-RoPE
    states (ours = transformers with mm_token_type_ids)."""
    root, _, ref = files
    ours, proc = load_qwen2_5_vl(root), load_qwen_processor(root)
    hproc = hf_processor(root / "processor")
    edit = QwenImageEditPipeline(
        scheduler=None, vae=None, text_encoder=ref, tokenizer=None, processor=hproc, transformer=None
    )
    img = random_image(150, 200, seed=3)
    shipped, _ = edit._get_qwen_prompt_embeds(PROMPTS[:1], [img], device="cpu")
    inputs = proc([edit_prompt_text(PROMPTS[0], 1)], [img])
    ids, am, pv, grid = (inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"))
    one_d = ref(
        input_ids=ids, attention_mask=am, pixel_values=pv, image_grid_thw=grid, output_hidden_states=True
    ).hidden_states[-1]
    assert max_rel_err(shipped[0], one_d[0, DROP_TOKENS:]) <= TOL
    three_d = reference_states(ref, ids, am, pv, grid)
    assert max_rel_err(ours.encode(ids, am, pv, grid), three_d) <= TOL
    assert max_rel_err(one_d, three_d) > 1e-2


# ----------------------------------------------------------------------------------------------- bad input
@torch.no_grad()
def test_bad_prompt_inputs(files):
    root, ids, _ = files
    ours, proc = load_qwen2_5_vl(root), load_qwen_processor(root)
    img = random_image(60, 60, seed=1)
    with pytest.raises(ValueError, match="at least one image"):
        encode_edit_prompts(ours, proc, "x", [])
    with pytest.raises(ValueError, match="one image slot, got 2 images; use 'edit-plus'"):
        encode_edit_prompts(ours, proc, "x", [img, img])
    with pytest.raises(ValueError, match="3 per-prompt image lists for 2 prompts"):
        encode_edit_prompts(ours, proc, PROMPTS, [[img], [img], [img]])
    with pytest.raises(ValueError, match="unknown template"):
        encode_edit_prompts(ours, proc, "x", img, template="t2i")
    with pytest.raises(ValueError, match="no prompts"):
        encode_edit_prompts(ours, proc, [], img)
    bad_model = load_qwen2_5_vl(root)
    bad_model.config = replace(bad_model.config, image_token_id=ids["<|image_pad|>"] + 1)
    with pytest.raises(ValueError, match="tokenizer id of <|image_pad|>"):
        encode_edit_prompts(bad_model, proc, "x", img)


@torch.no_grad()
def test_long_prompt_is_not_truncated(files):
    """The official pipelines never truncate; neither do we, unless max_length is given (then: an error)."""
    root, _, _ = files
    ours, proc = load_qwen2_5_vl(root), load_qwen_processor(root)
    img = random_image(56, 56, seed=1)  # 4 x 4 patches -> 4 image tokens
    long = "make it purple " * 300
    n_kept = len(proc.tokenizer.encode(edit_prompt_text(long, 1))) - 1 + 4 - DROP_TOKENS
    embeds, mask = encode_edit_prompts(ours, proc, long, img)
    assert embeds.shape[1] == mask.sum() == n_kept > 1024
    assert torch.isfinite(embeds).all()
    with pytest.raises(ValueError, match=rf"\[{n_kept}\] tokens exceed max_length=1024"):
        encode_edit_prompts(ours, proc, long, img, max_length=1024)
