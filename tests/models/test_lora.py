"""LoRA reading and fusing: parity with diffusers' own LoRA loading + fuse on tiny FLUX(-Kontext) and
Qwen-Image models in every layout, exact unfuse (also from memory-mapped weights), one-line errors.

The reference is diffusers' ``lora_state_dict`` (``FluxKontextPipeline``: it converts kohya, XLabs and the
``lora_transformer_`` layout; ``QwenImageEditPipeline``: ``_convert_non_diffusers_qwen_lora_to_diffusers``
for ``lora_unet_``, ``diffusion_model.``, ``default.`` and alpha-carrying files) +
``load_lora_into_transformer`` + ``fuse_lora`` on a ``FluxTransformer2DModel`` /
``QwenImageTransformer2DModel`` holding the same base weights (FLUX via tests/refs.py's independent BFL ->
diffusers mapping). Layouts diffusers does not read (BFL names, PEFT's ``base_model.model.`` prefix, no
prefix for FLUX) are checked against the same tensors under a name diffusers reads; ``.diff`` / ``.diff_b``
(diffusers drops or refuses them) against the formula.
"""

import pytest
import torch
from diffusers import (
    FluxKontextPipeline,
    FluxTransformer2DModel,
    QwenImageEditPipeline,
    QwenImageTransformer2DModel,
)
from refs import flux_bfl_to_diffusers, max_rel_err, randomize_, tiny_flux_kwargs
from refs_qwen import tiny_qwen_kwargs
from safetensors.torch import save_file
from torch import nn

import models.lora as lora_mod
from models.flux import FLUX_TINY, Flux, FluxConfig, load_flux
from models.loading import CheckpointError, file_span
from models.lora import fuse_lora, read_lora, unfuse_lora
from models.packing import grid_ids
from models.qwen_image import QWEN_IMAGE_TINY, QwenImage, load_qwen_image, official_ids

pytest.importorskip("peft")  # diffusers' LoRA loading needs it

TOL = 1e-5
SCALE = 0.8
# kohya / BFL parity covers the blocks: diffusers 0.42.1's kohya converter drops the final layer's alphas
# ("TODO: alphas") and names the embedders without the "transformer." prefix, so they do not load there.
# Our embedder / final-layer targets in these layouts are our own module paths (checked in the bf16 test).
IN_BLOCKS = lambda n: "blocks." in n  # noqa: E731
QWEN_SHAPES = [(1, 4, 6), (1, 3, 5)]  # target and one reference, in packed tokens


# ----------------------------------------------------------------------------------------------- FLUX
def _inputs(cfg: FluxConfig, batch=2, txt_len=7, seed=1) -> dict:
    """A 4x6 target plus a 3x5 reference image (Kontext), per-sample sigma / guidance."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([grid_ids((4, 6)), grid_ids((3, 5), axis0=1.0)])
    return dict(
        img=torch.randn(batch, len(ids), cfg.in_channels, generator=g),
        img_ids=ids[None].expand(batch, -1, -1),
        txt=torch.randn(batch, txt_len, cfg.context_in_dim, generator=g),
        txt_ids=torch.zeros(batch, txt_len, 3),
        timesteps=torch.tensor([0.7, 0.25])[:batch],
        y=torch.randn(batch, cfg.vec_in_dim, generator=g),
        guidance=torch.tensor([2.5, 4.0])[:batch],
    )


@torch.no_grad()
def _diffusers_out(ref: FluxTransformer2DModel, a: dict) -> torch.Tensor:
    outs = []
    for i in range(a["img"].shape[0]):  # diffusers takes 2-D ids, so run the samples one by one
        kw = dict(encoder_hidden_states=a["txt"][i : i + 1], pooled_projections=a["y"][i : i + 1])
        kw |= dict(timestep=a["timesteps"][i : i + 1], guidance=a["guidance"][i : i + 1])
        kw |= dict(img_ids=a["img_ids"][i], txt_ids=a["txt_ids"][i], return_dict=False)
        outs.append(ref(hidden_states=a["img"][i : i + 1], **kw)[0])
    return torch.cat(outs)


def _models() -> tuple[Flux, FluxTransformer2DModel]:
    """Our tiny FLUX and diffusers' with the same random weights."""
    cfg = FLUX_TINY
    ours = randomize_(Flux(cfg), seed=4).eval()
    ref = FluxTransformer2DModel(**tiny_flux_kwargs()).eval()
    sd = flux_bfl_to_diffusers(ours.state_dict(), cfg.depth, cfg.depth_single_blocks, cfg.hidden_size)
    ref.load_state_dict(sd, strict=True)
    return ours, ref


