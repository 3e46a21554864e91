"""LoRA adapters: read ``.safetensors`` LoRA files in the common layouts and fuse them into model weights.

A LoRA on a linear layer ``W (out, in)`` holds ``A (r, in)`` ("down") and ``B (out, r)`` ("up") and an
optional scalar ``alpha``; the adapted weight is ``W + scale * (alpha / r) * B @ A`` (``alpha`` absent means
``alpha = r``, i.e. a factor of 1), as in the LoRA paper and PEFT's ``lora_alpha / r`` scaling. A LoRA may
also carry a bias delta (PEFT ``lora_B.bias``, scaled by ``alpha / r`` like ``B``; or ComfyUI's full
``.diff_b``) and a full weight delta (ComfyUI ``.diff``); both are added times ``scale``.

A key is ``<prefix><module path><suffix>``. Suffixes read: ``.lora_A.weight`` / ``.lora_B.weight`` (PEFT,
diffusers), the same with PEFT's adapter name ``default`` (``.lora_A.default.weight``), ``.lora_down.weight``
/ ``.lora_up.weight`` (kohya, ComfyUI, the Qwen-Image-Lightning files), ``.lora.down.weight`` /
``.lora.up.weight`` (older diffusers), ``.down.weight`` / ``.up.weight`` (XLabs), ``.alpha``,
``.lora_B.bias``, ``.diff``, ``.diff_b``. Prefixes read (the path after it may use either naming below):

* ``transformer.`` (diffusers), ``base_model.model.`` (PEFT), ``diffusion_model.`` and
  ``model.diffusion_model.`` (BFL / ComfyUI, ai-toolkit), or none (diffusers-named files such as the
  Qwen-Image-Lightning LoRAs, DiffSynth, ai-toolkit's BFL-named FLUX files);
* ``lora_unet_`` (kohya / sd-scripts, musubi-tuner) and ``lora_transformer_`` (diffusers'
  ``_convert_mixture_state_dict_to_diffusers`` layout), with the module path's ``.`` written ``_``.

Module paths: our own (for FLUX that is BFL's: ``double_blocks.0.img_attn.qkv``; Qwen-Image uses diffusers'
names, so ``transformer_blocks.0.attn.to_q`` is ours), and for FLUX also diffusers' names and XLabs'
``double_blocks.N.processor.{qkv,proj}_lora{1,2}`` / ``single_blocks.N.processor.{qkv,proj}_lora`` (as
diffusers' ``_convert_xlabs_flux_lora_to_diffusers`` maps them). Diffusers-named FLUX LoRAs are re-targeted to
our BFL tree: ``to_q`` / ``to_k`` / ``to_v`` land in row slices 0, 1, 2 of the fused ``img_attn.qkv``
(``add_{q,k,v}_proj`` in ``txt_attn.qkv``), and a single block's ``to_q``, ``to_k``, ``to_v``, ``proj_mlp``
land in ``linear1`` rows ``[0, d)``, ``[d, 2d)``, ``[2d, 3d)``, ``[3d, 3d + mlp)`` -- the order of
``models.flux.diffusers_to_bfl`` and of diffusers' ``FluxTransformer2DModel``. ``norm_out.linear`` chunks
(scale, shift) where BFL's final ``adaLN_modulation.1`` chunks (shift, scale), so its rows are swapped.
Several LoRAs landing in one module become one fused LoRA: the ``A``s are concatenated along the rank, each
``B`` (times its own ``alpha / r``) fills its rows and its rank columns of a block matrix, so
``B_fused @ A_fused`` is the sum of the separate deltas.

Refused with a one-line ``ValueError``: an empty file, keys that match no linear layer (counted, with examples and the
reason: text-encoder keys, a non-linear target, an unknown tensor kind), a LoRA made for another model family
(told by its key names, e.g. ``double_blocks`` for FLUX, ``img_mod.1`` for Qwen-Image, or by the
``modelspec.architecture`` / ``ss_base_model_version`` metadata), DoRA, LoHa, LoKr, OFT / BOFT, (IA)^3,
GLoRA and LoCon-Tucker tensors, rank and shape mismatches, and bias deltas for a layer without a bias.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from models.flux import Flux, FluxConfig
from models.loading import FileSpan, file_span, open_checkpoint, revert_pages
from models.qwen_image import QwenImage

# (key suffix, role); a longer suffix comes before any suffix it ends with
_SUFFIXES = (
    (".lora_A.default.weight", "A"),
    (".lora_B.default.weight", "B"),
    (".lora_B.default.bias", "bias"),
    (".lora_down.weight", "A"),
    (".lora.down.weight", "A"),
    (".lora_up.weight", "B"),
    (".lora.up.weight", "B"),
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_B.bias", "bias"),
    (".down.weight", "A"),
    (".up.weight", "B"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
)
_DOTTED = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "")
_FLAT = ("lora_unet_", "lora_transformer_")  # module path written with '_' for '.'
_TEXT_ENCODER = re.compile(r"^(lora_te\d?_|text_encoders?[._]|te\d?[._])")
# unsupported adapter kinds, recognised by their tensor names
_VARIANTS = (
    ("DoRA", re.compile(r"dora_scale|lora_magnitude_vector")),
    ("LoHa", re.compile(r"hada_w[12]_[ab]|hada_t[12]")),
    ("LoKr", re.compile(r"lokr_w[12]|lokr_t[12]")),
    ("OFT / BOFT", re.compile(r"oft_blocks|oft_diag|\.oft_r\b|boft_r")),
    ("(IA)^3", re.compile(r"\.on_input$|ia3_l")),
    ("GLoRA", re.compile(r"\.[ab][12]\.weight$")),
    ("LoCon Tucker", re.compile(r"\.lora_mid\.weight$")),
)
_B, _E = r"(?:^|[._])", r"(?:[._]|$)"
# (family, what gives it away, pattern); family names match _family(model)
_FAMILIES = (
    (
        "FLUX",
        "double_blocks/single_blocks keys",
        re.compile(
            _B + r"(?:double_blocks|single_blocks|single_transformer_blocks|img_attn|txt_attn|ff_context|"
            r"norm1_context|x_embedder|context_embedder|final_layer)" + _E
        ),
    ),
    (
        "Qwen-Image",
        "img_mod.1/img_mlp.net keys",
        re.compile(_B + r"(?:img|txt)_(?:mod[._]1|mlp[._]net)" + _E),
    ),
    (
        "Stable Diffusion UNet",
        "down_blocks/up_blocks keys",
        re.compile(_B + r"(?:down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)" + _E),
    ),
    (
        "Wan",
        "blocks.N.self_attn/cross_attn keys",
        re.compile(_B + r"blocks[._]\d+[._](?:self|cross)_attn" + _E),
    ),
)
_SHOWN = 5  # keys listed in an error
_CHUNK = 1 << 20  # fp32 elements of work per step while fusing (bounds the temporary memory)
_CMP = 1 << 22  # bytes compared per step when checking a weight against its file

# model -> the originals of the parameters fused since the last unfuse
_ORIGINALS: weakref.WeakKeyDictionary[nn.Module, _Saved] = weakref.WeakKeyDictionary()


class LoRADelta(NamedTuple):
    """What one LoRA does to one linear layer of ours (``rows``: the weight rows it changes, None = all)."""

    rows: Tensor | None
    a: Tensor | None  # (r, in) down
    b: Tensor | None  # (len(rows) or out, r) up
    alpha: float | None  # None: alpha = r
    weight: Tensor | None  # (len(rows) or out, in) full delta (.diff), fp32
    bias: Tensor | None  # (len(rows) or out,) bias delta (.diff_b + alpha / r * lora_B.bias), fp32


LoRA = dict[str, LoRADelta]  # our module path -> its delta


# ----------------------------------------------------------------------------------------------- names
def _flux_diffusers_table(cfg: FluxConfig) -> dict[str, tuple[str, Tensor | None]]:
    """diffusers (and XLabs) FLUX module -> (our BFL module, the rows of our weight it fills; None = all)."""
    d, m = cfg.hidden_size, cfg.mlp_hidden
    rows = lambda k, n=d: torch.arange(k * d, k * d + n)  # noqa: E731
    t: dict[str, tuple[str, Tensor | None]] = {
        "x_embedder": ("img_in", None),
        "context_embedder": ("txt_in", None),
        "proj_out": ("final_layer.linear", None),
        # diffusers row j (scale, shift) is BFL row (j + d) mod 2d (shift, scale)
        "norm_out.linear": ("final_layer.adaLN_modulation.1", torch.arange(2 * d).roll(d)),
    }
    for ours, theirs in (("time_in", "timestep"), ("vector_in", "text"), ("guidance_in", "guidance")):
        t[f"time_text_embed.{theirs}_embedder.linear_1"] = (f"{ours}.in_layer", None)
        t[f"time_text_embed.{theirs}_embedder.linear_2"] = (f"{ours}.out_layer", None)
    for i in range(cfg.depth):
        o, b = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for k, x in enumerate("qkv"):
            t[f"{b}.attn.to_{x}"] = (f"{o}.img_attn.qkv", rows(k))
            t[f"{b}.attn.add_{x}_proj"] = (f"{o}.txt_attn.qkv", rows(k))
        plain = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"}
        plain |= {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj"}
        plain |= {"ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2"}
        plain |= {"ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
        t |= {f"{b}.{theirs}": (f"{o}.{ours}", None) for theirs, ours in plain.items()}
        xlabs = {"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv"}
        xlabs |= {"proj_lora1": "img_attn.proj", "proj_lora2": "txt_attn.proj"}
        t |= {f"{o}.processor.{theirs}": (f"{o}.{ours}", None) for theirs, ours in xlabs.items()}
    for i in range(cfg.depth_single_blocks):
        o, b = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for k, x in enumerate("qkv"):
            t[f"{b}.attn.to_{x}"] = (f"{o}.linear1", rows(k))
        t[f"{b}.proj_mlp"] = (f"{o}.linear1", rows(3, m))
        t[f"{b}.proj_out"] = (f"{o}.linear2", None)
        t[f"{b}.norm.linear"] = (f"{o}.modulation.lin", None)
        t[f"{o}.processor.qkv_lora"] = (f"{o}.linear1", rows(0, 3 * d))
        t[f"{o}.processor.proj_lora"] = (f"{o}.linear2", None)
    return t


def _targets(model: nn.Module) -> tuple[dict, dict]:
    """(dotted, flat): every accepted module path -> (our linear, rows or None), and each path written with
    '_' for '.' -> the path (a flat name two paths share is left out: such keys then match nothing)."""
    dotted = {n: (n, None) for n, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    if isinstance(model, Flux):
        dotted |= {k: v for k, v in _flux_diffusers_table(model.config).items() if v[0] in dotted}
    flat: dict[str, str | None] = {}
    for k in dotted:
        f = k.replace(".", "_")
        flat[f] = k if f not in flat else None
    return dotted, {f: k for f, k in flat.items() if k is not None}


def _split(key: str) -> tuple[str, str] | None:
    """(key without its suffix, role), or None for a suffix that is not read."""
    return next(((key[: -len(s)], role) for s, role in _SUFFIXES if key.endswith(s)), None)


def _resolve(stem: str, dotted: dict, flat: dict) -> str | None:
    """The dotted module path a key stem (prefix + path) names, or None."""
    for p in _DOTTED:
        if stem.startswith(p) and stem[len(p) :] in dotted:
            return stem[len(p) :]
    for p in _FLAT:
        if stem.startswith(p) and stem[len(p) :] in flat:
            return flat[stem[len(p) :]]
    return None


# ----------------------------------------------------------------------------------------------- checks
def _family(model: nn.Module) -> str | None:
    return "FLUX" if isinstance(model, Flux) else "Qwen-Image" if isinstance(model, QwenImage) else None


def _check_kind(sd: Mapping[str, Tensor], meta: Mapping[str, str], name: str, model: nn.Module) -> None:
    """Refuse adapter kinds other than LoRA and LoRAs made for another model family."""
    for kind, pattern in _VARIANTS:
        hits = sorted(k for k in sd if pattern.search(k))
        if hits:
            raise ValueError(
                f"{name}: {kind} adapters are not supported ({len(hits)} {kind} tensors such as "
                f"{hits[0]!r}); only plain LoRA (down/up, alpha, LoRA bias, diff) is read"
            )
    own = _family(model)
    if own is None:
        return
    found = {fam: why for fam, why, pattern in _FAMILIES if any(pattern.search(k) for k in sd)}
    if own not in found and found:
        fam, why = next(iter(found.items()))
        raise ValueError(f"{name} is a {fam} LoRA ({why}), not for {type(model).__name__}")
    if not found:  # key names tell nothing: trust the training tool's record, if any
        arch = " ".join(str(meta.get(k, "")) for k in ("modelspec.architecture", "ss_base_model_version"))
        mine, other = {"FLUX": ("flux", "qwen"), "Qwen-Image": ("qwen", "flux")}[own]
        if other in arch.lower() and mine not in arch.lower():
            raise ValueError(
                f"{name} is a LoRA for {arch.strip()!r} (its metadata), not for {type(model).__name__}"
            )


def _reasons(keys: list[str], model: nn.Module, linear: dict) -> str:
    """Why ``keys`` match no linear layer: short reasons for the error message."""
    others = {n: None for n, m in model.named_modules() if n and n not in linear}
    flat = {n.replace(".", "_"): n for n in others}
    out = set()
    for key in keys:
        hit = _split(key)
        if _TEXT_ENCODER.match(key):
            out.add("text-encoder keys: only the transformer is adapted here")
        elif hit is None:
            out.add("tensor kinds not read here")
        elif _resolve(hit[0], others, flat) is not None:
            out.add("targets that are not linear layers")
        else:
            out.add("no such module")
    return "; ".join(sorted(out))


def _group(sd: dict[str, Tensor], dotted: dict, flat: dict, name: str, model: nn.Module) -> dict[str, dict]:
    """Dotted module path -> {"key": the stem for messages, role: tensor}; keys that match nothing raise."""
    groups: dict[str, dict] = {}
    unmatched = []
    for key, value in sd.items():
        hit = _split(key)
        path = None if hit is None else _resolve(hit[0], dotted, flat)
        if path is None:
            unmatched.append(key)
            continue
        part = groups.setdefault(path, {"key": hit[0]})
        if hit[1] in part:
            raise ValueError(f"{name}: {hit[0]} has two {hit[1]} tensors (two spellings of one key)")
        part[hit[1]] = value
    if unmatched:
        raise ValueError(
            f"{name}: {len(unmatched)} LoRA keys match no module of {type(model).__name__}, "
            f"e.g. {sorted(unmatched)[:_SHOWN]} ({_reasons(unmatched, model, dotted)})"
        )
    return groups


def _checked(part: dict, layer: nn.Linear, rows: Tensor | None, name: str) -> dict:
    """One source module's tensors after checking ranks and shapes: {"A", "B", "alpha", "diff", "bias"}."""
    src, w = part["key"], layer.weight
    out, width = (w.shape[0] if rows is None else len(rows)), w.shape[1]
    got = {"A": part.get("A"), "B": part.get("B"), "diff": part.get("diff"), "alpha": None, "bias": None}
    if got["A"] is not None or got["B"] is not None or "alpha" in part or "bias" in part:
        _check_low_rank(part, out, width, w.shape, name)
        r = part["A"].shape[0]
        got["alpha"] = _scalar(part, "alpha", name) if "alpha" in part else None
        if "bias" in part:
            _check_shape(src, "lora_B.bias", part["bias"], (out,), name)
            got["bias"] = part["bias"].float() * ((r if got["alpha"] is None else got["alpha"]) / r)
    if got["diff"] is not None:
        _check_shape(src, "diff", got["diff"], (out, width), name)
        got["diff"] = got["diff"].float()
    if "diff_b" in part:
        _check_shape(src, "diff_b", part["diff_b"], (out,), name)
        got["bias"] = part["diff_b"].float() + (0 if got["bias"] is None else got["bias"])
    if got["bias"] is not None and layer.bias is None:
        raise ValueError(f"{name}: {src} has a bias delta but the layer has no bias")
    return got


