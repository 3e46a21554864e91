"""FLUX transformer: diffusers parity on tiny random configs (both load paths), key layout, FLOPs."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from refs import flux_bfl_to_diffusers, max_rel_err, randomize_, tiny_flux_kwargs
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from models.flux import FLUX_KONTEXT_DEV, FLUX_TINY, Flux, FluxConfig, flops, load_flux
from models.loading import CheckpointError, build_on_meta
from models.packing import grid_ids

TOL = 1e-5


def _inputs(cfg: FluxConfig, target=(4, 6), ref=(3, 5), batch=2, txt_len=7, seed=1):
    """Non-square target, a reference of another size, batch 2, per-sample sigma/guidance."""
    g = torch.Generator().manual_seed(seed)
    n_t, n_r = target[0] * target[1], ref[0] * ref[1]
    img = torch.randn(batch, n_t + n_r, cfg.in_channels, generator=g)
    ids = torch.cat([grid_ids(target), grid_ids(ref, axis0=1.0)])
    return dict(
        img=img,
        img_ids=ids[None].expand(batch, -1, -1),
        txt=torch.randn(batch, txt_len, cfg.context_in_dim, generator=g),
        txt_ids=torch.zeros(batch, txt_len, 3),
        timesteps=torch.tensor([0.7, 0.25])[:batch],
        y=torch.randn(batch, cfg.vec_in_dim, generator=g),
        guidance=torch.tensor([2.5, 4.0])[:batch],
    )


def _diffusers_out(ref: FluxTransformer2DModel, a: dict) -> torch.Tensor:
    outs = []
    for i in range(a["img"].shape[0]):  # diffusers takes 2-D ids, so run the samples one by one
        outs.append(
            ref(
                hidden_states=a["img"][i : i + 1],
                encoder_hidden_states=a["txt"][i : i + 1],
                pooled_projections=a["y"][i : i + 1],
                timestep=a["timesteps"][i : i + 1],
                guidance=a["guidance"][i : i + 1],
                img_ids=a["img_ids"][i],
                txt_ids=a["txt_ids"][i],
                return_dict=False,
            )[0]
        )
    return torch.cat(outs)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(
            num_layers=1,
            num_single_layers=3,
            attention_head_dim=8,
            num_attention_heads=4,
            axes_dims_rope=(2, 2, 4),
            joint_attention_dim=12,
        ),
    ],
)
@torch.no_grad()
def test_parity_diffusers_folder(tmp_path, kw):
    ref = randomize_(FluxTransformer2DModel(**tiny_flux_kwargs(**kw)).eval(), seed=3)
    ref.save_pretrained(tmp_path / "transformer")
    ours = load_flux(tmp_path / "transformer")
    a = _inputs(ours.config, target=(5, 3), ref=(4, 4))
    assert max_rel_err(ours(**a), _diffusers_out(ref, a)) <= TOL
    # a repo root holding transformer/ resolves to the same weights
    root = load_flux(tmp_path)
    assert torch.equal(root.img_in.weight, ours.img_in.weight)


@torch.no_grad()
def test_parity_bfl_file(tmp_path):
    cfg = FLUX_TINY
    sd = randomize_(Flux(cfg), seed=4).state_dict()
    save_file(sd, tmp_path / "flux1-tiny.safetensors")
    ours = load_flux(tmp_path / "flux1-tiny.safetensors", config=cfg)
    ref = FluxTransformer2DModel(**tiny_flux_kwargs()).eval()
    ref.load_state_dict(
        flux_bfl_to_diffusers(sd, cfg.depth, cfg.depth_single_blocks, cfg.hidden_size), strict=True
    )
    a = _inputs(cfg)
    assert max_rel_err(ours(**a), _diffusers_out(ref, a)) <= TOL
    # a repo root holding the BFL file, and a ComfyUI-style prefix, load the same tensors
    assert torch.equal(load_flux(tmp_path, config=cfg).img_in.weight, ours.img_in.weight)
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, tmp_path / "prefixed.safetensors")
    assert torch.equal(
        load_flux(tmp_path / "prefixed.safetensors", config=cfg).txt_in.weight, ours.txt_in.weight
    )


@torch.no_grad()
def test_token_subsets_and_fractional_ids():
    """Explicit ids: a permutation of the tokens permutes the output; fractional ids just work."""
    m = randomize_(Flux(FLUX_TINY), seed=5).eval()
    a = _inputs(FLUX_TINY, batch=1)
    perm = torch.randperm(a["img"].shape[1])
    out = m(**a)
    permuted = m(**{**a, "img": a["img"][:, perm], "img_ids": a["img_ids"][:, perm]})
    assert torch.allclose(out[:, perm], permuted, atol=1e-6)
    frac = m(**{**a, "img_ids": a["img_ids"] + 0.5})
    assert frac.shape == out.shape and not torch.allclose(frac, out)


def test_bfl_config_inference_and_errors(tmp_path):
    sd = Flux(FLUX_TINY).state_dict()
    save_file(sd, tmp_path / "flux1-tiny.safetensors")
    with pytest.raises(ValueError, match="head dim 16; pass config="):
        load_flux(tmp_path / "flux1-tiny.safetensors")
    wrong = FluxConfig(**{**FLUX_TINY.__dict__, "depth": 3})
    with pytest.raises(
        CheckpointError, match=r"(?s)flux1-tiny.safetensors does not match.*24 missing: double_blocks\.2\."
    ):
        load_flux(tmp_path / "flux1-tiny.safetensors", config=wrong)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no FLUX transformer"):
        load_flux(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither an existing path"):
        load_flux(str(tmp_path / "nope.safetensors"))


def test_bad_forward_inputs():
    m = Flux(FLUX_TINY)
    a = _inputs(FLUX_TINY, batch=1)
    with pytest.raises(ValueError, match="img must be"):
        m(**{**a, "img": a["img"][..., :3]})
    with pytest.raises(ValueError, match="img_ids must be"):
        m(**{**a, "img_ids": a["img_ids"][:, :-1]})
    with pytest.raises(ValueError, match="guidance distilled"):
        m(**{**a, "guidance": None})


def test_full_size_keys_match_official():
    """The kontext-dev preset on meta has exactly the official tensors (via the spec key table)."""
    cfg = FLUX_KONTEXT_DEV
    m = build_on_meta(lambda: Flux(cfg))
    ours = flux_bfl_to_diffusers(m.state_dict(), cfg.depth, cfg.depth_single_blocks, cfg.hidden_size)
    ours = {k: list(v.shape) for k, v in ours.items()}
    fixture = json.loads((Path(__file__).parent.parent / "fixtures" / "official_keys.json").read_text())
    assert ours == _expand(fixture["flux-kontext-dev-transformer"])
    assert sum(p.numel() for p in m.parameters()) == fixture["flux-kontext-dev-transformer"]["params"]


def _expand(spec: dict) -> dict:
    """Templated key list (``{i}`` over a block count) back to a flat name -> shape dict."""
    out = {}
    for key, shape in spec["keys"].items():
        if "{i}" in key:
            prefix = key.split(".{i}")[0]
            for i in range(spec["counts"][prefix]):
                out[key.replace("{i}", str(i))] = shape
        else:
            out[key] = shape
    return out


def _count_on_meta(cfg: FluxConfig, n_img: int, n_txt: int, batch: int) -> int:
    """FlopCounterMode over a meta-device model (on real CPU tensors it has no formula for the CPU flash-SDPA
    kernel and would silently skip attention)."""
    m = build_on_meta(lambda: Flux(cfg))
    with torch.device("meta"):
        a = dict(
            img=torch.empty(batch, n_img, cfg.in_channels),
            img_ids=torch.empty(batch, n_img, 3),
            txt=torch.empty(batch, n_txt, cfg.context_in_dim),
            txt_ids=torch.empty(batch, n_txt, 3),
            timesteps=torch.empty(batch),
            y=torch.empty(batch, cfg.vec_in_dim),
            guidance=torch.empty(batch),
        )
    fc = FlopCounterMode(display=False)
    with fc, torch.no_grad():
        m(**a)
    return fc.get_total_flops()


@pytest.mark.parametrize("n_img,n_txt,batch", [(24 + 15, 7, 1), (40, 3, 2), (16, 512, 1)])
def test_analytic_flops_match_flop_counter(n_img, n_txt, batch):
    assert _count_on_meta(FLUX_TINY, n_img, n_txt, batch) == flops(FLUX_TINY, n_img, n_txt, batch)["total"]


def test_full_size_flops_on_meta():
    """165.46 TFLOPs per forward at 1024^2 target + 1024^2 reference + 512 text tokens (issue figure)."""
    analytic = flops(FLUX_KONTEXT_DEV, 8192, 512)["total"]
    assert abs(analytic / 1e12 - 165.46) / 165.46 < 0.005
    assert _count_on_meta(FLUX_KONTEXT_DEV, 8192, 512, 1) == analytic
