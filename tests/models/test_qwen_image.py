"""Qwen-Image transformer: diffusers parity on tiny random configs, MSRoPE ids, key layout, FLOPs, errors."""

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope
from refs import max_rel_err, randomize_
from refs_qwen import tiny_qwen_kwargs
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from models.loading import CheckpointError, build_on_meta
from models.qwen_image import (
    PRESETS,
    QWEN_IMAGE_EDIT,
    QWEN_IMAGE_EDIT_2511,
    QWEN_IMAGE_TINY,
    QwenImage,
    QwenImageConfig,
    flops,
    load_qwen_image,
    official_ids,
    rope,
    target_velocity,
)

TOL = 1e-5
SHAPES = [(1, 4, 6), (1, 6, 4), (1, 3, 5)]  # non-square target, two references of other sizes
CONFIGS = {
    "tiny": {},
    "tiny-b": dict(
        in_channels=8,
        out_channels=3,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=12,
        axes_dims_rope=(2, 2, 4),
    ),
}


def _batch(cfg: QwenImageConfig, lengths=(6, 9), seed=1):
    """Batch 2, prompts of different lengths right-padded to one length with a mask, per-sample sigma."""
    g = torch.Generator().manual_seed(seed)
    n = sum(f * h * w for f, h, w in SHAPES)
    l = max(lengths)
    mask = torch.zeros(len(lengths), l, dtype=torch.long)
    for i, li in enumerate(lengths):
        mask[i, :li] = 1
    txt = torch.randn(len(lengths), l, cfg.joint_attention_dim, generator=g) * mask[..., None]
    img_ids, txt_ids = official_ids(SHAPES, l)
    return dict(
        img=torch.randn(len(lengths), n, cfg.in_channels, generator=g),
        img_ids=img_ids,
        txt=txt,
        txt_ids=txt_ids,
        timesteps=torch.tensor([0.7, 0.25])[: len(lengths)],
        txt_mask=mask,
    )


def _diffusers_out(ref: QwenImageTransformer2DModel, a: dict) -> torch.Tensor:
    return ref(
        hidden_states=a["img"],
        encoder_hidden_states=a["txt"],
        encoder_hidden_states_mask=a["txt_mask"],
        timestep=a["timesteps"],
        img_shapes=[SHAPES] * a["img"].shape[0],
        return_dict=False,
    )[0]


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["edit", "2511"])
@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_parity_diffusers(tmp_path, name, zero_cond_t):
    ref = QwenImageTransformer2DModel(**tiny_qwen_kwargs(**CONFIGS[name], zero_cond_t=zero_cond_t))
    ref = randomize_(ref.eval(), seed=3)
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="100KB")  # sharded: index + shards
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ours = load_qwen_image(tmp_path)  # repo root -> transformer/
    assert ours.config.zero_cond_t is zero_cond_t
    a = _batch(ours.config)
    out = ours(**a)
    assert max_rel_err(out, _diffusers_out(ref, a)) <= TOL
    # the padded sample equals that sample run alone without padding (ids of its own length)
    l0 = int(a["txt_mask"][0].sum())
    alone = ours(a["img"][:1], a["img_ids"], a["txt"][:1, :l0], a["txt_ids"][:l0], a["timesteps"][:1])
    assert max_rel_err(alone, out[:1]) <= TOL
    # zero_cond_t really changes the reference tokens only when the flag is set
    frame0 = ours(**{**a, "img_ids": a["img_ids"] * torch.tensor([0.0, 1.0, 1.0])})
    n_tgt = SHAPES[0][1] * SHAPES[0][2]
    if zero_cond_t:
        assert not torch.allclose(frame0[:, n_tgt:], out[:, n_tgt:], atol=1e-4)
    assert not torch.allclose(frame0[:, :n_tgt], out[:, :n_tgt], atol=1e-6)  # RoPE frame axis still acts


@torch.no_grad()
def test_rope_equals_diffusers_tables():
    """Float-id RoPE at the official integer ids == diffusers' integer-table lookup (full-size axes)."""
    shapes, l = [(1, 5, 8), (1, 7, 3), (1, 2, 2)], 11
    img_ids, txt_ids = official_ids(shapes, l)
    cos, sin = rope(torch.cat([txt_ids, img_ids])[None], (16, 56, 56), 10_000)
    vid, txt = QwenEmbedRope(theta=10_000, axes_dim=[16, 56, 56], scale_rope=True)(
        [shapes], max_txt_seq_len=l, device=torch.device("cpu")
    )
    table = torch.cat([txt, vid])
    assert max_rel_err(cos[0, :, 0], table.real) <= 1e-6
    assert max_rel_err(sin[0, :, 0], table.imag) <= 1e-6


