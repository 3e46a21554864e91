"""The Kontext editor end to end on a tiny, complete FLUX.1-Kontext-dev folder in the official layout:
parity with diffusers' FluxKontextPipeline loaded from the same folder, SpecEdit presets, BFL single files,
hub and path errors, memory options and input checks."""

import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image
from refs import max_rel_err
from refs_kontext import write_bfl_single_files, write_tiny_kontext_repo
from refs_text import PROMPTS

from models.imageio import pil_to_tensor
from models.packing import pack
from samplers.field import NoiseField
from samplers.mixed_res import FullResSampler
from samplers.schedules import FLUX_SCHEDULE
from specedit.kontext.pipeline import KontextOutput, KontextPipeline, borrowed, edit_size
from specedit.method import Baseline
from specedit.viz import mask_overlay

TOL = 1e-5
PROMPT = "make the sky purple and add three balloons"
H, W = 64, 96  # the tiny AE is 4x: a 16x24 latent, an 8x12 token grid, 4x6 coarse cells


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_tiny_kontext_repo(tmp_path_factory.mktemp("kontext") / "FLUX.1-Kontext-dev")


@pytest.fixture(scope="module")
def pipe(repo):
    return KontextPipeline.from_pretrained(repo)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(5).integers(0, 256, (H, W, 3), dtype=np.uint8))


def _params_on(module) -> set[str]:
    return {p.device.type for p in module.parameters()}


# ----------------------------------------------------------------------------------------------- parity
@torch.no_grad()
def test_parity_with_diffusers(repo, pipe, image):
    """Same folder, prompt, image and initial noise: diffusers' pipeline and ours agree in fp32."""
    ref = FluxKontextPipeline.from_pretrained(repo)  # transformers tokenizers read the same tokenizer files
    prompts = [PROMPT, PROMPTS[-1]]  # the second runs past both max lengths: truncation
    txt, pooled = pipe.encode_prompt(prompts)
    ref_txt, ref_pooled, _ = ref.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=512)
    assert txt.shape == (2, 512, 32) and pooled.shape == (2, 32)
    assert max_rel_err(txt, ref_txt) <= TOL
    assert max_rel_err(pooled, ref_pooled) <= TOL

    seed, steps = 3, 4
    out = pipe.edit(image, PROMPT, steps=steps, seed=seed, height=H, width=W)
    assert isinstance(out, KontextOutput) and out.image.size == (W, H) and out.mask is None
    noise = pack(NoiseField.sample(tuple(out.editor.source.shape), seed).fine)
    # With _auto_resize=False diffusers keeps the reference at its own size and fits the target to
    # max_area at the requested aspect ratio; an image already at our working size and max_area = H * W
    # make both pipelines use the same reference and target sizes (LANCZOS to the same size is a no-op).
    kw = dict(
        image=image,
        prompt=PROMPT,
        height=H,
        width=W,
        max_area=H * W,
        _auto_resize=False,
        num_inference_steps=steps,
        guidance_scale=2.5,
        latents=noise,
    )
    theirs = ref(**kw, output_type="pt").images
    assert max_rel_err(out.pixels, theirs) <= TOL
    theirs_pil = np.asarray(ref(**kw, output_type="pil").images[0], dtype=np.int16)
    assert np.abs(np.asarray(out.image, dtype=np.int16) - theirs_pil).max() <= 1  # 8-bit rounding only
    assert set(out.seconds) == {"encode", "sample", "decode", "total"}
    flops = out.flops()
    assert set(flops) == {"full", "total"} and flops["total"] > 0


def test_method_forms_and_inputs_agree(pipe, image):
    """A method object equals its name; a tensor input (4-d or 3-d) at the working size equals the image."""
    a = pipe.edit(image, PROMPT, steps=2, height=H, width=W)
    b = pipe.edit(image, PROMPT, method=Baseline(FullResSampler(2)), height=H, width=W)
    c = pipe.edit(pil_to_tensor(image), PROMPT, steps=2, height=H, width=W)
    d = pipe.edit(pil_to_tensor(image)[0], PROMPT, steps=2, height=H, width=W)
    for other in (b, c, d):
        assert torch.equal(a.pixels, other.pixels)


