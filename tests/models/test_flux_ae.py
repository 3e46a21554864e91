"""FLUX autoencoder: parity with diffusers AutoencoderKL (both load paths), decoder features, key layout."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from refs import max_rel_err, randomize_, tiny_ae_kwargs
from safetensors.torch import save_file

from models.flux_ae import FLUX_AE, FLUX_AE_TINY, AutoEncoder, FluxAEConfig, load_flux_ae
from models.loading import build_on_meta

TOL = 1e-5


def _reference_outputs(ref: AutoencoderKL, image, z):
    taps = {}
    hooks = [
        getattr(ref.decoder, name).register_forward_hook(lambda m, i, o, n=key: taps.__setitem__(n, o))
        for name, key in (("conv_in", "conv_in"), ("mid_block", "mid"))
    ]
    hooks += [
        blk.register_forward_hook(lambda m, i, o, n=f"up{k}": taps.__setitem__(n, o))
        for k, blk in enumerate(ref.decoder.up_blocks)
    ]
    cfg = ref.config
    mean = ref.encode(image).latent_dist.mode()
    decoded = ref.decode(z / cfg.scaling_factor + cfg.shift_factor).sample
    for h in hooks:
        h.remove()
    return (mean - cfg.shift_factor) * cfg.scaling_factor, decoded, taps


def _check(ours: AutoEncoder, ref: AutoencoderKL, hw=(32, 48), batch=2):
    g = torch.Generator().manual_seed(11)
    image = torch.rand(batch, 3, *hw, generator=g) * 2 - 1
    z = torch.randn(
        batch, ours.config.z_channels, hw[0] // ours.config.factor, hw[1] // ours.config.factor, generator=g
    )
    ref_latent, ref_image, ref_taps = _reference_outputs(ref, image, z)
    assert max_rel_err(ours.encode(image), ref_latent) <= TOL
    assert max_rel_err(ours.decode(z), ref_image) <= TOL
    feats = ours.decoder_features(z, taps=tuple(ref_taps))
    for name, ref_feat in ref_taps.items():
        assert max_rel_err(feats[name], ref_feat) <= TOL, name


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(
            block_out_channels=(16, 32),
            layers_per_block=2,
            latent_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
        ),
    ],
)
@torch.no_grad()
def test_parity_diffusers_folder(tmp_path, kw):
    ref = randomize_(AutoencoderKL(**tiny_ae_kwargs(**kw)).eval(), seed=7)
    ref.save_pretrained(tmp_path / "vae")
    ours = load_flux_ae(tmp_path / "vae")
    _check(ours, ref, hw=(24, 40))
    assert torch.equal(
        load_flux_ae(tmp_path).decoder.conv_in.weight, ours.decoder.conv_in.weight
    )  # repo root


@torch.no_grad()
def test_parity_bfl_file(tmp_path):
    sd = randomize_(AutoEncoder(FLUX_AE_TINY), seed=8).state_dict()
    save_file(sd, tmp_path / "ae.safetensors")
    ours = load_flux_ae(tmp_path / "ae.safetensors", config=FLUX_AE_TINY)
    kw = tiny_ae_kwargs()
    ref = AutoencoderKL(**kw).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(sd, kw), strict=True)  # diffusers' own BFL/LDM converter
    _check(ours, ref)


def test_config_inference_from_bfl(tmp_path):
    cfg = FluxAEConfig(**{**FLUX_AE_TINY.__dict__, "norm_groups": 32, "ch": 32, "ch_mult": (1, 2, 2)})
    save_file(AutoEncoder(cfg).state_dict(), tmp_path / "ae.safetensors")
    assert load_flux_ae(tmp_path / "ae.safetensors").config == cfg


def test_full_size_keys_match_official():
    fixture = json.loads((Path(__file__).parent.parent / "fixtures" / "official_keys.json").read_text())[
        "flux-vae"
    ]
    ours = build_on_meta(lambda: AutoEncoder(FLUX_AE)).state_dict()
    converted = convert_ldm_vae_checkpoint(ours, fixture["config"])
    assert {k: list(v.shape) for k, v in converted.items()} == fixture["keys"]
    assert len(converted) == len(ours)  # nothing of ours was left unmapped
    assert sum(v.numel() for v in ours.values()) == fixture["params"]


def test_bad_inputs():
    ae = AutoEncoder(FLUX_AE_TINY)
    with pytest.raises(ValueError, match="multiple of 4"):
        ae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="encode expects"):
        ae.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="latent must be"):
        ae.decode(torch.zeros(1, 16, 8, 8))
    with pytest.raises(ValueError, match="unknown decoder taps"):
        ae.decoder_features(torch.zeros(1, 4, 8, 8), taps=("up9",))
