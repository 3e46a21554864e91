"""Qwen2.5-VL encoder: transformers parity on tiny random configs (real 3-D M-RoPE), loading, config, FLOPs.

The references get ``mm_token_type_ids``: without them transformers >= 5 silently uses 1-D positions for the
image tokens (diffusers issue #14194), and the comparison would check the wrong thing.
"""

import json

import pytest
import torch
from refs import max_rel_err, randomize_
from refs_vl import reference_states, tiny_vl_kwargs, tiny_vl_reference
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from models.loading import CheckpointError, build_on_meta
from models.qwen2_5_vl import (
    QWEN25VL_7B,
    QWEN25VL_TINY,
    Qwen2_5_VL,
    config_from_transformers,
    flops,
    load_qwen2_5_vl,
    mrope_positions,
)

TOL = 1e-5
# a second tiny config: GQA x3, odd M-RoPE split, 2x2-unit windows, full attention in the first and last
# vision blocks
OTHER = dict(
    text=dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0, "mrope_section": [1, 1, 2]},
    ),
    vision=dict(
        depth=4,
        hidden_size=48,
        num_heads=3,
        intermediate_size=40,
        window_size=56,
        fullatt_block_indexes=[0, 3],
    ),
)
CONFIGS = {"tiny": {}, "other": OTHER}


def _ours(ref) -> Qwen2_5_VL:
    """Our model with the reference's weights, loaded strictly through the legacy key names."""
    ours = Qwen2_5_VL(config_from_transformers(ref.config.to_dict()))
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("lm_head.")}
    rename = {"model.language_model.": "model.", "model.visual.": "visual."}
    for new, old in rename.items():
        sd = {(old + k[len(new) :] if k.startswith(new) else k): v for k, v in sd.items()}
    ours.load_state_dict(sd, strict=True)
    return ours.eval()


def _batch(cfg, rows, *, side="right", seed=0):
    """Prompts from parts: ("t", n) random text tokens, ("i", (h, w)) an image with that patch grid.

    Returns input_ids, attention_mask (padding on ``side``), pixel_values, image_grid_thw."""
    g = torch.Generator().manual_seed(seed)
    seqs, grids = [], []
    for parts in rows:
        ids = []
        for kind, arg in parts:
            if kind == "t":
                ids += torch.randint(0, cfg.vocab_size - 8, (arg,), generator=g).tolist()
            else:
                h, w = arg
                ids += (
                    [cfg.vision_start_token_id]
                    + [cfg.image_token_id] * (h * w // 4)
                    + [cfg.vision_end_token_id]
                )
                grids.append([1, h, w])
        seqs.append(ids)
    width = max(map(len, seqs))
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        input_ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    n = sum(h * w for _, h, w in grids)
    pixel_values = torch.randn(n, 3 * 2 * 14 * 14, generator=g)
    return input_ids, mask, pixel_values, torch.tensor(grids)


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_parity_one_image_padded_windows(name):
    """Grid (1, 18, 14) -> 9 x 7 merge units: neither side is a multiple of the window, so border windows
    are partial (both window sizes of the two configs)."""
    ref = tiny_vl_reference(seed=1, **CONFIGS[name])
    ours = _ours(ref)
    ids, mask, pv, grid = _batch(ours.config, [[("t", 5), ("i", (18, 14)), ("t", 6)]])
    mm = (ids == ours.config.image_token_id).int()
    ref_pos, _ = ref.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=mask)
    assert torch.equal(ours.positions(ids, mask, grid), ref_pos)
    # spec example: 5 text + vision_start at 0..5, image at t = 6, h = 6..14, w = 6..12, vision_end at 15
    pos = ours.positions(ids, None, grid)[:, 0]
    assert pos[:, :6].tolist() == [list(range(6))] * 3
    assert pos[:, 6:69].amin(1).tolist() == [6, 6, 6] and pos[:, 6:69].amax(1).tolist() == [6, 14, 12]
    assert pos[:, 69].tolist() == [15, 15, 15]
    vis_ref = ref.model.visual(pv, grid_thw=grid).pooler_output
    assert max_rel_err(ours.visual(pv, grid), vis_ref) <= TOL
    ref_out = reference_states(ref, ids, mask, pv, grid)
    assert max_rel_err(ours.encode(ids, mask, pv, grid), ref_out) <= TOL
    assert torch.equal(ours.encode(ids, None, pv, grid), ours.encode(ids, mask, pv, grid))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_parity_padded_batch_two_images_in_a_prompt(name, side):
    """Batch of 2 of different lengths; the first prompt holds two images, the second one image."""
    ref = tiny_vl_reference(seed=2, **CONFIGS[name])
    ours = _ours(ref)
    rows = [
        [("t", 5), ("i", (18, 14)), ("t", 3), ("i", (8, 12)), ("t", 4)],
        [("t", 2), ("i", (6, 10)), ("t", 9)],
    ]
    ids, mask, pv, grid = _batch(ours.config, rows, side=side, seed=3)
    mm = (ids == ours.config.image_token_id).int()
    ref_pos, _ = ref.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=mask)
    assert torch.equal(ours.positions(ids, mask, grid), ref_pos)
    vis_ref = ref.model.visual(pv, grid_thw=grid).pooler_output
    assert max_rel_err(ours.visual(pv, grid), vis_ref) <= TOL
    out, ref_out = ours.encode(ids, mask, pv, grid), reference_states(ref, ids, mask, pv, grid)
    real = mask.bool()
    assert max_rel_err(out[real], ref_out[real]) <= TOL
    assert not out[~real].any()  # padding rows are zeros
    # each prompt alone gives the same states as inside the padded batch
    n0 = int(grid[:2, 1:].prod(-1).sum())
    alone = ours.encode(ids[1:][real[1:]][None], None, pv[n0:], grid[2:])
    assert max_rel_err(alone[0], out[1][real[1]]) <= TOL