def test_official_ids_values():
    img, txt = official_ids([(1, 3, 4), (1, 2, 6)], 2)
    assert img.dtype == torch.float32 and img.shape == (12 + 12, 3)
    assert img[:12, 0].eq(0).all() and img[12:, 0].eq(1).all()  # frame = image index
    assert img[:12, 1].unique().tolist() == [-2.0, -1.0, 0.0]  # h = 3: -(3 - 1) .. 3 // 2 - 1
    assert img[:4, 2].tolist() == [-2.0, -1.0, 0.0, 1.0]  # row-major, w = 4
    assert img[12:18, 2].tolist() == [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0]
    assert txt.tolist() == [[3.0] * 3, [4.0] * 3]  # m = max(h//2, w//2) over images = 3
    with pytest.raises(ValueError, match=r"img_shapes\[1\] must be"):
        official_ids([(1, 2, 2), (2, 2)], 3)


@torch.no_grad()
def test_token_permutation_and_fractional_ids():
    m = randomize_(QwenImage(QWEN_IMAGE_TINY), seed=5).eval()
    a = _batch(QWEN_IMAGE_TINY)
    perm = torch.randperm(a["img"].shape[1])
    out = m(**a)
    permuted = m(**{**a, "img": a["img"][:, perm], "img_ids": a["img_ids"][perm]})
    assert torch.allclose(out[:, perm], permuted, atol=1e-6)
    frac = m(**{**a, "img_ids": a["img_ids"] + 0.5})
    assert frac.shape == out.shape and not torch.allclose(frac, out)


@torch.no_grad()
def test_target_velocity():
    m = randomize_(QwenImage(QWEN_IMAGE_TINY), seed=6).eval()
    a = _batch(QWEN_IMAGE_TINY, lengths=(9,))
    n_tgt = SHAPES[0][1] * SHAPES[0][2]
    x, refs = a["img"][:, :n_tgt], a["img"][:, n_tgt:]
    f = partial(target_velocity, m, refs=refs, img_ids=a["img_ids"])
    v = f(x, a["timesteps"], a["txt"], a["txt_ids"])
    assert torch.equal(v, m(a["img"], a["img_ids"], a["txt"], a["txt_ids"], a["timesteps"])[:, :n_tgt])
    # batch-1 references are shared by a batch of 2 (a CFG batch)
    v2 = f(x.expand(2, -1, -1), a["timesteps"], a["txt"].expand(2, -1, -1), a["txt_ids"])
    assert torch.allclose(v2, v.expand(2, -1, -1), atol=1e-6)
    with pytest.raises(ValueError, match="refs must be"):
        f(x, a["timesteps"], a["txt"], a["txt_ids"], refs=refs[..., :3])


@torch.no_grad()
def test_bf16_close_to_fp32_reference(tmp_path):
    """bf16 rule: our bf16 error against the fp32 reference is at most ~2x diffusers' own bf16 error."""
    ref = randomize_(QwenImageTransformer2DModel(**tiny_qwen_kwargs(zero_cond_t=True)).eval(), seed=7)
    ref.save_pretrained(tmp_path)
    a = _batch(QWEN_IMAGE_TINY)
    gold = _diffusers_out(ref, a)
    ours = load_qwen_image(tmp_path, dtype=torch.bfloat16)
    assert ours.img_in.weight.dtype == torch.bfloat16
    half = {
        k: v.bfloat16() if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v
        for k, v in a.items()
    }
    ref_err = max_rel_err(_diffusers_out(ref.to(torch.bfloat16), half).float(), gold)
    our_err = max_rel_err(ours(**half).float(), gold)
    assert our_err <= 2 * ref_err + 1e-3, (our_err, ref_err)


def test_bad_inputs():
    m = QwenImage(QWEN_IMAGE_TINY)
    a = _batch(QWEN_IMAGE_TINY)
    with pytest.raises(ValueError, match="img must be"):
        m(**{**a, "img": a["img"][..., :3]})
    with pytest.raises(ValueError, match="txt must be"):
        m(**{**a, "txt": a["txt"][..., :5]})
    with pytest.raises(ValueError, match="img_ids must be"):
        m(**{**a, "img_ids": a["img_ids"][:-1]})
    with pytest.raises(ValueError, match="txt_ids must be"):
        m(**{**a, "txt_ids": a["txt_ids"][:, :2]})
    with pytest.raises(ValueError, match="txt_mask must be"):
        m(**{**a, "txt_mask": a["txt_mask"][:, :-1]})
    with pytest.raises(ValueError, match="timesteps must be"):
        m(**{**a, "timesteps": torch.zeros(3)})
    with pytest.raises(ValueError, match="axes_dim"):
        QwenImageConfig(**{**QWEN_IMAGE_TINY.__dict__, "axes_dim": (4, 6, 8)})


