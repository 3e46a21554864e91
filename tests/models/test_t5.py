"""T5 v1.1 encoder: transformers parity on tiny random configs, loading layouts, full-size keys, FLOPs."""

import json

import pytest
import torch
from refs import max_rel_err, randomize_
from refs_text import OFFICIAL_T5_XXL, tiny_t5_kwargs
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

from models.loading import CheckpointError, build_on_meta
from models.t5 import (
    T5_TINY,
    T5_XXL,
    T5Config,
    T5Encoder,
    config_from_transformers,
    flops,
    load_t5,
    relative_position_bucket,
)

TOL = 1e-5
# a second config: other widths, heads * d_kv != d_model, 16 buckets over distance 64, 3 layers
OTHER = dict(
    vocab_size=300,
    d_model=48,
    d_kv=10,
    num_heads=3,
    d_ff=40,
    num_layers=3,
    relative_attention_num_buckets=16,
    relative_attention_max_distance=64,
)


def _reference(tmp_path, seed=0, **kw) -> T5EncoderModel:
    ref = randomize_(T5EncoderModel(HFT5Config(**tiny_t5_kwargs(**kw))).eval(), std=0.1, seed=seed)
    ref.save_pretrained(tmp_path / "text_encoder_2")
    return ref


def _ids(vocab: int, length=200, seed=5) -> torch.Tensor:
    """Batch 2, FLUX-like: prompt, </s> (1), then pads (0), with the prompts ending at different places."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (2, length), generator=g)
    for row, end in ((0, 40), (1, 170)):
        ids[row, end], ids[row, end + 1 :] = 1, 0
    return ids


@pytest.mark.parametrize("kw", [{}, OTHER])
@torch.no_grad()
def test_parity_transformers(tmp_path, kw):
    ref = _reference(tmp_path, seed=len(kw), **kw)
    ours = load_t5(tmp_path / "text_encoder_2")
    ids = _ids(ref.config.vocab_size)  # 200 tokens: offsets well past max_distance reach the log buckets
    err = max_rel_err(ours(ids), ref(input_ids=ids).last_hidden_state)
    assert err <= TOL, err
    mask = (ids != 0).long()  # optional mask (FLUX passes none)
    err = max_rel_err(ours(ids, mask), ref(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert err <= TOL, err


@pytest.mark.parametrize("buckets,distance", [(32, 128), (16, 64), (8, 20)])
def test_buckets_match_transformers(buckets, distance):
    rel = torch.arange(-600, 601)[None, :]
    theirs = T5Attention._relative_position_bucket(rel, True, buckets, distance)
    assert torch.equal(relative_position_bucket(rel, buckets, distance), theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_like_transformers(tmp_path, dtype):
    """Half-precision error vs the fp32 reference within 2x transformers' own; fp16 keeps ``wo`` in fp32."""
    ref = _reference(tmp_path)
    ids = _ids(256)
    exact = ref(input_ids=ids).last_hidden_state
    ref_half = T5EncoderModel.from_pretrained(tmp_path / "text_encoder_2", dtype=dtype).eval()
    ours = load_t5(tmp_path / "text_encoder_2", dtype=dtype)
    wo = ours.encoder.block[1].layer[1].DenseReluDense.wo.weight.dtype
    assert wo == ref_half.encoder.block[1].layer[1].DenseReluDense.wo.weight.dtype
    assert ours.shared.weight.dtype == dtype
    out, theirs = ours(ids), ref_half(input_ids=ids).last_hidden_state
    assert out.dtype == theirs.dtype
    assert max_rel_err(out, exact) <= 2 * max_rel_err(theirs, exact) + 1e-3


