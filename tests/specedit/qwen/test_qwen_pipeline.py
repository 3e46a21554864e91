"""QwenEditPipeline end to end on a tiny repo folder in the official layout, against diffusers' pipelines.

Everything is compared from the same inputs: images, prompt, negative prompt, seed (our noise field's draw is
passed to diffusers as ``latents=``), 4 steps, true CFG 4.0, at a 128^2 working area (the diffusers
pipelines' ``calculate_dimensions`` is patched; ours takes ``area=``). The prompt side runs too: the tiny
Qwen2.5-VL with the tokenizer files the helper builds. diffusers 0.42.1 feeds the VL encoder 1-D positions
(it does not pass ``mm_token_type_ids``: research memo pitfall 5, diffusers #14194); our encoder has the real
3-D M-RoPE, so diffusers runs with its text encoder wrapped to pass them (``refs_vl.MRopeTextEncoder``) and
everything else - sizing, LANCZOS resizes, processor, template, drop-64, VAE, scheduler, CFG - is its own.
"""

from dataclasses import replace

import pytest
import torch
from refs import max_rel_err
from refs_qwen import random_pil
from refs_qwen_repo import linked_variant, run_diffusers_edit, write_model_index, write_qwen_edit_repo

from models.packing import pack
from samplers.field import NoiseField
from samplers.mixed_res import FullResSampler
from samplers.schedules import QWEN_SCHEDULE, flow_sigmas
from specedit.method import Baseline
from specedit.presets import methods
from specedit.qwen.pipeline import QwenEditPipeline, calculate_dimensions

AREA = 128 * 128  # working area (the real pipelines: 1024^2); the tiny VAE is /4, so 8 px per token
TOL = 1e-5
PROMPT = "make the sky purple and add a red kite"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    base = tmp_path_factory.mktemp("qwen-image-edit")
    refs = write_qwen_edit_repo(base / "edit", plus=False, seed=3)
    plus = linked_variant(base / "edit", base / "edit-2509", plus=True)
    return {"edit": base / "edit", "edit-plus": plus, "refs": refs}


@pytest.fixture(scope="module")
def pipes(repo):
    return {v: QwenEditPipeline.from_pretrained(repo[v], area=AREA) for v in ("edit", "edit-plus")}


@pytest.mark.parametrize(
    "variant,sizes",
    [("edit", [(96, 160)]), ("edit-plus", [(96, 160), (120, 104)])],
    ids=["edit", "edit-2509-two-images"],
)
@torch.no_grad()
def test_end_to_end_matches_diffusers(repo, pipes, variant, sizes):
    pipe = pipes[variant]
    assert pipe.variant == variant and pipe.schedule == QWEN_SCHEDULE  # from model_index / scheduler config
    images = [random_pil(h, w, seed=20 + i) for i, (h, w) in enumerate(sizes)]
    arg = images if variant == "edit-plus" else images[0]
    ours = pipe.edit(arg, PROMPT, steps=4, seed=7)
    ed = ours.editor
    noise = NoiseField.sample(tuple(ed.source.shape), 7).fine
    ref = run_diffusers_edit(
        repo["refs"], repo["edit"], arg, PROMPT, " ", pack(noise), plus=variant == "edit-plus", area=AREA
    )
    # output size from the last image; the other images are references of their own sizes
    w, h = calculate_dimensions(AREA, images[-1].width / images[-1].height)
    assert ours.image.size == (w, h) and len(ed.refs) == len(images) - 1
    # prompt embeddings: what diffusers' transformer received (cond, uncond, ...), all-ones masks dropped
    (pe, pm), (ne, nm) = ref["calls"][:2]
    assert pm is None and nm is None and ed.txt_mask is None and ed.neg_mask is None
    assert max_rel_err(ed.txt, pe) <= TOL and max_rel_err(ed.neg_txt, ne) <= TOL
    assert pe.shape != ne.shape  # different lengths: the batched CFG forward pads and masks
    assert torch.equal(flow_sigmas(4, ed.grid[0] * ed.grid[1], pipe.schedule), ref["sigmas"])
    assert max_rel_err(pack(ours.latent), ref["steps"][-1]) <= TOL
    assert max_rel_err(ours.pixels, ref["image"]) <= TOL and ours.mask is None
    # the pipelines' two forwards per step: the same result
    sequential = Baseline(FullResSampler(4)).run(replace(ed, batched_cfg=False), seed=7)
    assert max_rel_err((ed.decode(sequential.latent) * 0.5 + 0.5).clamp(0, 1), ref["image"]) <= TOL
    flops = ours.flops()
    assert ours.result.nfe == 4 and flops["full"] == pytest.approx(4 * ed.cost(ours.result.events[0]))
    assert flops["total"] == pytest.approx(
        flops["sampling"] + flops["text_encoder"] + flops["vae_encode"] + flops["vae_decode"]
    )