def test_loading_errors(tmp_path):
    sd = QwenImage(QWEN_IMAGE_TINY).state_dict()
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_qwen_kwargs()))
    save_file(
        {k: v for k, v in sd.items() if not k.startswith("transformer_blocks.1.")}, folder / "w.safetensors"
    )
    with pytest.raises(
        CheckpointError, match=r"(?s)w.safetensors does not match.*missing: transformer_blocks\.1\."
    ):
        load_qwen_image(folder)
    save_file(sd, tmp_path / "single.safetensors")
    with pytest.raises(ValueError, match="pass config="):
        load_qwen_image(tmp_path / "single.safetensors")
    assert load_qwen_image(tmp_path / "single.safetensors", config=QWEN_IMAGE_TINY).config == QWEN_IMAGE_TINY
    (folder / "config.json").write_text(json.dumps(tiny_qwen_kwargs(use_layer3d_rope=True)))
    with pytest.raises(ValueError, match="use_layer3d_rope"):
        load_qwen_image(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Qwen-Image transformer"):
        load_qwen_image(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither an existing path"):
        load_qwen_image(str(tmp_path / "nope" / "x.safetensors"))


def _fixture() -> dict:
    return json.loads((Path(__file__).parent.parent / "fixtures" / "qwen_keys.json").read_text())


def _expand(spec: dict) -> dict:
    out = {}
    for key, shape in spec["keys"].items():
        if "{i}" in key:
            prefix = key.split(".{i}")[0]
            for i in range(spec["counts"][prefix]):
                out[key.replace("{i}", str(i))] = shape
        else:
            out[key] = shape
    return out


@pytest.mark.parametrize("preset", ["qwen-image-edit", "qwen-image-edit-2511"])
def test_full_size_keys_match_official(preset):
    fixture = _fixture()["qwen-image-edit-transformer"]
    m = build_on_meta(lambda: QwenImage(PRESETS[preset]))
    assert {k: list(v.shape) for k, v in m.state_dict().items()} == _expand(fixture)
    n = sum(p.numel() for p in m.parameters())
    assert n == fixture["params"] and round(n / 1e9, 3) == 20.430
    # config.json of the release -> the preset
    from models.qwen_image import config_from_diffusers

    assert config_from_diffusers(fixture["config"]) == QWEN_IMAGE_EDIT
    assert config_from_diffusers({**fixture["config"], "zero_cond_t": True}) == QWEN_IMAGE_EDIT_2511
    # out_channels as diffusers reads it: a missing key is its default 16, an explicit null is in_channels
    without = {k: v for k, v in fixture["config"].items() if k != "out_channels"}
    assert config_from_diffusers(without).out_channels == 16
    assert config_from_diffusers({**without, "in_channels": 64, "out_channels": None}).out_channels == 64


def _count_on_meta(cfg: QwenImageConfig, n_img: int, n_txt: int, batch: int, masked: bool) -> int:
    """FlopCounterMode over a meta-device model (on real CPU tensors it has no formula for the CPU flash-SDPA
    kernel and would silently skip attention)."""
    m = build_on_meta(lambda: QwenImage(cfg))
    with torch.device("meta"):
        a = dict(
            img=torch.empty(batch, n_img, cfg.in_channels),
            img_ids=torch.empty(n_img, 3),
            txt=torch.empty(batch, n_txt, cfg.joint_attention_dim),
            txt_ids=torch.empty(n_txt, 3),
            timesteps=torch.empty(batch),
            txt_mask=torch.empty(batch, n_txt, dtype=torch.bool) if masked else None,
        )
    fc = FlopCounterMode(display=False)
    with fc, torch.no_grad():
        m(**a)
    return fc.get_total_flops()


@pytest.mark.parametrize("preset", ["qwen-image-tiny", "qwen-image-tiny-2511"])
@pytest.mark.parametrize("n_img,n_txt,batch,masked", [(24 + 24 + 15, 9, 1, False), (40, 3, 2, True)])
def test_analytic_flops_match_flop_counter(preset, n_img, n_txt, batch, masked):
    cfg = PRESETS[preset]
    assert _count_on_meta(cfg, n_img, n_txt, batch, masked) == flops(cfg, n_img, n_txt, batch)["total"]


def test_full_size_flops_on_meta():
    """198.236 TFLOPs per forward at 1024^2 target + 1024^2 reference + 1400 text tokens."""
    analytic = flops(QWEN_IMAGE_EDIT, 8192, 1400)
    assert round(analytic["total"] / 1e12, 3) == 198.236
    assert round(analytic["attention"] / 1e12, 2) == 67.83
    assert _count_on_meta(QWEN_IMAGE_EDIT, 8192, 1400, 1, False) == analytic["total"]
    # Edit-2511 adds the t = 0 time MLP and image modulation rows only
    extra = flops(QWEN_IMAGE_EDIT_2511, 8192, 1400)["total"] - analytic["total"]
    d = QWEN_IMAGE_EDIT.hidden_size
    assert extra == 2 * (256 * d + d * d + 60 * 6 * d * d)