@torch.no_grad()
def test_sharded_folder_and_repo_root(tmp_path):
    ref = randomize_(T5EncoderModel(HFT5Config(**tiny_t5_kwargs())).eval(), std=0.1)
    folder = tmp_path / "repo" / "text_encoder_2"
    ref.save_pretrained(folder, max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours = load_t5(tmp_path / "repo")  # repo root -> text_encoder_2/
    for name, p in ref.named_parameters():
        assert torch.equal(ours.get_parameter(name), p), name
    shard = sorted(set(index["weight_map"].values()))[1]
    (folder / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {shard} listed in .*missing"):
        load_t5(folder)


@torch.no_grad()
def test_embedding_key_variants(tmp_path):
    """``shared.weight`` alone (official FLUX), ``encoder.embed_tokens.weight`` alone, both, or a full
    encoder-decoder file all load the same encoder; mismatched duplicates do not."""
    ref = _reference(tmp_path)
    folder = tmp_path / "text_encoder_2"
    sd = load_file(folder / "model.safetensors")
    assert "shared.weight" in sd and "encoder.embed_tokens.weight" not in sd
    ids = _ids(256)
    want = load_t5(folder)(ids)
    assert max_rel_err(want, ref(input_ids=ids).last_hidden_state) <= TOL
    emb = sd.pop("shared.weight")
    for variant in (
        {"encoder.embed_tokens.weight": emb},
        {"shared.weight": emb, "encoder.embed_tokens.weight": emb.clone()},
    ):
        save_file({**sd, **variant}, folder / "model.safetensors")
        assert torch.equal(load_t5(folder)(ids), want)
    save_file(
        {**sd, "shared.weight": emb, "encoder.embed_tokens.weight": emb[:-1].clone()},
        folder / "model.safetensors",
    )
    with pytest.raises(CheckpointError, match="one tied embedding"):
        load_t5(folder)
    full = T5ForConditionalGeneration(HFT5Config(**tiny_t5_kwargs(is_encoder_decoder=True))).eval()
    full.encoder.load_state_dict(ref.encoder.state_dict())
    full.save_pretrained(tmp_path / "full")
    assert torch.equal(load_t5(tmp_path / "full")(ids), want)


def test_loading_errors(tmp_path):
    ref = _reference(tmp_path)
    folder = tmp_path / "text_encoder_2"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "d_ff": 65}))
    with pytest.raises(
        CheckpointError, match=r"(?s)model\.safetensors does not match T5Encoder.*wrong shape"
    ):
        load_t5(folder)
    (folder / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "relu"}))
    with pytest.raises(ValueError, match="'relu' is not supported"):
        load_t5(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no T5 encoder in"):
        load_t5(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither an existing path"):
        load_t5(str(tmp_path / "missing"))
    del ref


def test_bad_inputs():
    m = T5Encoder(T5_TINY)
    with pytest.raises(ValueError, match=r"must lie in \[0, 256\)"):
        m(torch.tensor([[3, 256]]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 256\)"):
        m(torch.tensor([[-1, 4]]))
    with pytest.raises(ValueError, match="integer tensor"):
        m(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="integer tensor"):
        m(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must be"):
        m(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="max_distance"):
        T5Config(**{**T5_TINY.__dict__, "max_distance": 8})


def test_full_size_matches_transformers_on_meta():
    assert config_from_transformers(OFFICIAL_T5_XXL) == T5_XXL
    ours = build_on_meta(lambda: T5Encoder(T5_XXL))
    with torch.device("meta"):
        theirs = T5EncoderModel(HFT5Config(**OFFICIAL_T5_XXL))
    shapes = lambda m: {k: tuple(p.shape) for k, p in m.named_parameters()}
    assert shapes(ours) == shapes(theirs)
    n = sum(p.numel() for p in ours.parameters())
    assert n == 4_762_310_656  # 4.762 B
    assert n == sum(p.numel() for p in theirs.parameters())


@pytest.mark.parametrize("cfg,length,batch", [(T5_TINY, 150, 2), (T5_TINY, 7, 1), (T5_XXL, 512, 1)])
def test_analytic_flops_match_flop_counter(cfg, length, batch):
    """FlopCounterMode on a meta-device model (on real CPU tensors it would skip the SDPA kernel)."""
    m = build_on_meta(lambda: T5Encoder(cfg))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        m(torch.empty(batch, length, dtype=torch.long, device="meta"))
    assert counter.get_total_flops() == flops(cfg, length, batch)["total"]
    if cfg is T5_XXL:  # one FLUX prompt encoding: 4.84 TFLOPs
        assert abs(flops(cfg, 512)["total"] / 1e12 - 4.8447) < 1e-3