@torch.no_grad()
def test_bf16_error_within_twice_reference():
    """bf16: our error against the fp32 reference is at most ~2x transformers' own bf16 error."""
    ref = tiny_vl_reference(seed=4)
    ours = _ours(ref)
    ids, mask, pv, grid = _batch(ours.config, [[("t", 4), ("i", (10, 12)), ("t", 7)]], seed=5)
    gold = reference_states(ref, ids, mask, pv, grid)
    ref_bf16 = reference_states(ref.to(torch.bfloat16), ids, mask, pv.bfloat16(), grid)
    ours_bf16 = ours.to(torch.bfloat16).encode(ids, mask, pv.bfloat16(), grid)
    assert ours_bf16.dtype == torch.bfloat16
    assert max_rel_err(ours_bf16, gold) <= 2 * max_rel_err(ref_bf16, gold) + 1e-3


@torch.no_grad()
def test_text_only_parity():
    """No image: plain causal LM positions; right padding, an empty grid and None all work."""
    ref = tiny_vl_reference(seed=3)
    ours = _ours(ref)
    ids, mask, _, _ = _batch(ours.config, [[("t", 9)], [("t", 4)]], seed=4)
    want = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    out = ours.encode(ids, mask)
    assert max_rel_err(out[mask.bool()], want[mask.bool()]) <= TOL
    empty = ours.encode(ids, mask, torch.zeros(0, 1176), torch.zeros(0, 3, dtype=torch.long))
    assert torch.equal(empty, out)
    assert flops(ours.config, 9, [])["vit"] == 0


