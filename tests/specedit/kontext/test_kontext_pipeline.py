"""The Kontext editor end to end on a tiny, complete FLUX.1-Kontext-dev folder in the official layout:
parity with diffusers' FluxKontextPipeline loaded from the same folder (plain and with true CFG), SpecEdit
presets, batches, several references, outputs, BFL single files, hub and path errors, memory options and
input checks."""

import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image
from refs import max_rel_err
from refs_kontext import write_bfl_single_files, write_tiny_kontext_repo
from refs_text import PROMPTS

from models.flux_kontext import reference_ids
from models.imageio import pil_to_tensor
from models.packing import grid_ids, pack
from samplers.field import NoiseField
from samplers.mixed_res import FullResSampler
from samplers.schedules import FLUX_SCHEDULE
from specedit.kontext.pipeline import KontextPipeline, edit_size
from specedit.method import Baseline
from specedit.pipeline import EditOutput, borrowed
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
def diffusers_pipe(repo):
    return FluxKontextPipeline.from_pretrained(repo)  # transformers tokenizers read the same tokenizer files


def _random_image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def image():
    return _random_image(H, W, 5)


def _diffusers_kw(image, noise, steps: int) -> dict:
    """diffusers' arguments for our working size: with _auto_resize=False diffusers keeps the reference at its own
    size and fits the target to max_area at the requested aspect ratio; an image already at our working size and
    max_area = H * W make both pipelines use the same reference and target sizes (LANCZOS to the same size is a
    no-op)."""
    return dict(image=image, height=H, width=W, max_area=H * W, _auto_resize=False, num_inference_steps=steps,
                guidance_scale=2.5, latents=noise)  # fmt: skip


def _params_on(module) -> set[str]:
    return {p.device.type for p in module.parameters()}


# ----------------------------------------------------------------------------------------------- parity
@torch.no_grad()
def test_parity_with_diffusers(diffusers_pipe, pipe, image):
    """Same folder, prompt, image and initial noise: diffusers' pipeline and ours agree in fp32."""
    ref = diffusers_pipe
    prompts = [PROMPT, PROMPTS[-1]]  # the second runs past both max lengths: truncation
    txt, pooled = pipe.encode_prompt(prompts)
    ref_txt, ref_pooled, _ = ref.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=512)
    assert txt.shape == (2, 512, 32) and pooled.shape == (2, 32)
    assert max_rel_err(txt, ref_txt) <= TOL
    assert max_rel_err(pooled, ref_pooled) <= TOL

    seed, steps = 3, 4
    out = pipe.edit(image, PROMPT, steps=steps, seed=seed, height=H, width=W)
    assert isinstance(out, EditOutput) and out.image.size == (W, H) and out.mask is None
    noise = pack(NoiseField.sample(tuple(out.editor.source.shape), seed).fine)
    kw = dict(prompt=PROMPT, **_diffusers_kw(image, noise, steps))
    theirs = ref(**kw, output_type="pt").images
    assert max_rel_err(out.pixels, theirs) <= TOL
    theirs_pil = np.asarray(ref(**kw, output_type="pil").images[0], dtype=np.int16)
    assert np.abs(np.asarray(out.image, dtype=np.int16) - theirs_pil).max() <= 1  # 8-bit rounding only
    assert set(out.seconds) == {"encode_prompt", "encode_image", "sample", "decode", "total"}
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


@torch.no_grad()
def test_true_cfg_matches_diffusers(diffusers_pipe, pipe, image):
    """true_cfg_scale > 1 with a negative prompt: diffusers' two forwards per step (v_neg + s (v_pos - v_neg), the
    distilled guidance on in both) and ours agree, sequential and batched."""
    kw = dict(steps=2, seed=3, height=H, width=W, true_cfg_scale=3.0, negative_prompt="blurry, dull")
    two = pipe.edit(image, PROMPT, batched_cfg=False, **kw)
    assert two.editor.neg_txt is not None and two.editor.cfg_scale == 3.0
    noise = pack(NoiseField.sample(tuple(two.editor.source.shape), 3).fine)
    theirs = diffusers_pipe(prompt=PROMPT, negative_prompt="blurry, dull", true_cfg_scale=3.0, output_type="pt",
                            **_diffusers_kw(image, noise, 2)).images  # fmt: skip
    assert max_rel_err(two.pixels, theirs) <= TOL
    one = pipe.edit(image, PROMPT, **kw)  # batched_cfg=True: one forward of batch 2
    assert max_rel_err(one.pixels, theirs) <= TOL
    plain = pipe.edit(image, PROMPT, steps=2, seed=3, height=H, width=W, negative_prompt="blurry, dull")
    assert plain.editor.neg_txt is None and not torch.equal(plain.latent, one.latent)  # scale 1: CFG off