def _random_lora(model: nn.Module, prefix: str, down="lora_A.weight", up="lora_B.weight", names=None, **kw):
    """A random LoRA on every linear of ``model`` (whose name passes ``names``); ranks 2..4, alpha != rank.

    ``lora_unet_`` / ``lora_transformer_`` prefixes write the path with '_'. kw: ``alpha=False`` leaves the
    alphas out, ``bias=True`` adds ``lora_B.bias``. Rank and alpha depend on the last name component only
    (to_q: r 2, alpha 3.5r; to_k: r 2, 1.5r; to_v: r 4, 0.5r): PEFT's per-module rank / alpha patterns,
    which diffusers builds, are matched by name suffix, so a top-level ``proj_out`` with its own alpha would
    also set the single blocks' ``proj_out`` alpha.
    """
    g = torch.Generator().manual_seed(len(prefix) + len(down))
    sd = {}
    linears = sorted((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear))
    for n, mod in linears:
        if names is not None and not names(n):
            continue
        i = sum(map(ord, n.split(".")[-1]))
        r = 2 + i % 3
        key = prefix + (n.replace(".", "_") if prefix.endswith("_") else n)
        sd[f"{key}.{down}"] = 0.3 * torch.randn(r, mod.in_features, generator=g)  # (r, in)
        sd[f"{key}.{up}"] = 0.3 * torch.randn(mod.out_features, r, generator=g)  # (out, r)
        if kw.get("alpha", True):
            sd[f"{key}.alpha"] = torch.tensor(r * (0.5 + i % 4))  # 0.5r, 1.5r, 2.5r, 3.5r
        if kw.get("bias", False):
            sd[f"{key}.{up.replace('.weight', '.bias')}"] = 0.3 * torch.randn(mod.out_features, generator=g)
    return sd


def _rename(sd: dict, pairs: dict[str, str]) -> dict:
    """Keys with each ``old`` substring of ``pairs`` replaced by its ``new``."""
    out = {}
    for k, v in sd.items():
        for old, new in pairs.items():
            k = k.replace(old, new)
        out[k] = v
    return out


def _diffusers_from_kohya(kohya: dict, cfg: FluxConfig) -> dict:
    """diffusers' kohya converter, except single blocks' ``linear1``: that converter splits it at the
    full-size dims (3 x 3072 + 12288), so here it is split as it does for a non-sparse up weight: the
    down weight times alpha / r is copied to q, k, v, proj_mlp and the up weight's rows are split."""
    linear1 = {k: v for k, v in kohya.items() if "_linear1." in k}
    out = FluxKontextPipeline.lora_state_dict({k: v for k, v in kohya.items() if k not in linear1})
    d = cfg.hidden_size
    for i in range(cfg.depth_single_blocks):
        key, t = f"lora_unet_single_blocks_{i}_linear1", f"transformer.single_transformer_blocks.{i}"
        a, b = linear1[f"{key}.lora_down.weight"], linear1[f"{key}.lora_up.weight"]
        a = a * (linear1[f"{key}.alpha"] / a.shape[0])
        for name, up in zip(
            ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), b.split([d, d, d, b.shape[0] - 3 * d])
        ):
            out[f"{t}.{name}.lora_A.weight"], out[f"{t}.{name}.lora_B.weight"] = a, up
    return out


def _bfl_as_kohya(lora: dict) -> dict:
    """BFL-named LoRA tensors (any dotted prefix, A/B or down/up) under kohya names, which diffusers reads."""
    kohya = {}
    for k, v in _rename(lora, {"lora_A": "lora_down", "lora_B": "lora_up"}).items():
        path = k.removeprefix("base_model.model.").removeprefix("diffusion_model.")
        suffix = next(x for x in (".alpha", ".lora_down.weight", ".lora_up.weight") if path.endswith(x))
        kohya[f"lora_unet_{path.removesuffix(suffix).replace('.', '_')}{suffix}"] = v
    assert len(kohya) == len(lora) and all(k.count(".") <= 2 for k in kohya)
    return kohya