# ----------------------------------------------------------------------------------------------- loading
@torch.no_grad()
def test_load_layouts(tmp_path):
    """save_pretrained folder (legacy names + lm_head, sharded), new in-memory names, legacy without lm_head,
    a repo root, and a single file with config=: all load strictly to the same weights."""
    ref = tiny_vl_reference(seed=5)
    ref.save_pretrained(tmp_path / "root" / "text_encoder", max_shard_size="100KB")
    assert (tmp_path / "root" / "text_encoder" / "model.safetensors.index.json").is_file()
    shipped = load_qwen2_5_vl(tmp_path / "root" / "text_encoder")
    assert not any("lm_head" in k for k in shipped.state_dict())
    want = _ours(ref).state_dict()
    got = shipped.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    new = tmp_path / "new"
    new.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, new / "model.safetensors")
    (new / "config.json").write_text(json.dumps(ref.config.to_dict()))
    assert next(iter(ref.state_dict())).startswith(("lm_head", "model.language_model", "model.visual"))
    for path in (new, new / "model.safetensors", tmp_path / "root"):
        m = load_qwen2_5_vl(path)
        assert all(torch.equal(m.state_dict()[k], want[k]) for k in want)

    legacy = tmp_path / "legacy.safetensors"
    save_file(want, legacy)
    m = load_qwen2_5_vl(legacy, config=shipped.config, dtype=torch.bfloat16)
    assert m.model.norm.weight.dtype == torch.bfloat16
    assert torch.equal(m.visual.merger.mlp[0].weight, want["visual.merger.mlp.0.weight"].bfloat16())


def test_load_errors(tmp_path):
    ref = tiny_vl_reference(seed=6)
    sd = _ours(ref).state_dict()
    cfg = config_from_transformers(ref.config.to_dict())
    both = {**sd, "model.language_model.norm.weight": sd["model.norm.weight"].clone()}
    save_file(both, tmp_path / "both.safetensors")
    with pytest.raises(
        CheckpointError, match="holds both 'model.language_model.norm.weight' and 'model.norm.weight'"
    ):
        load_qwen2_5_vl(tmp_path / "both.safetensors", config=cfg)
    short = {k: v for k, v in sd.items() if not k.startswith("visual.blocks.2.")}
    save_file(short, tmp_path / "short.safetensors")
    with pytest.raises(CheckpointError, match=r"12 missing: visual\.blocks\.2\."):
        load_qwen2_5_vl(tmp_path / "short.safetensors", config=cfg)
    with pytest.raises(FileNotFoundError, match="no config.json next to"):
        load_qwen2_5_vl(tmp_path / "short.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Qwen2.5-VL weights"):
        load_qwen2_5_vl(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither an existing path"):
        load_qwen2_5_vl(str(tmp_path / "nope" / "x.safetensors"))


def test_config_layouts():
    """The official 7B config.json in its older flat layout and transformers' nested one both give the
    preset; the tiny preset round-trips through transformers."""
    flat = {  # Qwen2.5-VL-7B-Instruct config.json (transformers 4.x flat layout, rope_scaling)
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "max_position_embeddings": 128000,
        "max_window_layers": 28,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 32,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 152064,
    }
    assert config_from_transformers(flat) == QWEN25VL_7B
    nested = Qwen2_5_VLConfig(**{k: v for k, v in flat.items() if k != "architectures"}).to_dict()
    assert "text_config" in nested and config_from_transformers(nested) == QWEN25VL_7B
    tiny = Qwen2_5_VLConfig(**tiny_vl_kwargs()).to_dict()
    assert config_from_transformers(tiny) == QWEN25VL_TINY
    with pytest.raises(ValueError, match="unsupported rope scaling"):
        config_from_transformers({**flat, "rope_scaling": {"type": "yarn", "mrope_section": [16, 24, 24]}})
    with pytest.raises(ValueError, match="mrope_section"):
        config_from_transformers({**flat, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 16]}})
    with pytest.raises(ValueError, match="no vision_config"):
        config_from_transformers({k: v for k, v in flat.items() if k != "vision_config"})


def test_full_size_keys_match_transformers():
    """The 7B preset on meta has exactly transformers' tensors (legacy names, lm_head aside)."""
    ours = build_on_meta(lambda: Qwen2_5_VL(QWEN25VL_7B)).state_dict()
    with torch.device("meta"):
        ref = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**_flat_7b()))
    theirs = {}
    for k, v in ref.state_dict().items():
        if k != "lm_head.weight":
            k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
            theirs[k] = tuple(v.shape)
    assert {k: tuple(v.shape) for k, v in ours.items()} == theirs
    n = sum(v.numel() for v in ours.values())
    assert n == 8_292_166_656 - 152064 * 3584  # transformers' count minus the untied lm_head


