"""QwenEditPipeline end to end on a tiny repo folder in the official layout, against diffusers' pipelines.

Everything is compared from the same inputs: images, prompt, negative prompt, seed (our noise field's draw is
passed to diffusers as ``latents=``), 4 steps, true CFG 4.0, at a 128^2 working area (the diffusers
pipelines' ``calculate_dimensions`` is patched; ours takes ``area=``). The prompt side runs too: the tiny
Qwen2.5-VL with the tokenizer files the helper builds. diffusers 0.42.1 feeds the VL encoder 1-D positions
(it does not pass ``mm_token_type_ids``: diffusers #14194); our encoder has the real
3-D M-RoPE, so diffusers runs with its text encoder wrapped to pass them (``refs_vl.MRopeTextEncoder``) and
everything else - sizing, LANCZOS resizes, processor, template, drop-64, VAE, scheduler, CFG - is its own.
Edit-2511 is the Plus pipeline with a ``zero_cond_t`` transformer. Also: batches, single-file components and
input checks.
"""

import shutil
from dataclasses import replace

import pytest
import torch
from refs import max_rel_err, randomize_
from refs_qwen import random_pil, tiny_qwen_kwargs
from refs_qwen_repo import linked_variant, run_diffusers_edit, write_model_index, write_qwen_edit_repo

from models.packing import pack
from models.work import EditShape
from samplers.field import NoiseField
from samplers.mixed_res import FullResSampler
from samplers.schedules import QWEN_SCHEDULE, flow_sigmas
from specedit.method import Baseline
from specedit.presets import methods
from specedit.qwen.pipeline import QWEN_MODELS, QwenEditPipeline, calculate_dimensions

AREA = 128 * 128  # working area (the real pipelines: 1024^2); the tiny VAE is /4, so 8 px per token
TOL = 1e-5
PROMPT = "make the sky purple and add a red kite"


def write_2511_variant(repo: dict, dst):
    """Edit-2511's layout: the Plus pipeline with a ``zero_cond_t`` transformer (the other folders shared)."""
    from diffusers import QwenImageTransformer2DModel

    dst.mkdir()
    for sub in ("scheduler", "vae", "text_encoder", "processor", "tokenizer"):
        (dst / sub).symlink_to(repo["edit"] / sub, target_is_directory=True)
    width = repo["refs"]["text_encoder"].config.text_config.hidden_size
    tr = QwenImageTransformer2DModel(**tiny_qwen_kwargs(joint_attention_dim=width, zero_cond_t=True))
    tr = randomize_(tr.eval(), seed=11)
    tr.save_pretrained(dst / "transformer")
    write_model_index(dst, plus=True)
    return dst, {**repo["refs"], "transformer": tr}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    base = tmp_path_factory.mktemp("qwen-image-edit")
    refs = write_qwen_edit_repo(base / "edit", plus=False, seed=3)
    plus = linked_variant(base / "edit", base / "edit-2509", plus=True)
    out = {"edit": base / "edit", "edit-plus": plus, "refs": refs}
    out["edit-2511"], out["refs-2511"] = write_2511_variant(out, base / "edit-2511")
    return out


@pytest.fixture(scope="module")
def pipes(repo):
    return {
        v: QwenEditPipeline.from_pretrained(repo[v], area=AREA) for v in ("edit", "edit-plus", "edit-2511")
    }


@pytest.mark.parametrize(
    "variant,sizes",
    [("edit", [(96, 160)]), ("edit-plus", [(96, 160), (120, 104)]), ("edit-2511", [(96, 160), (120, 104)])],
    ids=["edit", "edit-2509-two-images", "edit-2511-two-images"],
)
@torch.no_grad()
def test_end_to_end_matches_diffusers(repo, pipes, variant, sizes):
    pipe = pipes[variant]
    plus = variant != "edit"
    assert pipe.variant == ("edit-plus" if plus else "edit") and pipe.schedule == QWEN_SCHEDULE  # model_index
    assert pipe.transformer.config.zero_cond_t == (variant == "edit-2511")  # from the transformer config
    images = [random_pil(h, w, seed=20 + i) for i, (h, w) in enumerate(sizes)]
    arg = images if plus else images[0]
    ours = pipe.edit(arg, PROMPT, steps=4, seed=7)
    ed = ours.editor
    noise = NoiseField.sample(tuple(ed.source.shape), 7).fine
    refs = repo["refs-2511" if variant == "edit-2511" else "refs"]
    ref = run_diffusers_edit(refs, repo["edit"], arg, PROMPT, " ", pack(noise), plus=plus, area=AREA)
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
    baseline = methods("qwen")["baseline-50"].plan(EditShape.of(a.editor)).events
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
    assert ed.neg_txt is not None and ed.cfg_scale == 4.0  # the default negative prompt " " at scale 4
    plain = pipe.prepare(img, PROMPT, true_cfg_scale=1.0)
    assert plain.neg_txt is None and plain.costs.neg_text_tokens is None