def _check_unfuse(model: nn.Module, original: dict) -> None:
    unfuse_lora(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def _parity(ours: Flux, ref: FluxTransformer2DModel, ours_lora, ref_lora: dict) -> float:
    """Fuse ``ours_lora`` into ours and ``ref_lora`` into diffusers' (its loaders); the relative error.
    Unfusing ours afterwards restores every weight exactly."""
    a = _inputs(ours.config)
    original = {k: v.clone() for k, v in ours.state_dict().items()}
    with torch.no_grad():
        base = ours(**a)
    fuse_lora(ours, ours_lora, scale=SCALE)
    state, alphas = FluxKontextPipeline.lora_state_dict(dict(ref_lora), return_alphas=True)
    FluxKontextPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=ref)
    wrapped = sum(len(getattr(m, "lora_A", ())) > 0 for m in ref.modules())
    assert wrapped == sum(k.endswith("lora_A.weight") for k in state)  # diffusers dropped no module
    ref.fuse_lora(lora_scale=SCALE)
    with torch.no_grad():
        got = ours(**a)
    assert max_rel_err(got, base) > 1e-2  # the LoRA changed the output
    err = max_rel_err(got, _diffusers_out(ref, a))
    print(f"FLUX LoRA parity rel err {err:.2e}")
    _check_unfuse(ours, original)
    return err


@pytest.mark.parametrize(
    "prefix, down, up",
    [
        ("transformer.", "lora_A.weight", "lora_B.weight"),  # diffusers / ai-toolkit
        ("", "lora_A.weight", "lora_B.weight"),  # no prefix
        ("base_model.model.", "lora_A.default.weight", "lora_B.default.weight"),  # a PEFT model's own keys
    ],
    ids=["transformer", "no-prefix", "peft"],
)
def test_diffusers_names_every_linear(tmp_path, prefix, down, up):
    """<prefix><diffusers module>.lora_A/B + alpha on every linear: q/k/v fused, norm_out rows swapped."""
    ours, ref = _models()
    lora = _random_lora(ref, prefix, down, up)
    save_file(lora, tmp_path / "lora.safetensors")
    as_diffusers = {"transformer." + k.removeprefix(prefix): v for k, v in lora.items()}
    as_diffusers = _rename(as_diffusers, {".default.": "."})
    assert _parity(ours, ref, tmp_path / "lora.safetensors", as_diffusers) <= TOL


def test_diffusers_old_spelling_partial_qkv():
    """lora.down / lora.up; a LoRA on to_q and proj_mlp only leaves the other fused rows untouched."""
    ours, ref = _models()
    keep = lambda n: not n.endswith(("to_k", "to_v", "add_k_proj"))  # noqa: E731
    lora = _random_lora(ref, "transformer.", names=keep)
    old = _rename(lora, {"lora_A.weight": "lora.down.weight", "lora_B.weight": "lora.up.weight"})
    w = ours.single_blocks[0].linear1.weight.clone()
    fuse_lora(ours, old)
    d = ours.config.hidden_size
    assert torch.equal(ours.single_blocks[0].linear1.weight[d : 3 * d], w[d : 3 * d])
    unfuse_lora(ours)
    assert _parity(ours, ref, old, lora) <= TOL


def test_diffusers_lora_bias():
    """PEFT's lora_B.bias (lora_bias=True) lands in the linear biases, q/k/v ones in row slices."""
    ours, ref = _models()
    lora = _random_lora(ref, "transformer.", bias=True)
    assert _parity(ours, ref, lora, lora) <= TOL


def test_kohya_layout(tmp_path):
    ours, ref = _models()
    lora = _random_lora(ours, "lora_unet_", "lora_down.weight", "lora_up.weight", names=IN_BLOCKS)
    save_file(lora, tmp_path / "kohya.safetensors")
    ref_lora = _diffusers_from_kohya(lora, ours.config)
    assert _parity(ours, ref, tmp_path / "kohya.safetensors", ref_lora) <= TOL