def _flat_7b() -> dict:
    return dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        vision_config=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
    )


# ----------------------------------------------------------------------------------------------- bad input
@torch.no_grad()
def test_bad_inputs():
    m = randomize_(Qwen2_5_VL(QWEN25VL_TINY), std=0.1).eval()
    ids, mask, pv, grid = _batch(QWEN25VL_TINY, [[("t", 3), ("i", (4, 6)), ("t", 2)]])
    with pytest.raises(ValueError, match=r"pixel_values must be \(24, 1176\)"):
        m.encode(ids, mask, pv[:-1], grid)
    with pytest.raises(ValueError, match="6 image tokens in input_ids but image_grid_thw"):
        m.encode(ids, mask, torch.randn(32, 1176), torch.tensor([[1, 4, 8]]))
    with pytest.raises(ValueError, match="multiples of 2"):
        m.visual(torch.randn(15, 1176), torch.tensor([[1, 3, 5]]))
    with pytest.raises(ValueError, match="one \\(1, h, w\\) row per still image"):
        m.encode(ids, mask, torch.randn(48, 1176), torch.tensor([[2, 4, 6]]))
    with pytest.raises(ValueError, match="6 image tokens in input_ids but image_grid_thw \\[\\] needs 0"):
        m.encode(ids, mask)
    with pytest.raises(ValueError, match="no pixel_values"):
        m.embed(ids, None, None)
    with pytest.raises(ValueError, match="attention_mask"):
        m.encode(ids, mask[:, :-1], pv, grid)
    split = ids.clone()
    split[0, 7] = 5  # a text token inside the image run
    split[0, -1] = QWEN25VL_TINY.image_token_id
    with pytest.raises(ValueError, match="one contiguous run"):
        mrope_positions(split, grid, None, image_token_id=QWEN25VL_TINY.image_token_id, spatial_merge_size=2)


# ----------------------------------------------------------------------------------------------- FLOPs
def _count_on_meta(cfg, n_tokens, grids) -> int:
    """FlopCounterMode on the meta device (on CPU tensors it misses the CPU SDPA kernel)."""
    m = build_on_meta(lambda: Qwen2_5_VL(cfg))
    n = sum(t * h * w for t, h, w in grids)
    with torch.device("meta"):
        pv = torch.empty(n, cfg.vision.patch_dim)
        x = torch.empty(1, n_tokens, cfg.hidden_size)
        pos = torch.empty(3, 1, n_tokens, dtype=torch.long)
    fc = FlopCounterMode(display=False)
    with fc, torch.no_grad():
        m.visual(pv, torch.tensor(grids))
        m.model(x, pos)
    return fc.get_total_flops()


@pytest.mark.parametrize("grids", [[(1, 18, 14)], [(1, 18, 14), (1, 8, 30)], [(1, 16, 16)]])
def test_analytic_flops_match_flop_counter(grids):
    for cfg in (
        QWEN25VL_TINY,
        config_from_transformers(Qwen2_5_VLConfig(**tiny_vl_kwargs(**OTHER)).to_dict()),
    ):
        n_tokens = 20 + sum(h * w // 4 for _, h, w in grids)
        assert _count_on_meta(cfg, n_tokens, grids) == flops(cfg, n_tokens, grids)["total"]


def test_full_size_flops():
    """One 1024^2 image (74 x 74 patches) + 64 + 1376 + 24 LLM tokens: ViT ~7.70 + LLM 19.97 TFLOPs
    (7.700 counting border windows unpadded; we count the executed padded windows: 7.711)."""
    f = flops(QWEN25VL_7B, 64 + 1376 + 24, [(1, 74, 74)])
    assert abs(f["vit"] / 1e12 - 7.70) < 0.015 and abs(f["llm"] / 1e12 - 19.97) < 0.005
    assert _count_on_meta(QWEN25VL_7B, 64 + 1376 + 24, [(1, 74, 74)]) == f["total"]
