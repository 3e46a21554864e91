"""CLIP text tower: transformers parity on tiny random configs, pooling, loading layouts, keys, FLOPs."""

import json

import pytest
import torch
from refs import max_rel_err, randomize_
from refs_text import OFFICIAL_CLIP_L, PROMPTS, clip_tokenizer_files, tiny_clip_kwargs
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel, CLIPTokenizer

from models.clip import CLIP_L, CLIP_TINY, CLIPText, config_from_transformers, flops, load_clip
from models.loading import CheckpointError, build_on_meta
from models.tokenization import load_clip_tokenizer

TOL = 1e-5
# a second config: other widths, 6 heads of 8, 3 layers, 40 positions, and a real eos id (first-EOS pooling)
OTHER = dict(
    vocab_size=320,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=6,
    max_position_embeddings=40,
    eos_token_id=5,
)


def _reference(folder, seed=0, **kw) -> CLIPTextModel:
    ref = randomize_(CLIPTextModel(HFCLIPTextConfig(**tiny_clip_kwargs(**kw))).eval(), seed=seed)
    ref.save_pretrained(folder)
    return ref


def _ids(cfg, length, ends, seed=6) -> torch.Tensor:
    """BOS, random tokens, then EOT repeated as padding from ``ends[row]`` on (as the FLUX tokenizer pads)."""
    g = torch.Generator().manual_seed(seed)
    v = cfg.vocab_size
    eot = v - 1 if cfg.eos_token_id == 2 else cfg.eos_token_id
    ids = torch.randint(6, v - 2, (len(ends), length), generator=g)
    ids[:, 0] = v - 2
    for row, end in enumerate(ends):
        ids[row, end:] = eot
    return ids


@pytest.mark.parametrize("kw,length,ends", [({}, 77, (10, 30, 76)), (OTHER, 33, (4, 20, 32))])
@torch.no_grad()
def test_parity_transformers(tmp_path, kw, length, ends):
    ref = _reference(tmp_path / "text_encoder", seed=len(kw), **kw)
    ours = load_clip(tmp_path / "text_encoder")
    assert ours.config.eos_token_id == (None if not kw else 5)
    ids = _ids(ref.config, length, ends)
    out = ref(input_ids=ids)
    hidden, pooled = ours(ids)
    assert max_rel_err(hidden, out.last_hidden_state) <= TOL
    assert max_rel_err(pooled, out.pooler_output) <= TOL
    assert torch.equal(pooled, hidden[torch.arange(len(ends)), torch.tensor(ends)])  # first EOT per row


@torch.no_grad()
def test_bf16_like_transformers(tmp_path):
    ref = _reference(tmp_path / "text_encoder")
    ids = _ids(ref.config, 77, (10, 50))
    exact = ref(input_ids=ids)
    ref_half = CLIPTextModel.from_pretrained(tmp_path / "text_encoder", dtype=torch.bfloat16).eval()(
        input_ids=ids
    )
    hidden, pooled = load_clip(tmp_path / "text_encoder", dtype=torch.bfloat16)(ids)
    assert hidden.dtype == pooled.dtype == torch.bfloat16
    for ours, theirs, want in (
        (hidden, ref_half.last_hidden_state, exact.last_hidden_state),
        (pooled, ref_half.pooler_output, exact.pooler_output),
    ):
        assert max_rel_err(ours, want) <= 2 * max_rel_err(theirs, want) + 1e-3


@torch.no_grad()
def test_official_prefix_sharded_and_repo_root(tmp_path):
    """transformers 5 writes keys without ``text_model.``; the official file has the prefix (and may hold the
    ``position_ids`` buffer); sharded folders and repo roots resolve."""
    ref = _reference(tmp_path / "t5style")
    sd = load_file(tmp_path / "t5style" / "model.safetensors")
    assert not any(k.startswith("text_model.") for k in sd)
    folder = tmp_path / "repo" / "text_encoder"
    folder.mkdir(parents=True)
    official = {f"text_model.{k}": v for k, v in sd.items()}
    official["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(official, folder / "model.safetensors")
    (folder / "config.json").write_text((tmp_path / "t5style" / "config.json").read_text())
    ours = load_clip(tmp_path / "repo")
    assert set(ours.state_dict()) == set(official) - {"text_model.embeddings.position_ids"}
    ids = _ids(ref.config, 77, (12, 40))
    assert torch.equal(ours(ids)[1], ref(input_ids=ids).pooler_output)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded = load_clip(tmp_path / "sharded")
    for name, p in ours.state_dict().items():
        assert torch.equal(sharded.state_dict()[name], p), name


def test_loading_errors(tmp_path):
    _reference(tmp_path / "text_encoder")
    folder = tmp_path / "text_encoder"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 65}))
    with pytest.raises(CheckpointError, match=r"(?s)model\.safetensors does not match CLIPText.*wrong shape"):
        load_clip(folder)
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing: text_model\.encoder\.layers\.2\."):
        load_clip(folder)
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="'gelu' is not supported"):
        load_clip(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no CLIP text encoder in"):
        load_clip(tmp_path / "empty")


def test_bad_inputs():
    m = CLIPText(CLIP_TINY)
    with pytest.raises(ValueError, match="1 to 77 tokens"):
        m(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must lie in \[0, 300\)"):
        m(torch.tensor([[5, 300]]))
    with pytest.raises(ValueError, match="integer tensor"):
        m(torch.zeros(1, 77))
    with pytest.raises(ValueError, match="integer tensor"):
        m(torch.zeros(77, dtype=torch.long))


@torch.no_grad()
def test_tokenizer_to_pooled_end_to_end(tmp_path):
    """Our tokenizer + model == transformers' tokenizer + model, on a vocabulary whose EOT is the top id."""
    tok_dir = clip_tokenizer_files(tmp_path / "tokenizer")
    vocab = len(json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8")))
    ref = _reference(tmp_path / "text_encoder", vocab_size=vocab)
    prompts = PROMPTS[:4] + PROMPTS[-1:]
    ids = load_clip_tokenizer(tok_dir)(prompts)
    theirs = CLIPTokenizer.from_pretrained(tok_dir)(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert torch.equal(ids, theirs)
    _, pooled = load_clip(tmp_path / "text_encoder")(ids)
    assert max_rel_err(pooled, ref(input_ids=theirs).pooler_output) <= TOL


def test_full_size_matches_transformers_on_meta():
    assert config_from_transformers(OFFICIAL_CLIP_L) == CLIP_L
    ours = build_on_meta(lambda: CLIPText(CLIP_L))
    with torch.device("meta"):
        theirs = CLIPTextModel(HFCLIPTextConfig(**OFFICIAL_CLIP_L))
    # transformers >= 5 drops the ``text_model.`` prefix in memory; the official file keeps it
    assert {k: tuple(p.shape) for k, p in ours.named_parameters()} == {
        f"text_model.{k}": tuple(p.shape) for k, p in theirs.named_parameters()
    }
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480  # 123.06 M


@pytest.mark.parametrize("cfg,length,batch", [(CLIP_TINY, 77, 2), (CLIP_TINY, 20, 3), (CLIP_L, 77, 1)])
def test_analytic_flops_match_flop_counter(cfg, length, batch):
    """FlopCounterMode on a meta-device model (on real CPU tensors it would skip the SDPA kernel)."""
    m = build_on_meta(lambda: CLIPText(cfg))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        m(torch.empty(batch, length, dtype=torch.long, device="meta"))
    assert counter.get_total_flops() == flops(cfg, length, batch)["total"]