@pytest.mark.parametrize(
    "prefix, down, up",
    [
        ("diffusion_model.", "lora_A.weight", "lora_B.weight"),  # BFL / ComfyUI
        ("diffusion_model.", "lora_down.weight", "lora_up.weight"),
        ("", "lora_A.weight", "lora_B.weight"),  # ai-toolkit's BFL-named files
        ("base_model.model.", "lora_A.weight", "lora_B.weight"),  # fal's Kontext trainer (PEFT on BFL)
    ],
    ids=["comfy-AB", "comfy-down-up", "no-prefix", "peft"],
)
def test_bfl_names(prefix, down, up):
    ours, ref = _models()
    lora = _random_lora(ours, prefix, down, up, names=IN_BLOCKS)
    assert _parity(ours, ref, lora, _diffusers_from_kohya(_bfl_as_kohya(lora), ours.config)) <= TOL


def test_lora_transformer_layout():
    """``lora_transformer_<diffusers path with _>`` + alpha, read by diffusers' mixture converter (which maps
    the attention projections and the top-level layers only)."""
    ours, ref = _models()
    keep = lambda n: ".attn." in n or "blocks" not in n  # noqa: E731
    lora = _random_lora(ref, "lora_transformer_", "lora_down.weight", "lora_up.weight", names=keep)
    assert _parity(ours, ref, lora, lora) <= TOL


def test_xlabs_layout():
    """XLabs: ``double_blocks.N.processor.{qkv,proj}_lora{1,2}.down/up.weight``, single blocks' ``qkv_lora``
    (linear1's q/k/v rows) and ``proj_lora`` (linear2); no alpha."""
    ours, ref = _models()
    cfg, g = ours.config, torch.Generator().manual_seed(7)
    d, r, lora = cfg.hidden_size, 3, {}

    def put(key, n_in, n_out):
        lora[f"{key}.down.weight"] = 0.3 * torch.randn(r, n_in, generator=g)
        lora[f"{key}.up.weight"] = 0.3 * torch.randn(n_out, r, generator=g)

    for i in range(cfg.depth):
        for s in "12":
            put(f"double_blocks.{i}.processor.qkv_lora{s}", d, 3 * d)
            put(f"double_blocks.{i}.processor.proj_lora{s}", d, d)
    for i in range(cfg.depth_single_blocks):
        put(f"single_blocks.{i}.processor.qkv_lora", d, 3 * d)
        put(f"single_blocks.{i}.processor.proj_lora", d + cfg.mlp_hidden, d)
    assert _parity(ours, ref, lora, lora) <= TOL


def test_diff_and_diff_b_exact():
    """ComfyUI full deltas: ``.diff`` (weight) and ``.diff_b`` (bias) add ``scale`` times themselves, also
    into a row slice (diffusers' to_q -> qkv rows [0, d)); unfuse restores."""
    ours, _ = _models()
    d = ours.config.hidden_size
    g = torch.Generator().manual_seed(3)
    w, b, qkv_b = (
        ours.img_in.weight.clone(),
        ours.img_in.bias.clone(),
        ours.double_blocks[0].img_attn.qkv.bias,
    )
    qkv_b0 = qkv_b.clone()
    lora = {
        "diffusion_model.img_in.diff": torch.randn(w.shape, generator=g),
        "diffusion_model.img_in.diff_b": torch.randn(b.shape, generator=g),
        "transformer.transformer_blocks.0.attn.to_q.diff_b": torch.randn(d, generator=g),
    }
    assert fuse_lora(ours, lora, scale=SCALE) == ["double_blocks.0.img_attn.qkv", "img_in"]
    assert torch.equal(ours.img_in.weight, w + SCALE * lora["diffusion_model.img_in.diff"])
    assert torch.equal(ours.img_in.bias, b + SCALE * lora["diffusion_model.img_in.diff_b"])
    q = lora["transformer.transformer_blocks.0.attn.to_q.diff_b"]
    assert torch.equal(qkv_b[:d], qkv_b0[:d] + SCALE * q) and torch.equal(qkv_b[d:], qkv_b0[d:])
    assert unfuse_lora(ours) == ["double_blocks.0.img_attn.qkv", "img_in"]
    assert torch.equal(ours.img_in.weight, w) and torch.equal(qkv_b, qkv_b0)


