"""Qwen-Image VAE: the single-frame 2-D network against diffusers' 3-D AutoencoderKLQwenImage, keys, FLOPs."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLQwenImage
from refs import max_rel_err, randomize_
from refs_qwen import tiny_qwen_vae_kwargs
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from models.loading import CheckpointError, build_on_meta
from models.qwen_image_vae import (
    QWEN_IMAGE_VAE,
    QWEN_IMAGE_VAE_TINY,
    QwenImageVAE,
    QwenImageVAEConfig,
    config_from_diffusers,
    flops,
    load_qwen_image_vae,
)

TOL = 1e-5
CONFIGS = {
    "tiny": {},
    "tiny-b": dict(base_dim=8, z_dim=3, dim_mult=[1, 2, 2, 3], num_res_blocks=2,
                   temperal_downsample=[True, False, True], latents_mean=[0.2, -0.1, 0.4],
                   latents_std=[1.3, 0.9, 2.1]),
}  # fmt: skip


def _reference(ref: AutoencoderKLQwenImage, image: torch.Tensor, z: torch.Tensor):
    """diffusers outputs: normalised mean latent, decoded image, decoder taps (T squeezed)."""
    taps = {}
    modules = {"conv_in": ref.decoder.conv_in, "mid": ref.decoder.mid_block}
    modules.update({f"up{k}": blk for k, blk in enumerate(ref.decoder.up_blocks)})
    hooks = [
        m.register_forward_hook(lambda _m, _i, o, n=name: taps.__setitem__(n, o[:, :, 0]))
        for name, m in modules.items()
    ]
    c = ref.config
    mean_c = torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1)
    std_c = torch.tensor(c.latents_std).view(1, -1, 1, 1, 1)
    latent = (ref.encode(image[:, :, None]).latent_dist.mode() - mean_c) / std_c
    decoded = ref.decode(z[:, :, None] / (1.0 / std_c) + mean_c).sample  # the pipelines' denormalisation
    for h in hooks:
        h.remove()
    return latent[:, :, 0], decoded[:, :, 0], taps


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_parity_diffusers(tmp_path, name):
    ref = randomize_(AutoencoderKLQwenImage(**tiny_qwen_vae_kwargs(**CONFIGS[name])).eval(), seed=7)
    ref.save_pretrained(tmp_path / "vae")
    ours = load_qwen_image_vae(tmp_path / "vae")
    f = ours.config.factor
    g = torch.Generator().manual_seed(11)
    image = torch.rand(2, 3, 3 * f, 5 * f, generator=g) * 2 - 1  # non-square, batch 2
    z = torch.randn(2, ours.config.z_dim, 3, 5, generator=g) * 2
    ref_latent, ref_image, ref_taps = _reference(ref, image, z)
    assert max_rel_err(ours.encode(image), ref_latent) <= TOL
    decoded = ours.decode(z)
    assert max_rel_err(decoded, ref_image) <= TOL
    feats = ours.decoder_features(z, taps=tuple(ref_taps))
    for tap, ref_feat in ref_taps.items():
        assert max_rel_err(feats[tap], ref_feat) <= TOL, tap
    # single-frame 5-D inputs work too and keep their rank; a repo root resolves to vae/
    assert torch.equal(ours.encode(image[:, :, None])[:, :, 0], ours.encode(image))
    assert torch.equal(ours.decode(z[:, :, None])[:, :, 0], decoded)
    assert torch.equal(load_qwen_image_vae(tmp_path).decoder.conv_in.weight, ours.decoder.conv_in.weight)
    # both clamp to [-1, 1]: push half the output channels out of range and compare again
    for m in (ours.decoder.conv_out, ref.decoder.conv_out):
        m.bias[:2] += torch.tensor([3.0, -3.0])
    clamped = ours.decode(z)
    assert (clamped[:, 0] == 1).all() and (clamped[:, 1] == -1).all()
    assert max_rel_err(clamped, _reference(ref, image, z)[1]) <= TOL


@torch.no_grad()
def test_decoder_features_stop_early_and_shapes():
    vae = randomize_(QwenImageVAE(QWEN_IMAGE_VAE_TINY), seed=8).eval()
    z = torch.randn(1, 4, 6, 10)
    feats = vae.decoder_features(z)  # default taps conv_in, mid, up0
    assert list(feats) == ["conv_in", "mid", "up0"]
    assert feats["conv_in"].shape == (1, 64, 6, 10) and feats["up0"].shape == (1, 32, 12, 20)
    # full-size widths: up0 = 192 x 2h x 2w
    meta = build_on_meta(lambda: QwenImageVAE(QWEN_IMAGE_VAE))
    out = meta.decoder_features(torch.empty(1, 16, 8, 8, device="meta"), taps=("up0", "up2"))
    assert out["up0"].shape == (1, 192, 16, 16) and out["up2"].shape == (1, 96, 64, 64)


@torch.no_grad()
def test_sampled_latent_uses_logvar():
    vae = randomize_(QwenImageVAE(QWEN_IMAGE_VAE_TINY), seed=9).eval()
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    a = vae.encode(image, sample=True, generator=torch.Generator().manual_seed(0))
    b = vae.encode(image, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, vae.encode(image))


def test_bad_inputs(tmp_path):
    vae = QwenImageVAE(QWEN_IMAGE_VAE_TINY)
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"image must be \(b, 3, h, w\)"):
        vae.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="one frame"):
        vae.encode(torch.zeros(1, 3, 2, 32, 32))
    with pytest.raises(ValueError, match=r"latent must be \(b, 4, h, w\)"):
        vae.decode(torch.zeros(1, 16, 8, 8))
    with pytest.raises(ValueError, match="unknown decoder taps"):
        vae.decoder_features(torch.zeros(1, 4, 8, 8), taps=("up9",))
    with pytest.raises(ValueError, match="temporal_downsample"):
        QwenImageVAEConfig(**{**QWEN_IMAGE_VAE_TINY.__dict__, "temporal_downsample": (True,)})
    with pytest.raises(ValueError, match="attn_scales"):
        config_from_diffusers(tiny_qwen_vae_kwargs(attn_scales=[0.5]))
    # a checkpoint without one decoder block fails listing the keys
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_qwen_vae_kwargs()))
    sd = {k: v for k, v in vae.state_dict().items() if ".up_blocks.1." not in k}
    save_file(sd, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"(?s)does not match QwenImageVAE.*missing: decoder\.up_blocks\.1\."
    ):
        load_qwen_image_vae(folder)
    with pytest.raises(ValueError, match="config.json is a file; pass the folder"):
        load_qwen_image_vae(tmp_path / "vae" / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Qwen-Image VAE"):
        load_qwen_image_vae(tmp_path / "empty")


def test_full_size_keys_match_official():
    fixture = json.loads((Path(__file__).parent.parent / "fixtures" / "qwen_keys.json").read_text())
    spec = fixture["qwen-image-vae"]
    assert config_from_diffusers(spec["config"]) == QWEN_IMAGE_VAE
    m = build_on_meta(lambda: QwenImageVAE(QWEN_IMAGE_VAE))
    assert {k: list(v.shape) for k, v in m.state_dict().items()} == spec["keys"]
    n = sum(p.numel() for p in m.parameters())
    assert n == spec["params"] and round(n / 1e6, 1) == 126.9


def _count_on_meta(cfg: QwenImageVAEConfig, h: int, w: int) -> dict[str, int]:
    m = build_on_meta(lambda: QwenImageVAE(cfg))
    out = {}
    for kind, fn, x in (
        ("encode", m.encode, torch.empty(1, 3, h, w, device="meta")),
        ("decode", m.decode, torch.empty(1, cfg.z_dim, h // cfg.factor, w // cfg.factor, device="meta")),
    ):
        fc = FlopCounterMode(display=False)
        with fc, torch.no_grad():
            fn(x)
        out[kind] = fc.get_total_flops()
    return out


@pytest.mark.parametrize("cfg,h,w", [(QWEN_IMAGE_VAE_TINY, 24, 40), (QWEN_IMAGE_VAE, 1024, 1024)])
def test_analytic_flops_match_flop_counter(cfg, h, w):
    assert _count_on_meta(cfg, h, w) == flops(cfg, h, w)