def _check_low_rank(part: dict, out: int, width: int, shape, name: str) -> None:
    src = part["key"]
    if "A" not in part or "B" not in part:
        missing = "down/A" if "A" not in part else "up/B"
        raise ValueError(f"{name}: {src} has no {missing} weight")
    a, b = part["A"], part["B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
        raise ValueError(f"{name}: {src} rank mismatch: A {tuple(a.shape)} vs B {tuple(b.shape)}")
    if a.shape[1] != width or b.shape[0] != out:
        raise ValueError(
            f"{name}: {src} shape mismatch: delta ({b.shape[0]}, {a.shape[1]}) vs target ({out}, {width}) "
            f"of weight {tuple(shape)}"
        )


def _check_shape(src: str, what: str, t: Tensor, want: tuple, name: str) -> None:
    if tuple(t.shape) != want:
        raise ValueError(f"{name}: {src} {what} shape {tuple(t.shape)} vs target {want}")


def _scalar(part: dict, role: str, name: str) -> float:
    t = part[role]
    if t.numel() != 1:
        raise ValueError(f"{name}: {part['key']} {role} has shape {tuple(t.shape)}, not a scalar")
    return float(t.float().item())


# ----------------------------------------------------------------------------------------------- reading
def _merge(entries: list[tuple[Tensor | None, dict]], n_out: int) -> LoRADelta:
    """One delta from several sources on row sets of one weight; each alpha / r is folded into B."""
    if len(entries) == 1:
        rows, g = entries[0]
        return LoRADelta(rows, g["A"], g["B"], g["alpha"], g["diff"], g["bias"])
    all_rows = [torch.arange(n_out) if r is None else r for r, _ in entries]
    union = torch.unique(torch.cat(all_rows))  # sorted
    pos = torch.full((n_out,), -1, dtype=torch.long)
    pos[union] = torch.arange(len(union))
    low = [(pos[r], g) for r, (_, g) in zip(all_rows, entries) if g["A"] is not None]
    a_cat = b_blk = weight = bias = None
    if low:
        a_cat = torch.cat([g["A"].float() for _, g in low])  # (sum r, in)
        b_blk = torch.zeros(len(union), len(a_cat))
        col = 0
        for p, g in low:
            r = g["A"].shape[0]
            b_blk[p, col : col + r] = g["B"].float() * ((r if g["alpha"] is None else g["alpha"]) / r)
            col += r
    for r, (_, g) in zip(all_rows, entries):
        if g["diff"] is not None:
            weight = torch.zeros(len(union), g["diff"].shape[1]) if weight is None else weight
            weight[pos[r]] += g["diff"]
        if g["bias"] is not None:
            bias = torch.zeros(len(union)) if bias is None else bias
            bias[pos[r]] += g["bias"]
    return LoRADelta(None if len(union) == n_out else union, a_cat, b_blk, None, weight, bias)


def _load(source) -> tuple[dict[str, Tensor], dict[str, str], str]:
    """The LoRA tensors, the file metadata and a name for errors; files are opened with the checked reader."""
    if isinstance(source, Mapping):
        return dict(source), {}, "LoRA state dict"
    ckpt = open_checkpoint(source)  # names the file when it is missing, truncated or not safetensors
    return {k: ckpt[k].clone() for k in ckpt}, ckpt.metadata(), str(source)


def read_lora(model: nn.Module, source: str | os.PathLike | Mapping[str, Tensor]) -> LoRA:
    """Read a LoRA file (or state dict) into ``{our linear's path: LoRADelta}`` (see the module docstring).

    Raises ValueError (one line) for unsupported adapter kinds, a LoRA for another model family, keys that
    match no linear layer of ``model``, a missing up/down half, a rank mismatch, a delta whose shape is not
    its target's, and a bias delta for a layer without bias; a damaged file raises
    models.loading.CheckpointError naming it.
    """
    sd, meta, name = _load(source)
    if not sd:
        raise ValueError(f"{name} holds no tensors")
    _check_kind(sd, meta, name, model)
    dotted, flat = _targets(model)
    modules = dict(model.named_modules())
    per_target: dict[str, list] = {}
    for path, part in sorted(_group(sd, dotted, flat, name, model).items()):
        ours, rows = dotted[path]
        per_target.setdefault(ours, []).append((rows, _checked(part, modules[ours], rows, name)))
    return {t: _merge(e, modules[t].weight.shape[0]) for t, e in per_target.items()}


# ----------------------------------------------------------------------------------------------- fusing
@torch.no_grad()
def _add_weight(w: Tensor, d: LoRADelta, scale: float) -> None:
    """w[rows] += scale * ((alpha / r) * B @ A + diff), formed in fp32 a block of rows at a time, in place
    on one fp32 temporary per block (bit for bit ``(w.float() + factor * (B @ A)).to(w.dtype)``)."""
    n = w.shape[0] if d.rows is None else len(d.rows)
    step = max(1, _CHUNK // w.shape[1])
    rows = None if d.rows is None else d.rows.to(w.device)
    a = None if d.a is None else d.a.to(w.device, torch.float32)
    factor = 0.0 if a is None else scale * (a.shape[0] if d.alpha is None else d.alpha) / a.shape[0]
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        idx = slice(c0, c1) if rows is None else rows[c0:c1]
        if a is not None:
            new = (d.b[c0:c1].to(w.device, torch.float32) @ a).mul_(factor).add_(w[idx])
        else:
            new = w[idx].to(torch.float32, copy=True)
        if d.weight is not None:
            new.add_(scale * d.weight[c0:c1].to(w.device))
        if rows is None:
            w[idx].copy_(new)
        else:
            w[idx] = new.to(w.dtype)


@torch.no_grad()
def _add_bias(bias: Tensor, d: LoRADelta, scale: float) -> None:
    idx = slice(None) if d.rows is None else d.rows.to(bias.device)
    bias[idx] = (bias[idx].float() + scale * d.bias.to(bias.device)).to(bias.dtype)


def fuse_lora(model: nn.Module, source: str | os.PathLike | Mapping[str, Tensor], scale: float = 1.0):
    """Add ``scale * (alpha / r) * B @ A`` (and any bias / full deltas) into each targeted layer; returns the
    sorted module paths. Calls stack; ``unfuse_lora`` undoes all of them exactly.

    The sum is formed in fp32, a block of rows at a time, and stored in the parameter's dtype and device.
    The file is fully read and checked before any weight changes. Before a parameter is first changed its
    original is recorded: a weight that is a view into a checkpoint's memory map (a CPU load in the stored
    dtype, see ``models.loading.file_span``) and still holds the file's bytes is recorded as that file span,
    costing no memory; any other (converted, derived, on a GPU, edited since loading) is copied to the CPU
    (its size in its dtype).
    """
    lora = read_lora(model, source)
    modules = dict(model.named_modules())
    saved = _ORIGINALS.setdefault(model, _Saved())
    for name, d in lora.items():
        if d.a is not None or d.weight is not None:
            saved.remember(f"{name}.weight", modules[name].weight)
        if d.bias is not None:
            saved.remember(f"{name}.bias", modules[name].bias)
    for name, d in lora.items():
        if d.a is not None or d.weight is not None:
            _add_weight(modules[name].weight, d, scale)
        if d.bias is not None:
            _add_bias(modules[name].bias, d, scale)
    return sorted(lora)


@torch.no_grad()
def unfuse_lora(model: nn.Module) -> list[str]:
    """Restore, bit for bit, every parameter changed by ``fuse_lora`` since the last unfuse; returns the
    sorted paths of their modules."""
    saved = _ORIGINALS.pop(model, None)
    if saved is None:
        return []
    saved.restore(dict(model.named_parameters()))
    return sorted({p.rsplit(".", 1)[0] for p in saved.params})


# ----------------------------------------------------------------------------------------------- originals
class _FromFile(NamedTuple):
    """The original of a parameter that is a view into a checkpoint file's private memory map."""

    span: FileSpan
    f: object  # the open file
    dtype: torch.dtype
    shape: torch.Size

    def restore(self, p: Tensor) -> None:
        """Whole pages by dropping their private copies, partial end pages by reading the file; a parameter
        that moved since (another device or dtype) gets the file's bytes read, then copied."""
        if file_span(p) == self.span:
            raw = _bytes(p)
            for lo, hi in revert_pages(self.span):
                _read(self.f, lo, raw[lo - self.span.offset : hi - self.span.offset])
        else:
            tmp = torch.empty(self.shape, dtype=self.dtype)
            _read(self.f, self.span.offset, _bytes(tmp))
            p.copy_(tmp)


class _Saved:
    """One model's originals (parameter path -> CPU copy or :class:`_FromFile`) and the checkpoint files they
    are read back from, each opened once and kept open until unfuse. A file is used only if it is the one
    mapped (device, inode) and holds the parameter's current bytes, so a file replaced on disk or a weight
    edited in place since loading falls back to a copy."""

    def __init__(self):
        self.params: dict[str, Tensor | _FromFile] = {}
        self.files: dict[tuple, object] = {}  # (path, file_id) -> open file, or None: not usable

    def remember(self, path: str, p: Tensor) -> None:
        if path not in self.params:
            self.params[path] = self._from_file(p) or p.detach().to("cpu", copy=True)

    def _from_file(self, p: Tensor) -> _FromFile | None:
        span = file_span(p)
        if span is None:
            return None
        key = (span.path, span.file_id)
        if key not in self.files:
            self.files[key] = _open_same(span)
        f = self.files[key]
        if f is None or not _same_bytes(f, span.offset, _bytes(p)):
            return None
        return _FromFile(span, f, p.dtype, p.shape)

    def restore(self, params: dict[str, Tensor]) -> None:
        try:
            for path, original in self.params.items():
                if isinstance(original, Tensor):
                    params[path].copy_(original)
                else:
                    original.restore(params[path])
        finally:
            for f in self.files.values():
                if f is not None:
                    f.close()


def _open_same(span: FileSpan):
    """The file of ``span`` opened for reading, if it is still the file that was mapped; else None."""
    try:
        f = open(span.path, "rb", buffering=0)  # noqa: SIM115 (kept open until unfuse)
    except OSError:
        return None
    st = os.fstat(f.fileno())
    if (st.st_dev, st.st_ino) != span.file_id:
        f.close()
        return None
    return f


def _bytes(t: Tensor) -> Tensor:
    """The bytes of a contiguous CPU tensor, as a flat uint8 view."""
    return t.detach().reshape(-1).view(torch.uint8)


def _read(f, offset: int, out: Tensor) -> None:
    """Fill the uint8 CPU tensor ``out`` with the file's bytes from ``offset``."""
    view, done = memoryview(out.numpy()), 0
    while done < len(view):
        f.seek(offset + done)
        n = f.readinto(view[done:])
        if not n:
            raise OSError(f"{f.name} ended at byte {offset + done} while restoring a weight from it")
        done += n


def _same_bytes(f, offset: int, have: Tensor) -> bool:
    """Whether the file holds the bytes ``have`` (uint8) from ``offset``, compared a block at a time."""
    buf = torch.empty(min(_CMP, len(have)), dtype=torch.uint8)
    for lo in range(0, len(have), len(buf)):
        chunk = buf[: min(len(buf), len(have) - lo)]
        try:
            _read(f, offset + lo, chunk)
        except OSError:
            return False
        if not torch.equal(chunk, have[lo : lo + len(chunk)]):
            return False
    return True