def test_stacking_and_unfuse_exact():
    ours, _ = _models()
    original = {k: v.clone() for k, v in ours.state_dict().items()}
    first = _random_lora(ours, "diffusion_model.")
    touched = fuse_lora(ours, first, scale=0.5)
    fuse_lora(ours, _random_lora(ours, "lora_unet_", "lora_down.weight", "lora_up.weight"), scale=-1.5)
    assert not torch.equal(ours.img_in.weight, original["img_in.weight"])
    assert unfuse_lora(ours) == touched
    assert all(torch.equal(v, original[k]) for k, v in ours.state_dict().items())
    assert unfuse_lora(ours) == []
    # two half-scale fuses equal one full-scale fuse (up to fp32 rounding)
    fuse_lora(ours, first, 0.5)
    fuse_lora(ours, first, 0.5)
    twice = ours.img_in.weight.clone()
    unfuse_lora(ours)
    fuse_lora(ours, first, 1.0)
    assert (
        max_rel_err(twice - original["img_in.weight"], ours.img_in.weight - original["img_in.weight"]) < 1e-5
    )


def test_row_blocks_equal_one_pass(monkeypatch):
    """Fusing a few rows at a time (bounded temporary memory) gives the one-pass result."""
    ours, _ = _models()
    lora = _random_lora(ours, "diffusion_model.")
    fuse_lora(ours, lora)
    one = {k: v.clone() for k, v in ours.state_dict().items()}
    unfuse_lora(ours)
    monkeypatch.setattr(lora_mod, "_CHUNK", 40)  # one or two rows per step
    fuse_lora(ours, lora)
    assert all(max_rel_err(v, one[k]) < 1e-6 for k, v in ours.state_dict().items())


def test_bf16_weights_stored_in_their_dtype():
    ours, _ = _models()
    ours.to(torch.bfloat16)
    w = ours.img_in.weight.clone()
    lora = _random_lora(ours, "diffusion_model.")
    fuse_lora(ours, lora)
    d = read_lora(ours, lora)["img_in"]
    r = d.a.shape[0]
    expect = (w.float() + d.alpha / r * (d.b.float() @ d.a.float())).to(torch.bfloat16)
    assert ours.img_in.weight.dtype == torch.bfloat16 and torch.equal(ours.img_in.weight, expect)
    unfuse_lora(ours)
    assert torch.equal(ours.img_in.weight, w)


@pytest.mark.gpu
def test_cuda_weights():
    """Weights on a GPU: the fused result matches the CPU one; the originals are CPU copies; unfuse exact."""
    ours, _ = _models()
    lora = _random_lora(ours, "diffusion_model.", bias=True)
    gpu = Flux(FLUX_TINY).eval()
    gpu.load_state_dict(ours.state_dict())
    gpu.cuda()
    original = {k: v.clone() for k, v in gpu.state_dict().items()}
    fuse_lora(ours, lora)
    fuse_lora(gpu, lora)
    assert all(max_rel_err(v.cpu(), ours.state_dict()[k]) < 1e-5 for k, v in gpu.state_dict().items())
    assert all(v.device.type == "cpu" for v in lora_mod._ORIGINALS[gpu].params.values())
    _check_unfuse(gpu, original)


# ----------------------------------------------------------------------------------------------- Qwen
def _qwen_models() -> tuple[QwenImage, QwenImageTransformer2DModel]:
    ref = randomize_(QwenImageTransformer2DModel(**tiny_qwen_kwargs()), seed=5).eval()
    ours = QwenImage(QWEN_IMAGE_TINY).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _qwen_inputs(seed=2) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg, n, l = QWEN_IMAGE_TINY, sum(f * h * w for f, h, w in QWEN_SHAPES), 6
    img_ids, txt_ids = official_ids(QWEN_SHAPES, l)
    return dict(
        img=torch.randn(2, n, cfg.in_channels, generator=g),
        img_ids=img_ids,
        txt=torch.randn(2, l, cfg.joint_attention_dim, generator=g),
        txt_ids=txt_ids,
        timesteps=torch.tensor([0.7, 0.25]),
    )


@torch.no_grad()
def _qwen_ref_out(ref: QwenImageTransformer2DModel, a: dict) -> torch.Tensor:
    mask = torch.ones(a["txt"].shape[:2], dtype=torch.long)
    kw = dict(encoder_hidden_states=a["txt"], encoder_hidden_states_mask=mask, timestep=a["timesteps"])
    return ref(hidden_states=a["img"], img_shapes=[QWEN_SHAPES] * 2, return_dict=False, **kw)[0]