@torch.no_grad()
def test_batch_equals_single_edits(pipe, image):
    """A baseline batch runs as one batch of 2, a SpecEdit batch once per sample; either way edit i equals the
    batch-1 edit of (image i, prompt i) with seed + i."""
    other = _random_image(H, W, 6)
    prompts = [PROMPT, "a red kite in the sky"]
    out = pipe.edit([image, other], prompts, steps=2, seed=3, height=H, width=W)
    assert out.latent.shape[0] == 2 and len(out.images) == 2 and out.result.nfe == 2
    spec = pipe.edit(image, prompts, method="specedit-9", seed=5, height=H, width=W)
    assert spec.result.nfe == 2 * 9 and spec.result.verdict.mask.shape[0] == 2
    for i, (im, prompt) in enumerate(zip([image, other], prompts)):
        single = pipe.edit(im, prompt, steps=2, seed=3 + i, height=H, width=W)
        assert max_rel_err(out.latent[i : i + 1], single.latent) <= TOL
        assert np.abs(np.asarray(out.images[i], np.int16) - np.asarray(single.image, np.int16)).max() <= 1
    one = pipe.edit(image, prompts[1], method="specedit-9", seed=6, height=H, width=W)  # the second sample
    assert max_rel_err(spec.latent[1:], one.latent) <= TOL
    assert torch.equal(spec.result.verdict.mask[1], one.result.verdict.mask[0])