@torch.no_grad()
def test_batch_equals_single_edits(pipes):
    """Two edits in one call (a baseline: one batch of 2, prompts of different lengths padded and masked) equal
    the batch-1 edits with seed and seed + 1."""
    pipe = pipes["edit"]
    images = [random_pil(96, 160, seed=1), random_pil(96, 160, seed=2)]
    prompts = [PROMPT, "turn it into a watercolour painting of a quiet harbour at dusk"]
    out = pipe.edit(images, prompts, steps=2, seed=3)
    assert out.latent.shape[0] == 2 and out.editor.txt_mask is not None  # padded: the lengths differ
    for i in range(2):
        single = pipe.edit(images[i], prompts[i], steps=2, seed=3 + i)
        assert max_rel_err(out.latent[i : i + 1], single.latent) <= TOL
        assert max_rel_err(out.pixels[i : i + 1], single.pixels) <= TOL


@torch.no_grad()
def test_single_file_components(repo, pipes, tmp_path):
    """The transformer, the VAE and the text encoder as single .safetensors files (configs from the repo, or
    beside the file) load the same models; a file with no config anywhere is refused by name."""
    files = tmp_path / "files"
    files.mkdir()
    singles = {}
    for name, src in (
        ("transformer", "transformer/diffusion_pytorch_model.safetensors"),
        ("vae", "vae/diffusion_pytorch_model.safetensors"),
        ("text_encoder", "text_encoder/model.safetensors"),
    ):
        singles[name] = shutil.copy(repo["edit"] / src, files / f"qwen_{name}.safetensors")  # fmt: skip
    pipe = QwenEditPipeline.from_pretrained(repo["edit"], area=AREA, **singles)
    img = random_pil(96, 160, seed=4)
    a, b = pipe.edit(img, PROMPT, steps=2, seed=1), pipes["edit"].edit(img, PROMPT, steps=2, seed=1)
    assert torch.equal(a.latent, b.latent) and torch.equal(a.pixels, b.pixels)
    bare = tmp_path / "no-transformer"
    bare.mkdir()
    for sub in ("scheduler", "vae", "text_encoder", "processor", "tokenizer", "model_index.json"):
        (bare / sub).symlink_to(repo["edit"] / sub)
    with pytest.raises(
        FileNotFoundError, match=r"qwen_transformer.safetensors is a single weights file with no config"
    ):
        QwenEditPipeline.from_pretrained(bare, transformer=singles["transformer"])
    shutil.copy(repo["edit"] / "transformer" / "config.json", files / "config.json")  # now beside the file
    assert QwenEditPipeline.from_pretrained(bare, transformer=singles["transformer"]).variant == "edit"


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_offload_keeps_cpu_homes(repo, pipes):
    """On CUDA with the text encoder offloaded and the VAE kept on the CPU: both run on the GPU on borrowed
    copies, their CPU (memory-mapped) weights untouched, and the edit matches the CPU one."""
    img = random_pil(96, 160, seed=4)
    cpu = pipes["edit"].edit(img, PROMPT, steps=2, seed=1)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions, for a tight comparison
    try:
        gpu = QwenEditPipeline.from_pretrained(repo["edit"], area=AREA, device="cuda", vae_device="cpu")
        homes = [p.data_ptr() for m in (gpu.text_encoder, gpu.vae.module) for p in m.parameters()]
        out = gpu.edit(img, PROMPT, steps=2, seed=1)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert [p.data_ptr() for m in (gpu.text_encoder, gpu.vae.module) for p in m.parameters()] == homes
    assert {p.device.type for m in (gpu.text_encoder, gpu.vae.module) for p in m.parameters()} == {"cpu"}
    assert out.editor.source.device.type == "cuda" and max_rel_err(out.pixels, cpu.pixels) <= 1e-4


def test_models_table():
    assert QWEN_MODELS["qwen-image-edit-2511"] == ("Qwen/Qwen-Image-Edit-2511", "edit-plus")
    assert {v for _, v in QWEN_MODELS.values()} == {"edit", "edit-plus"}


def test_bad_inputs(repo, pipes, tmp_path):
    img = random_pil(64, 64, seed=0)
    with pytest.raises(
        ValueError, match=r"edit 0 has no input image \(give at least the image being edited\)"
    ):
        pipes["edit-plus"].edit([], PROMPT)
    with pytest.raises(ValueError, match="exactly one image, got 2 for edit 0"):
        pipes["edit"].edit([img, img], PROMPT)
    with pytest.raises(ValueError, match="unknown method 'specedit-7'"):
        pipes["edit"].edit(img, PROMPT, method="specedit-7")
    with pytest.raises(ValueError, match=r"guidance=3.5: Qwen-Image-Edit has no distilled guidance"):
        pipes["edit"].edit(img, PROMPT, guidance=3.5)
    with pytest.raises(ValueError, match=r"steps must be >= 1 \(an integer\), got 0"):
        pipes["edit"].edit(img, PROMPT, steps=0)
    with pytest.raises(ValueError, match="negative_prompt must be None, a string or a list of 2 strings"):
        pipes["edit"].edit(img, [PROMPT, PROMPT], negative_prompt=[" "])
    with pytest.raises(FileNotFoundError, match="image not found"):
        pipes["edit"].edit(str(tmp_path / "nope.png"), PROMPT)
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a Hugging Face repo id"):
        QwenEditPipeline.from_pretrained(tmp_path / "missing" / "folder")
    with pytest.raises(
        FileNotFoundError, match=r"lacks transformer/, vae/, text_encoder/, processor/ \(or tokenizer/\)"
    ):
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