def _qwen_parity(ours: QwenImage, ref: QwenImageTransformer2DModel, ours_lora, ref_lora: dict) -> float:
    a = _qwen_inputs()
    original = {k: v.clone() for k, v in ours.state_dict().items()}
    with torch.no_grad():
        base = ours(**a)
    fuse_lora(ours, ours_lora, scale=SCALE)
    state = QwenImageEditPipeline.lora_state_dict(dict(ref_lora))
    QwenImageEditPipeline.load_lora_into_transformer(state, transformer=ref)
    wrapped = sum(len(getattr(m, "lora_A", ())) > 0 for m in ref.modules())
    assert wrapped == sum(k.endswith("lora_A.weight") for k in state)
    ref.fuse_lora(lora_scale=SCALE)
    with torch.no_grad():
        got = ours(**a)
    assert max_rel_err(got, base) > 1e-2
    err = max_rel_err(got, _qwen_ref_out(ref, a))
    print(f"Qwen-Image LoRA parity rel err {err:.2e}")
    _check_unfuse(ours, original)
    return err


@pytest.mark.parametrize(
    "prefix, down, up",
    [
        ("", "lora_down.weight", "lora_up.weight"),  # Qwen-Image-Lightning
        ("diffusion_model.", "lora_down.weight", "lora_up.weight"),  # ComfyUI / Lightning
        ("diffusion_model.", "lora_A.weight", "lora_B.weight"),  # ai-toolkit
        ("", "lora_A.weight", "lora_B.weight"),  # diffusers names, no prefix, alpha
        ("", "lora_A.default.weight", "lora_B.default.weight"),  # DiffSynth
        ("lora_unet_", "lora_down.weight", "lora_up.weight"),  # kohya / musubi-tuner
    ],
    ids=["lightning", "comfy-lightning", "ai-toolkit", "no-prefix", "diffsynth", "kohya"],
)
def test_qwen_layouts(tmp_path, prefix, down, up):
    """Every linear, rank 2..4, alpha != rank; diffusers reads each of these files itself."""
    ours, ref = _qwen_models()
    lora = _random_lora(ours, prefix, down, up)
    save_file(lora, tmp_path / "lora.safetensors")
    assert _qwen_parity(ours, ref, tmp_path / "lora.safetensors", lora) <= TOL


def test_qwen_diffusers_bias_and_peft_prefix():
    """transformer.<module>.lora_A/B + lora_B.bias (no alpha: diffusers reads alphas only by converting);
    the same under PEFT's base_model.model. prefix and the old lora.down/up spelling reads the same."""
    ours, ref = _qwen_models()
    lora = _random_lora(ours, "transformer.", alpha=False, bias=True)
    peft = {"base_model.model." + k.removeprefix("transformer."): v for k, v in lora.items()}
    old = _rename(lora, {"lora_A.weight": "lora.down.weight", "lora_B.weight": "lora.up.weight"})
    for a, b in ((peft, old), (lora, old)):
        assert all(
            torch.equal(x.b, y.b) for x, y in zip(read_lora(ours, a).values(), read_lora(ours, b).values())
        )
    assert _qwen_parity(ours, ref, peft, lora) <= TOL


# ----------------------------------------------------------------------------------------------- mmap
def _bfl_file(tmp_path, dtype=torch.float32):
    ours, _ = _models()
    path = tmp_path / "flux1-tiny.safetensors"
    save_file({k: v.to(dtype) for k, v in ours.state_dict().items()}, path)
    return path


def test_fuse_from_memory_map_keeps_no_copy(tmp_path):
    """A BFL file loaded memory-mapped: fused weights are recorded as file spans (no copy); unfuse restores
    them exactly from the unchanged file, also twice in a row and for biases."""
    path = _bfl_file(tmp_path)
    data = path.read_bytes()
    model = load_flux(path, config=FLUX_TINY)
    assert file_span(model.single_blocks[0].linear1.weight) is not None
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lora = _random_lora(model, "diffusion_model.", bias=True)
    for _ in range(2):
        fuse_lora(model, lora, scale=SCALE)
        saved = lora_mod._ORIGINALS[model]
        assert len(saved.params) == 2 * len(read_lora(model, lora)) and len(saved.files) == 1
        assert not any(isinstance(v, torch.Tensor) for v in saved.params.values())
        assert not torch.equal(model.img_in.weight, original["img_in.weight"])
        _check_unfuse(model, original)
        assert file_span(model.single_blocks[0].linear1.weight) is not None
    assert path.read_bytes() == data