@torch.no_grad()
def test_two_references_follow_the_offset_scheme(pipe, image):
    """Two images: the first is edited (output size, source) and the second follows it in the image stream at
    axis 0 = 1, shifted below it (ComfyUI's "offset": the first is wider than tall), at the first one's area."""
    seen = []
    hook = pipe.model.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    try:
        out = pipe.edit([image, _random_image(48, 80, 7)], PROMPT, steps=1, height=H, width=W)
    finally:
        hook.remove()
    ed = out.editor
    assert out.image.size == (W, H) and ed.grid == (H // 8, W // 8) and len(ed.refs) == 1
    grids = ed.reference(1.0)[1]
    assert grids == ((8, 12), (8, 12))  # 80x48 at the area of 96x64, sides in multiples of 32 px: 96x64
    ids = seen[0][0, ed.grid[0] * ed.grid[1] :]  # after the target tokens
    assert torch.equal(ids, reference_ids(grids, "offset"))
    assert torch.equal(ids[:96], grid_ids((8, 12), axis0=1.0))
    assert torch.equal(ids[96:], grid_ids((8, 12), axis0=1.0) + torch.tensor([0.0, 8.0, 0.0]))
    assert torch.isfinite(out.pixels).all()


def test_reference_ids_reproduce_comfyui():
    """``reference_ids`` against ComfyUI's rule as ComfyUI states it, in latent pixels (h_offset/w_offset in
    ``comfy/ldm/flux/model.py``), converted to tokens by ``(offset + 1) // 2``."""
    grids = [(8, 12), (10, 6), (4, 4), (6, 14)]
    h = w = 0
    expected = []
    for rh, rw in grids:
        lh, lw = 2 * rh, 2 * rw  # latent pixels
        h_off = w_off = 0
        if lh + h > lw + w:
            w_off = w
        else:
            h_off = h
        h, w = max(h, lh + h_off), max(w, lw + w_off)
        expected.append(
            grid_ids((rh, rw), axis0=1.0) + torch.tensor([0.0, (h_off + 1) // 2, (w_off + 1) // 2])
        )
    assert torch.equal(reference_ids(grids, "offset"), torch.cat(expected))
    index = reference_ids(grids, "index")
    assert index[:, 0].unique().tolist() == [1.0, 2.0, 3.0, 4.0] and torch.equal(
        index[96:156, 1:], grid_ids((10, 6))[:, 1:]
    )
    with pytest.raises(ValueError, match="reference method must be one of"):
        reference_ids(grids, "stack")


def test_outputs_and_generator(pipe, image):
    """output "np" is diffusers' float (b, H, W, 3); "latent" skips the decode; a generator stands for the seed
    it draws first."""
    gen = lambda: torch.Generator().manual_seed(11)
    kw = dict(steps=1, height=H, width=W)
    arr = pipe.edit(image, PROMPT, generator=gen(), output="np", **kw)
    lat = pipe.edit(image, PROMPT, generator=gen(), output="latent", **kw)
    seeded = pipe.edit(image, PROMPT, seed=int(torch.randint(2**62, (1,), generator=gen())), **kw)
    assert arr.images.shape == (1, H, W, 3) and arr.images.dtype == np.float32
    assert np.array_equal(arr.images, seeded.pixels.permute(0, 2, 3, 1).numpy())
    assert lat.images is lat.latent and lat.pixels is None and "decode" in lat.seconds
    assert torch.equal(lat.latent, seeded.latent)
    with pytest.raises(ValueError, match="give seed or generator, not both"):
        pipe.edit(image, PROMPT, seed=1, generator=gen(), **kw)


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
    with pytest.raises(TypeError, match="text_encoder_3"):
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
    assert {p.dtype for m in (pipe.model, pipe.ae.module, pipe.t5, pipe.clip) for p in m.parameters()} == {
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
    assert _params_on(gpu.t5) == _params_on(gpu.clip) == _params_on(gpu.ae.module) == {"cpu"}
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
    for steps in (0, -3):
        with pytest.raises(ValueError, match=f"steps must be >= 1 \\(an integer\\), got {steps}"):
            pipe.edit(image, PROMPT, steps=steps)
    with pytest.raises(ValueError, match=r"true_cfg_scale=3.0 needs a negative_prompt"):
        pipe.edit(image, PROMPT, true_cfg_scale=3.0, height=H, width=W)
    with pytest.raises(
        ValueError,
        match=r"edit 1 of the batch has working sizes \[\(1568, 672\)\] but edit 0 has \[\(1248, 832\)\]",
    ):
        pipe.edit([image, _random_image(H, 2 * W, 1)], [PROMPT, PROMPT], steps=1)
    with pytest.raises(ValueError, match="2 prompts need one image \\(shared\\) or 2 image entries, got 3"):
        pipe.edit([image] * 3, [PROMPT, PROMPT], steps=1)
    with pytest.raises(ValueError, match="output must be one of"):
        pipe.edit(image, PROMPT, output="jpeg")
    with pytest.raises(ValueError, match="both height and width"):
        pipe.edit(image, PROMPT, height=H)
    with pytest.raises(ValueError, match="non-empty list of str"):
        pipe.encode_prompt([])


def test_odd_images_and_empty_prompt_have_documented_behaviour(pipe, image):
    """RGBA and greyscale inputs are converted to RGB (transparency composited onto white, with a warning:
    ``models.imageio``), a 1-pixel image is resized to the working size like any other, and an empty prompt is a
    valid prompt (T5 sees only </s>, CLIP only BOS/EOS)."""
    kw = dict(steps=2, height=H, width=W, seed=1)
    rgb = pipe.edit(image, PROMPT, **kw)
    assert torch.equal(pipe.edit(image.convert("RGBA"), PROMPT, **kw).latent, rgb.latent)  # opaque: the same
    rgba = image.convert("RGBA")
    rgba.putalpha(77)
    white = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), rgba).convert("RGB")
    with pytest.warns(UserWarning, match="transparent pixels"):
        translucent = pipe.edit(rgba, PROMPT, **kw)
    assert torch.equal(translucent.latent, pipe.edit(white, PROMPT, **kw).latent)
    grey = pipe.edit(image.convert("L"), PROMPT, steps=2, height=H, width=W, seed=1)
    assert grey.image.size == (W, H) and torch.isfinite(grey.latent).all()
    dot = pipe.edit(Image.new("RGB", (1, 1), (200, 30, 30)), PROMPT, steps=2, height=H, width=W)
    assert dot.image.size == (W, H) and torch.isfinite(dot.latent).all()
    empty = pipe.edit(image, "", **kw)
    assert torch.isfinite(empty.latent).all() and not torch.equal(empty.latent, rgb.latent)
