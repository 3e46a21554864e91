"""LoRA reading and fusing: parity with diffusers' own LoRA loading + fuse on tiny FLUX models, every layout.

The reference is diffusers' ``FluxLoraLoaderMixin.lora_state_dict`` (which converts kohya-format files with
its public ``_convert_kohya_flux_lora_to_diffusers``) + ``load_lora_into_transformer`` + ``fuse_lora`` on a
``FluxTransformer2DModel`` holding the same base weights (via tests/refs.py's independent BFL -> diffusers
mapping). BFL / ComfyUI files name BFL module paths, so their reference is the same tensors under kohya names.
"""

import pytest
import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from refs import flux_bfl_to_diffusers, max_rel_err, randomize_, tiny_flux_kwargs
from safetensors.torch import save_file
from torch import nn

from models.flux import FLUX_TINY, Flux, FluxConfig
from models.loading import CheckpointError
from models.lora import fuse_lora, read_lora, unfuse_lora
from models.packing import grid_ids

pytest.importorskip("peft")  # diffusers' LoRA loading needs it

TOL = 1e-5
SCALE = 0.8
# kohya / BFL parity covers the blocks: diffusers 0.42.1's kohya converter drops the final layer's alphas
# ("TODO: alphas") and names the embedders without the "transformer." prefix, so they do not load there.
# Our embedder / final-layer targets in these layouts are our own module paths (checked in the bf16 test).
IN_BLOCKS = lambda n: "blocks." in n  # noqa: E731


def _inputs(cfg: FluxConfig, batch=2, txt_len=7, seed=1) -> dict:
    """A 4x6 target plus a 3x5 reference image, per-sample sigma / guidance."""
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


def _random_lora(model: nn.Module, prefix: str, down="lora_A.weight", up="lora_B.weight", names=None):
    """A random LoRA on every linear of ``model`` (whose name passes ``names``); ranks 2..4, alpha != rank.

    Rank and alpha depend on the last name component only (to_q: r 2, alpha 3.5r; to_k: r 2, 1.5r; to_v:
    r 4, 0.5r): PEFT's per-module rank / alpha patterns, which diffusers builds, are matched by name suffix,
    so a top-level ``proj_out`` with its own alpha would also set the single blocks' ``proj_out`` alpha.
    """
    g = torch.Generator().manual_seed(len(prefix) + len(down))
    sd = {}
    linears = sorted((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear))
    for n, mod in linears:
        if names is not None and not names(n):
            continue
        i = sum(map(ord, n.split(".")[-1]))
        r = 2 + i % 3
        key = prefix + (n.replace(".", "_") if prefix == "lora_unet_" else n)
        sd[f"{key}.{down}"] = 0.3 * torch.randn(r, mod.in_features, generator=g)  # (r, in)
        sd[f"{key}.{up}"] = 0.3 * torch.randn(mod.out_features, r, generator=g)  # (out, r)
        sd[f"{key}.alpha"] = torch.tensor(r * (0.5 + i % 4))  # 0.5r, 1.5r, 2.5r, 3.5r
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


def _parity(ours: Flux, ref: FluxTransformer2DModel, ours_lora, ref_lora: dict) -> float:
    """Fuse ``ours_lora`` into ours and ``ref_lora`` into diffusers' (its loaders); the relative error."""
    a = _inputs(ours.config)
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
    print(f"LoRA parity rel err {err:.2e}")
    return err


def test_diffusers_layout_every_linear(tmp_path):
    """transformer.<diffusers module>.lora_A/B + alpha on every linear: q/k/v fused, norm_out rows swapped."""
    ours, ref = _models()
    lora = _random_lora(ref, "transformer.")
    save_file(lora, tmp_path / "diffusers.safetensors")
    assert _parity(ours, ref, tmp_path / "diffusers.safetensors", lora) <= TOL


def test_diffusers_old_spelling_partial_qkv():
    """lora.down / lora.up; a LoRA on to_q and proj_mlp only leaves the other fused rows untouched."""
    ours, ref = _models()
    keep = lambda n: not n.endswith(("to_k", "to_v", "add_k_proj"))  # noqa: E731
    lora = _random_lora(ref, "transformer.", names=keep)
    old = _rename(lora, {"lora_A.weight": "lora.down.weight", "lora_B.weight": "lora.up.weight"})
    w = ours.single_blocks[0].linear1.weight.clone()
    assert _parity(ours, ref, old, lora) <= TOL
    d = ours.config.hidden_size
    assert torch.equal(ours.single_blocks[0].linear1.weight[d : 3 * d], w[d : 3 * d])


def test_kohya_layout(tmp_path):
    ours, ref = _models()
    lora = _random_lora(ours, "lora_unet_", "lora_down.weight", "lora_up.weight", names=IN_BLOCKS)
    save_file(lora, tmp_path / "kohya.safetensors")
    ref_lora = _diffusers_from_kohya(lora, ours.config)
    assert _parity(ours, ref, tmp_path / "kohya.safetensors", ref_lora) <= TOL


@pytest.mark.parametrize(
    "down, up", [("lora_A.weight", "lora_B.weight"), ("lora_down.weight", "lora_up.weight")]
)
def test_bfl_comfyui_layout(down, up):
    ours, ref = _models()
    lora = _random_lora(ours, "diffusion_model.", down, up, names=IN_BLOCKS)
    # the same tensors under kohya names (BFL paths with '_'), which diffusers reads
    kohya = {}
    for k, v in _rename(lora, {"lora_A": "lora_down", "lora_B": "lora_up"}).items():
        path = k.removeprefix("diffusion_model.")
        suffix = next(x for x in (".alpha", ".lora_down.weight", ".lora_up.weight") if path.endswith(x))
        kohya[f"lora_unet_{path.removesuffix(suffix).replace('.', '_')}{suffix}"] = v
    assert len(kohya) == len(lora) and all(k.count(".") <= 2 for k in kohya)
    assert _parity(ours, ref, lora, _diffusers_from_kohya(kohya, ours.config)) <= TOL


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


def test_bf16_weights_stored_in_their_dtype():
    ours, _ = _models()
    ours.to(torch.bfloat16)
    w = ours.img_in.weight.clone()
    lora = _random_lora(ours, "diffusion_model.")
    fuse_lora(ours, lora)
    a, b, alpha = read_lora(ours, lora)["img_in"]
    expect = (w.float() + alpha / a.shape[0] * b.float() @ a.float()).to(torch.bfloat16)
    assert ours.img_in.weight.dtype == torch.bfloat16 and torch.equal(ours.img_in.weight, expect)
    unfuse_lora(ours)
    assert torch.equal(ours.img_in.weight, w)


def test_bad_inputs(tmp_path):
    ours, _ = _models()
    good = _random_lora(ours, "diffusion_model.", names=lambda n: n == "img_in")
    extra = {f"lora_te1_text_model_{i}.lora_down.weight": torch.zeros(2, 3) for i in range(7)}
    with pytest.raises(ValueError, match=r"^LoRA state dict: 7 LoRA keys match no module of Flux, e\.g\. \["):
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