def test_memory_map_edited_or_moved_weights(tmp_path):
    """A weight edited in place after loading is copied (restored to the edit, not the file); a model cast
    to another dtype after fusing is restored from the file's bytes, cast."""
    path = _bfl_file(tmp_path, torch.bfloat16)
    model = load_flux(path, config=FLUX_TINY)
    with torch.no_grad():
        model.img_in.weight.mul_(2)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lora = _random_lora(model, "diffusion_model.")
    fuse_lora(model, lora)
    saved = lora_mod._ORIGINALS[model].params
    assert isinstance(saved["img_in.weight"], torch.Tensor)
    assert not isinstance(saved["txt_in.weight"], torch.Tensor)
    model.float()
    _check_unfuse(model, {k: v.float() for k, v in original.items()})


def test_qwen_memory_map(tmp_path):
    """Qwen-Image from a diffusers folder (sharded): every weight is a file view; fuse / unfuse exact."""
    _, ref = _qwen_models()
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="100KB")
    model = load_qwen_image(tmp_path)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_lora(model, _random_lora(model, "", "lora_down.weight", "lora_up.weight"))
    assert not any(isinstance(v, torch.Tensor) for v in lora_mod._ORIGINALS[model].params.values())
    _check_unfuse(model, original)


def test_file_span(tmp_path):
    """models.loading.file_span finds a loaded weight's bytes in its file; copies and views across rows don't."""
    path = _bfl_file(tmp_path)
    w = load_flux(path, config=FLUX_TINY).img_in.weight
    span = file_span(w)
    assert span.path.resolve() == path.resolve() and span.nbytes == w.numel() * 4
    raw = bytearray(path.read_bytes()[span.offset : span.offset + span.nbytes])
    assert torch.equal(torch.frombuffer(raw, dtype=torch.float32).view_as(w), w)
    assert file_span(w.t()) is None and file_span(w.detach().clone()) is None
    assert file_span(_models()[0].img_in.weight) is None  # not from a file