# ----------------------------------------------------------------------------------------------- SpecEdit
def test_specedit_preset_end_to_end(pipe, image):
    out = pipe.edit(image, PROMPT, method="specedit-18", seed=7, height=H, width=W)
    hc, wc = pipe.prepare(image, PROMPT, height=H, width=W).grid
    assert out.image.size == (W, H) and out.pixels.shape == (1, 3, H, W)
    assert torch.isfinite(out.pixels).all()
    assert out.mask is not None and out.mask.dtype == torch.bool and out.mask.shape == (hc // 2, wc // 2)
    flops = out.flops()
    assert {"draft", "coarse", "mixed", "full", "verifier", "total"} <= set(flops)
    assert out.result.nfe == 18
    overlay = out.overlay()
    assert overlay.size == out.reference.size == (W, H)
    again = pipe.edit(image, PROMPT, method="specedit-18", seed=7, height=H, width=W)
    assert torch.equal(out.pixels, again.pixels) and torch.equal(out.mask, again.mask)
    assert np.array_equal(np.asarray(out.image), np.asarray(again.image))


def test_mask_overlay():
    img = Image.new("RGB", (96, 64), (100, 100, 100))
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[1, 2] = True
    arr = np.asarray(mask_overlay(img, mask), dtype=np.int16)
    assert (arr[:32] == 100).all() and (arr[32:, :64] == 100).all()
    assert (arr[32:, 64:, 0] > 150).all() and (arr[32:, 64:, 1:] < 100).all()
    with pytest.raises(ValueError, match=r"mask must be \(hc, wc\)"):
        mask_overlay(img, torch.zeros(2, 2, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------- sizes
def test_edit_size():
    assert edit_size((1024, 1024)) == (1024, 1024)
    assert edit_size((1920, 1080)) == (1408, 768)  # preferred 1392x752, rounded to multiples of 64
    assert edit_size((832, 1250)) == (832, 1280)  # preferred 832x1248
    assert edit_size((500, 500), height=100, width=70) == (64, 128)
    assert edit_size((500, 500), height=H, width=W, multiple=32) == (W, H)
    with pytest.raises(ValueError, match="both height and width"):
        edit_size((500, 500), height=64)


def test_reference_goes_to_the_preferred_resolution(pipe):
    """Without a size the reference is LANCZOS-resized to the preferred resolution, 1392x752 here, with
    sides rounded to multiples of 32 px (4 tokens of the tiny 4x AE)."""
    assert pipe.multiple == 32
    ref = pipe.reference(Image.new("RGB", (300, 170), (10, 20, 30)))
    assert ref.shape == (1, 3, 768, 1408) and ref.dtype == torch.float32
    assert pipe.reference(torch.zeros(3, 64, 64), height=64, width=64).shape == (1, 3, 64, 64)


# ----------------------------------------------------------------------------------------------- loading
def test_bfl_single_files_load(repo, pipe, image, tmp_path):
    """A root with flux1-kontext-dev.safetensors and ae.safetensors (no diffusers transformer/, vae/,
    scheduler/) loads the same weights and edits as the diffusers folders (up to kernel rounding)."""
    root = write_bfl_single_files(repo, tmp_path / "bfl")
    assert not (root / "transformer").exists() and not (root / "vae").exists()
    bfl = KontextPipeline.from_pretrained(root)
    assert bfl.schedule == pipe.schedule == FLUX_SCHEDULE
    a = pipe.edit(image, PROMPT, steps=2, height=H, width=W)
    b = bfl.edit(image, PROMPT, steps=2, height=H, width=W)
    assert max_rel_err(b.pixels, a.pixels) <= TOL


def test_component_overrides(repo, tmp_path):
    """Components given by path override the repo's (here the root lacks them)."""
    root = tmp_path / "partial"
    shutil.copytree(repo, root, ignore=shutil.ignore_patterns("text_encoder_2", "tokenizer_2"))
    with pytest.raises(FileNotFoundError, match=r"lacks text_encoder_2/, tokenizer_2/"):
        KontextPipeline.from_pretrained(root)
    pipe = KontextPipeline.from_pretrained(
        root, text_encoder_2=repo / "text_encoder_2", tokenizer_2=repo / "tokenizer_2"
    )
    assert pipe.encode_prompt(PROMPT)[0].shape == (1, 512, 32)
    with pytest.raises(ValueError, match="unknown components"):
        KontextPipeline.from_pretrained(repo, text_encoder_3=repo)


def test_missing_component(repo, tmp_path):
    root = tmp_path / "no_vae"
    shutil.copytree(repo, root, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(FileNotFoundError, match=r"lacks vae/ \(or ae.safetensors\)"):
        KontextPipeline.from_pretrained(root)
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor"):
        KontextPipeline.from_pretrained(tmp_path / "nowhere")


def test_gated_hub_repo(monkeypatch):
    import huggingface_hub

    class GatedRepoError(Exception):  # named as huggingface_hub's, whose constructor needs a response
        pass

    calls = []

    def gated(repo_id, allow_patterns):
        calls.append(allow_patterns)
        raise GatedRepoError("401 Client Error: access to this repo is restricted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(PermissionError, match=r"(?s)FLUX.1-Kontext-dev is gated.*HF_TOKEN"):
        KontextPipeline.from_pretrained("black-forest-labs/FLUX.1-Kontext-dev")
    (patterns,) = calls  # one download for every component
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert any(p.startswith(f"{sub}/") for p in patterns), sub
    assert not any(p.endswith(".safetensors") and "/" not in p for p in patterns)  # no 24 GB root files


# ----------------------------------------------------------------------------------------------- memory
def test_offload_text_encoders(repo, image):
    """Offloaded encoders run on the main device inside encode_prompt and live on the CPU otherwise."""
    pipe = KontextPipeline.from_pretrained(repo, offload_text_encoders=True, vae_device="cpu")
    seen = []
    hook = pipe.t5.register_forward_pre_hook(lambda m, args: seen.append(next(m.parameters()).device))
    try:
        pipe.prepare(image, PROMPT, height=H, width=W)
    finally:
        hook.remove()
    assert seen == [pipe.device]
    assert _params_on(pipe.t5) == _params_on(pipe.clip) == {"cpu"} and pipe.ae.home.type == "cpu"
    assert not any(p.requires_grad for p in pipe.model.parameters())


def test_borrowed_swaps_and_restores():
    """Offloaded modules run on copies on the target device; their home tensors come back untouched."""
    lin = torch.nn.Linear(3, 2)
    lin.register_buffer("table", torch.arange(4.0))
    home = [t.data_ptr() for t in (lin.weight, lin.bias, lin.table)]
    with borrowed(lin, torch.device("meta")) as m:
        assert m is lin and {t.device.type for t in (lin.weight, lin.bias, lin.table)} == {"meta"}
    assert [t.data_ptr() for t in (lin.weight, lin.bias, lin.table)] == home
    assert torch.equal(lin.table, torch.arange(4.0)) and isinstance(lin.weight, torch.nn.Parameter)


def test_bf16(repo, image):
    pipe = KontextPipeline.from_pretrained(repo, dtype=torch.bfloat16)
    assert {p.dtype for m in (pipe.model, pipe.ae.ae, pipe.t5, pipe.clip) for p in m.parameters()} == {
        torch.bfloat16
    }
    out = pipe.edit(image, PROMPT, steps=2, height=H, width=W)
    assert out.latent.dtype == torch.bfloat16 and out.image.size == (W, H)
    assert torch.isfinite(out.pixels).all()


@pytest.mark.gpu
def test_cuda_offload_matches_cpu(repo, pipe, image):
    """On CUDA: the transformer on the GPU, text encoders and AE back on the CPU after each use, and the same
    edit as on the CPU (the noise is drawn on a CPU generator)."""
    cpu = pipe.edit(image, PROMPT, method="specedit-18", seed=1, height=H, width=W)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions, for a tight comparison
    try:
        gpu = KontextPipeline.from_pretrained(
            repo, device="cuda", offload_text_encoders=True, vae_device="cpu"
        )
        out = gpu.edit(image, PROMPT, method="specedit-18", seed=1, height=H, width=W)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert _params_on(gpu.model) == {"cuda"}
    assert _params_on(gpu.t5) == _params_on(gpu.clip) == _params_on(gpu.ae.ae) == {"cpu"}
    assert out.editor.source.device.type == "cuda"
    assert torch.equal(out.mask, cpu.mask)
    assert max_rel_err(out.pixels, cpu.pixels) <= 1e-4


# ----------------------------------------------------------------------------------------------- errors
def test_bad_inputs(pipe, image, tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found: .*missing.png"):
        pipe.edit(tmp_path / "missing.png", PROMPT)
    for bad in (
        torch.zeros(1, 4, H, W),
        torch.zeros(2, 3, H, W),
        torch.zeros(H, W),
        torch.zeros(1, 3, H, W).long(),
    ):
        with pytest.raises(ValueError, match=r"image tensor must be float \(1, 3, H, W\)"):
            pipe.edit(bad, PROMPT, height=H, width=W)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        pipe.edit(torch.full((1, 3, H, W), 255.0), PROMPT, height=H, width=W)
    with pytest.raises(ValueError, match="unknown method 'specedit-99'"):
        pipe.edit(image, PROMPT, method="specedit-99")
    with pytest.raises(ValueError, match="object with run"):
        pipe.edit(image, PROMPT, method=object())
    with pytest.raises(ValueError, match="steps must be >= 1"):
        pipe.edit(image, PROMPT, steps=0)
    with pytest.raises(ValueError, match="both height and width"):
        pipe.edit(image, PROMPT, height=H)
    with pytest.raises(ValueError, match="non-empty list of str"):
        pipe.encode_prompt([])


def test_odd_images_and_empty_prompt_have_documented_behaviour(pipe, image):
    """RGBA and greyscale inputs are converted to RGB (alpha dropped), a 1-pixel image is resized to the working
    size like any other, and an empty prompt is a valid prompt (T5 sees only </s>, CLIP only BOS/EOS)."""
    rgb = pipe.edit(image, PROMPT, steps=2, height=H, width=W, seed=1)
    rgba = image.convert("RGBA")
    rgba.putalpha(77)
    assert torch.equal(pipe.edit(rgba, PROMPT, steps=2, height=H, width=W, seed=1).latent, rgb.latent)
    grey = pipe.edit(image.convert("L"), PROMPT, steps=2, height=H, width=W, seed=1)
    assert grey.image.size == (W, H) and torch.isfinite(grey.latent).all()
    dot = pipe.edit(Image.new("RGB", (1, 1), (200, 30, 30)), PROMPT, steps=2, height=H, width=W)
    assert dot.image.size == (W, H) and torch.isfinite(dot.latent).all()
    empty = pipe.edit(image, "", steps=2, height=H, width=W, seed=1)
    assert torch.isfinite(empty.latent).all() and not torch.equal(empty.latent, rgb.latent)