@torch.no_grad()
def test_specedit_on_the_tiny_folder_reproduces(pipes):
    pipe = pipes["edit-plus"]
    images = [random_pil(100, 90, seed=1), random_pil(96, 160, seed=2)]
    a = pipe.edit(images, PROMPT, method="specedit-18", seed=4)
    assert a.editor.grid == (12, 20) and a.editor.grid[0] % 4 == a.editor.grid[1] % 4 == 0
    assert a.result.nfe == 18 and a.result.verdict is not None
    # the same seed again on the same editor (preparing it has no randomness): the same edit
    m = methods("qwen")["specedit-18"]
    b = m.run(a.editor, seed=4)
    assert torch.equal(a.latent, b.latent) and torch.equal(a.result.verdict.mask, b.verdict.mask)
    assert not torch.equal(a.latent, m.run(a.editor, seed=5).latent)
    assert a.mask.shape == (6, 10) and a.overlay().size == a.image.size == a.reference.size == (160, 96)
    parts = a.flops()
    assert {"draft", "coarse", "mixed", "full", "verifier"} <= set(parts)
    baseline = methods("qwen")["baseline-50"].events(a.editor.grid)
    assert parts["sampling"] < 0.5 * sum(map(a.editor.cost, baseline))


def test_working_sizes():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions as ref

    for ratio in (1.0, 16 / 9, 9 / 16, 4 / 3, 0.37, 2.7):
        assert calculate_dimensions(1024 * 1024, ratio) == ref(1024 * 1024, ratio)
        w, h = calculate_dimensions(1024 * 1024, ratio, 64)
        assert w % 64 == h % 64 == 0 and abs(w * h / 1024**2 - 1) < 0.15
    assert calculate_dimensions(1024 * 1024, 1.0) == (1024, 1024)


@torch.no_grad()
def test_prepare_options(pipes):
    pipe = pipes["edit"]
    img = random_pil(96, 160, seed=5)
    ed = pipe.prepare(img, PROMPT, height=64, width=100)  # rounded down to 32 px; the source at that size
    assert tuple(ed.source.shape) == (1, 4, 16, 24) and ed.refs == ()
    plain = pipe.prepare(img, PROMPT, negative_prompt=None)
    assert plain.neg_txt is None and plain.costs.neg_text_tokens is None
    assert pipe.prepare(img, PROMPT, true_cfg_scale=1.0).neg_txt is None


def test_bad_inputs(repo, pipes, tmp_path):
    img = random_pil(64, 64, seed=0)
    with pytest.raises(ValueError, match="at least one input image"):
        pipes["edit-plus"].edit([], PROMPT)
    with pytest.raises(ValueError, match="exactly one image, got 2"):
        pipes["edit"].edit([img, img], PROMPT)
    with pytest.raises(ValueError, match="unknown method 'specedit-7'"):
        pipes["edit"].edit(img, PROMPT, method="specedit-7")
    with pytest.raises(ValueError, match="prompt must be one string"):
        pipes["edit"].edit(img, [PROMPT, PROMPT])
    with pytest.raises(FileNotFoundError, match="image not found"):
        pipes["edit"].edit(str(tmp_path / "nope.png"), PROMPT)
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a Hugging Face repo id"):
        QwenEditPipeline.from_pretrained(tmp_path / "missing" / "folder")
    with pytest.raises(FileNotFoundError, match="missing transformer/, vae/, text_encoder/, processor/"):
        QwenEditPipeline.from_pretrained(tmp_path)
    partial = linked_variant(repo["edit"], tmp_path / "no-index", plus=False)
    (partial / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="pass variant="):
        QwenEditPipeline.from_pretrained(partial)
    assert QwenEditPipeline.from_pretrained(partial, variant="edit-plus").variant == "edit-plus"
    write_model_index(partial, plus=False)
    (partial / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    with pytest.raises(ValueError, match="_class_name 'QwenImagePipeline'"):
        QwenEditPipeline.from_pretrained(partial)