# ----------------------------------------------------------------------------------------------- errors
def test_bad_inputs(tmp_path):
    ours, _ = _models()
    good = _random_lora(ours, "diffusion_model.", names=lambda n: n == "img_in")
    extra = {f"lora_te1_text_model_{i}.lora_down.weight": torch.zeros(2, 3) for i in range(7)}
    with pytest.raises(
        ValueError,
        match=r"^LoRA state dict: 7 LoRA keys match no module of Flux, e\.g\. \[.*\] \(text-encoder keys",
    ):
        fuse_lora(ours, good | extra)
    a, b = "diffusion_model.img_in.lora_A.weight", "diffusion_model.img_in.lora_B.weight"
    with pytest.raises(
        ValueError, match=r"diffusion_model\.img_in rank mismatch: A \(2, 16\) vs B \(.+, 3\)"
    ):
        fuse_lora(ours, good | {b: torch.zeros(ours.img_in.out_features, 3)})
    with pytest.raises(ValueError, match=r"diffusion_model\.img_in shape mismatch: delta \(.+, 5\)"):
        fuse_lora(ours, good | {a: torch.zeros(2, 5)})
    with pytest.raises(ValueError, match=r"diffusion_model\.img_in has no up/B weight"):
        fuse_lora(ours, {a: good[a]})
    # a failing file changes nothing
    assert unfuse_lora(ours) == []
    save_file(good, tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    (tmp_path / "text.safetensors").write_bytes(b"not a safetensors file at all")
    for bad in ("cut.safetensors", "text.safetensors"):
        with pytest.raises(CheckpointError, match=bad):
            fuse_lora(ours, tmp_path / bad)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        fuse_lora(ours, tmp_path / "missing.safetensors")
    save_file({}, tmp_path / "empty.safetensors")
    with pytest.raises(ValueError, match=r"empty\.safetensors holds no tensors$"):
        fuse_lora(ours, tmp_path / "empty.safetensors")


def test_bad_tensors():
    ours, _ = _models()
    good = _random_lora(ours, "diffusion_model.", names=lambda n: n == "img_in")
    key = "diffusion_model.img_in"
    cases = [
        ({f"{key}.alpha": torch.ones(2)}, r"img_in alpha has shape \(2,\), not a scalar"),
        ({f"{key}.lora_B.bias": torch.ones(3)}, r"img_in lora_B\.bias shape \(3,\) vs target \(32,\)"),
        ({f"{key}.diff": torch.ones(3, 3)}, r"img_in diff shape \(3, 3\) vs target \(32, 16\)"),
        ({f"{key}.lora_A.bias": torch.ones(2)}, r"1 LoRA keys match .* \(tensor kinds not read here\)"),
        ({"diffusion_model.img_in.lora.down.weight": good[f"{key}.lora_A.weight"]}, r"img_in has two A"),
        (
            {"diffusion_model.double_blocks.0.img_attn.norm.query_norm.diff": torch.ones(16)},
            r"\(targets that are not linear layers\)",
        ),
        ({"diffusion_model.nothing_here.lora_A.weight": torch.ones(2, 2)}, r"\(no such module\)"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            fuse_lora(ours, good | extra)
    no_bias = Flux(FluxConfig(**{**FLUX_TINY.__dict__, "qkv_bias": False}))
    with pytest.raises(ValueError, match=r"img_attn\.qkv has a bias delta but the layer has no bias"):
        fuse_lora(no_bias, {"diffusion_model.double_blocks.0.img_attn.qkv.diff_b": torch.ones(96)})
    assert unfuse_lora(ours) == []


@pytest.mark.parametrize(
    "key, kind",
    [
        ("lora_unet_double_blocks_0_img_attn_qkv.dora_scale", "DoRA"),
        ("transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector", "DoRA"),
        ("lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a", "LoHa"),
        ("lora_unet_double_blocks_0_img_attn_qkv.lokr_w1", "LoKr"),
        ("lora_unet_double_blocks_0_img_attn_qkv.oft_blocks", "OFT / BOFT"),
        ("lora_unet_double_blocks_0_img_attn_qkv.on_input", r"\(IA\)\^3"),
        ("lora_unet_double_blocks_0_img_attn_qkv.a1.weight", "GLoRA"),
        ("lora_unet_double_blocks_0_img_attn_qkv.lora_mid.weight", "LoCon Tucker"),
    ],
)
def test_unsupported_adapter_kinds(key, kind):
    ours, _ = _models()
    good = _random_lora(ours, "diffusion_model.", names=lambda n: n == "img_in")
    with pytest.raises(ValueError, match=rf"^LoRA state dict: {kind} adapters are not supported \(1 "):
        fuse_lora(ours, good | {key: torch.ones(2)})


def test_other_family(tmp_path):
    flux, ref = _models()
    qwen, _ = _qwen_models()
    for lora in (
        _random_lora(flux, "lora_unet_", "lora_down.weight", "lora_up.weight"),
        _random_lora(ref, "transformer."),  # diffusers-named FLUX: single_transformer_blocks, ff_context
    ):
        with pytest.raises(
            ValueError, match=r"is a FLUX LoRA \(double_blocks/single_blocks keys\), not for Qwen"
        ):
            fuse_lora(qwen, lora)
    with pytest.raises(
        ValueError, match=r"is a Qwen-Image LoRA \(img_mod\.1/img_mlp\.net keys\), not for Flux"
    ):
        fuse_lora(flux, _random_lora(qwen, "diffusion_model."))
    sdxl = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(2, 4)}
    with pytest.raises(ValueError, match=r"is a Stable Diffusion UNet LoRA \(down_blocks/up_blocks keys\)"):
        fuse_lora(flux, sdxl)
    # attention-only Qwen names read as FLUX diffusers names (same widths here): the metadata tells
    attn = _random_lora(qwen, "", names=lambda n: n.endswith("attn.to_q"))
    save_file(attn, tmp_path / "q.safetensors", metadata={"modelspec.architecture": "qwen-image/lora"})
    with pytest.raises(ValueError, match=r"q\.safetensors is a LoRA for 'qwen-image/lora' \(its metadata\)"):
        fuse_lora(flux, tmp_path / "q.safetensors")
    assert unfuse_lora(flux) == [] and unfuse_lora(qwen) == []
