"""Test-side helpers for the text encoders: reference configs and self-built tokenizer files.

No tokenizer or weight can be downloaded here, so the tokenizer tests train tiny ones: a sentencepiece
unigram model with T5's special ids (pad 0, eos 1, unk 2) and a byte-level BPE with CLIP's ``</w>`` suffix
and its two special tokens at the top of the vocabulary, written in the official file layouts.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

# the official FLUX configs: ``text_encoder_2/config.json`` (t5-v1_1-xxl) and ``text_encoder/config.json``
OFFICIAL_T5_XXL = dict(
    architectures=["T5EncoderModel"],
    classifier_dropout=0.0,
    d_ff=10240,
    d_kv=64,
    d_model=4096,
    decoder_start_token_id=0,
    dense_act_fn="gelu_new",
    dropout_rate=0.1,
    eos_token_id=1,
    feed_forward_proj="gated-gelu",
    initializer_factor=1.0,
    is_encoder_decoder=True,
    is_gated_act=True,
    layer_norm_epsilon=1e-06,
    model_type="t5",
    num_decoder_layers=24,
    num_heads=64,
    num_layers=24,
    output_past=True,
    pad_token_id=0,
    relative_attention_max_distance=128,
    relative_attention_num_buckets=32,
    tie_word_embeddings=False,
    use_cache=True,
    vocab_size=32128,
)
OFFICIAL_CLIP_L = dict(
    architectures=["CLIPTextModel"],
    attention_dropout=0.0,
    bos_token_id=0,
    dropout=0.0,
    eos_token_id=2,
    hidden_act="quick_gelu",
    hidden_size=768,
    initializer_factor=1.0,
    initializer_range=0.02,
    intermediate_size=3072,
    layer_norm_eps=1e-05,
    max_position_embeddings=77,
    model_type="clip_text_model",
    num_attention_heads=12,
    num_hidden_layers=12,
    pad_token_id=1,
    projection_dim=768,
    vocab_size=49408,
)


def tiny_t5_kwargs(**over) -> dict:
    """transformers T5Config kwargs of a tiny T5 v1.1 encoder (32 buckets, max distance 128 as in XXL)."""
    kw = dict(
        vocab_size=256,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    kw.update(over)
    return kw


def tiny_clip_kwargs(**over) -> dict:
    """transformers CLIPTextConfig kwargs of a tiny CLIP text tower with the legacy eos_token_id = 2."""
    kw = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        projection_dim=32,
    )
    kw.update(over)
    return kw


# ----------------------------------------------------------------------------------------------- prompts
PROMPTS = [
    "A cat holding a sign that says hello world",
    "Make the SKY purple, add 3 balloons!!! And... a DOG?",
    "  extra   spaces\tand\ttabs\nand newlines  ",
    "café naïve résumé façade",  # NFC
    "cafe\u0301 nai\u0308ve re\u0301sume\u0301 fac\u0327ade",  # the same words in NFD
    "Zoë's 42nd-birthday: 1,000 ¥ / €5 — ok?",
    "don't won't it's we'll they're I've I'm he'd",
    "emoji 🙂 and ＦＵＬＬ-width ｔｅｘｔ ①②",
    "",
    "x",
    "Ünïcödé ÀÉÎÕÜ straße ΑΒΓ δέλτα кириллица",
    "<|endoftext|> written in the prompt <|startoftext|>",
    " ".join(f"word{i % 37} plus{i}" for i in range(400)),  # far past both max lengths
]

_CORPUS = [
    "a photo of a cat sitting on a red chair",
    "the quick brown fox jumps over the lazy dog",
    "make the sky purple and add three balloons",
    "a dog wearing sunglasses on the beach at sunset",
    "change the background to a snowy mountain landscape",
    "turn the car blue and remove the people in the street",
    "the café serves naïve résumé crêpes in the façade",
    "zoë bought 1,000 apples for 42 euros and 5 yen",
    "don't won't it's we'll they're i've i'm he'd",
    "Ünïcödé straße ΑΒΓ δέλτα кириллица",
    "replace the text on the sign with hello world",
    "add a rainbow over the old stone bridge",
    "a watercolor painting of a lighthouse in a storm",
    "make it look like a vintage photograph from 1970",
    "put a small wooden boat on the lake",
    "word plus birthday sign emoji full width text",
    "0 1 2 3 4 5 6 7 8 9 10 42nd 1,000 ok? yes! no. wait... (really) [sure] {fine}",
    "!!! ??? ... , ; : - -- — / \\ € ¥ $ % & * + = @ # ~ ` ' \" < > | ^ _ 🙂",
]


def t5_tokenizer_files(folder: Path, *, vocab_size: int = 250, layout: str = "both") -> Path:
    """Write a tiny T5 ``tokenizer_2``-style folder: ``spiece.model`` and/or a ``tokenizer.json``.

    ``layout``: "spiece" (sentencepiece model only), "both" (plus tokenizer.json written by transformers'
    T5Tokenizer from the model's pieces and normaliser, as its converter does), "legacy" (spiece.model plus a
    tokenizer.json in the older converter layout: Precompiled + space-run Replace normaliser, WhitespaceSplit
    + Metaspace pre-tokeniser).
    """
    import sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    model = buf.getvalue()
    (folder / "spiece.model").write_bytes(model)
    if layout == "spiece":
        return folder
    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    charsmap = spm_precompiled_charsmap(model)
    if layout == "both":
        from transformers import T5Tokenizer

        tok = T5Tokenizer(vocab=vocab, _spm_precompiled_charsmap=charsmap, extra_ids=10)
        tok.save_pretrained(folder)
        return folder
    if layout != "legacy":
        raise ValueError(layout)
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    tok = Tokenizer(Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Precompiled(charsmap), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0})
    )
    return folder


def spm_precompiled_charsmap(model: bytes) -> bytes:
    """``ModelProto.normalizer_spec.precompiled_charsmap`` (fields 3 then 2), read without protobuf."""
    for num, value in _proto_fields(model):
        if num == 3:
            for n2, v2 in _proto_fields(value):
                if n2 == 2:
                    return v2
    return b""


def _proto_fields(buf: bytes):
    """(field number, payload) of each length-delimited field of a protobuf message; others skipped."""

    def varint(i):
        shift = result = 0
        while True:
            b = buf[i]
            result |= (b & 0x7F) << shift
            i += 1
            if not b & 0x80:
                return result, i
            shift += 7

    i = 0
    while i < len(buf):
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            _, i = varint(i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = varint(i)
            yield key >> 3, buf[i : i + n]
            i += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def clip_tokenizer_files(folder: Path, *, vocab_size: int = 600) -> Path:
    """Write a tiny CLIP ``tokenizer``-style folder: vocab.json (specials last, as in CLIP), merges.txt,
    special_tokens_map.json and tokenizer_config.json. The BPE is trained with ``tokenizers``."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"), behavior="isolated"),
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.model.save(str(folder))  # vocab.json + merges.txt
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    vocab = {t: i for i, t in enumerate(sorted(vocab, key=vocab.get))}
    vocab["<|startoftext|>"] = len(vocab)  # CLIP keeps its specials at the top: EOT has the highest id
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    end = {
        "content": "<|endoftext|>",
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }
    start = {**end, "content": "<|startoftext|>"}
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": start, "eos_token": end, "pad_token": "<|endoftext|>", "unk_token": end})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "do_lower_case": True,
                "errors": "replace",
                "bos_token": start,
                "eos_token": end,
                "pad_token": "<|endoftext|>",
                "unk_token": end,
            }
        )
    )
    return folder
