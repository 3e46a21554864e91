"""LoRA adapters: read ``.safetensors`` LoRA files in the common layouts and fuse them into model weights.

A LoRA on a linear layer ``W (out, in)`` holds ``A (r, in)`` ("down") and ``B (out, r)`` ("up") and an
optional scalar ``alpha``; the adapted weight is ``W + scale * (alpha / r) * B @ A`` (``alpha`` absent means
``alpha = r``, i.e. a factor of 1), as in the LoRA paper and PEFT's ``lora_alpha / r`` scaling.

Key layouts read (the prefix picks the naming scheme of the module path that follows it):

* diffusers / PEFT: ``transformer.<diffusers module>.lora_A.weight`` / ``.lora_B.weight``, optional
  ``transformer.<module>.alpha``; the older diffusers spelling ``<module>.lora.down.weight`` /
  ``.lora.up.weight`` is read the same way.
* kohya / sd-scripts: ``lora_unet_<module path with '.' written '_'>.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha``; for FLUX the path is BFL's (``lora_unet_double_blocks_0_img_attn_qkv``), as diffusers'
  ``_convert_kohya_flux_lora_to_diffusers`` reads it.
* BFL / ComfyUI: ``diffusion_model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (or ``lora_down`` /
  ``lora_up``), optional ``.alpha``.

Our FLUX tree is BFL's, so diffusers-named FLUX LoRAs are re-targeted: ``to_q`` / ``to_k`` / ``to_v`` land in
row slices 0, 1, 2 of the fused ``img_attn.qkv`` (``add_{q,k,v}_proj`` in ``txt_attn.qkv``), and a single
block's ``to_q``, ``to_k``, ``to_v``, ``proj_mlp`` land in ``linear1`` rows ``[0, d)``, ``[d, 2d)``,
``[2d, 3d)``, ``[3d, 3d + mlp)`` -- the order of ``models.flux.diffusers_to_bfl`` and of diffusers'
``FluxTransformer2DModel``. ``norm_out.linear`` chunks (scale, shift) where BFL's final ``adaLN_modulation.1``
chunks (shift, scale), so its rows are swapped. Several LoRAs landing in one module become one fused LoRA:
the ``A``s are concatenated along the rank, each ``B`` (times its own ``alpha / r``) fills its rows and its
rank columns of a block matrix, so ``B_fused @ A_fused`` is the sum of the separate deltas.
Other models (Qwen-Image) use diffusers' module names already; their diffusers paths map one to one.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from models.flux import Flux, FluxConfig
from models.loading import open_checkpoint

# (key suffix, role); longest first so ".lora.down.weight" is not mistaken for something shorter
_SUFFIXES = (
    (".lora_down.weight", "A"),
    (".lora.down.weight", "A"),
    (".lora_up.weight", "B"),
    (".lora.up.weight", "B"),
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".alpha", "alpha"),
)
_SHOWN = 5  # keys listed in an error

# model -> {module name: CPU copy of its weight before the first fuse}
_ORIGINALS: weakref.WeakKeyDictionary[nn.Module, dict[str, Tensor]] = weakref.WeakKeyDictionary()

LoRA = dict[str, tuple[Tensor, Tensor, float | None]]  # our module path -> (A (r, in), B (out, r), alpha)


def _flux_diffusers_table(cfg: FluxConfig) -> dict[str, tuple[str, Tensor | None]]:
    """diffusers FLUX module -> (our BFL module, the rows of our weight it fills; None = all, in order)."""
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
    for i in range(cfg.depth_single_blocks):
        o, b = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for k, x in enumerate("qkv"):
            t[f"{b}.attn.to_{x}"] = (f"{o}.linear1", rows(k))
        t[f"{b}.proj_mlp"] = (f"{o}.linear1", rows(3, m))
        t[f"{b}.proj_out"] = (f"{o}.linear2", None)
        t[f"{b}.norm.linear"] = (f"{o}.modulation.lin", None)
    return t


def _targets(model: nn.Module) -> dict[str, tuple[str, Tensor | None]]:
    """Every accepted prefixed module path (without the LoRA suffix) -> (our module, rows or None)."""
    linears = {n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    out: dict[str, tuple[str, Tensor | None]] = {}
    for n in linears:
        out[f"diffusion_model.{n}"] = (n, None)
        out["lora_unet_" + n.replace(".", "_")] = (n, None)
    if isinstance(model, Flux):
        table = _flux_diffusers_table(model.config)
        out |= {f"transformer.{k}": v for k, v in table.items() if v[0] in linears}
    else:
        out |= {f"transformer.{n}": (n, None) for n in linears}
    return out


def _load(source: str | os.PathLike | Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """The LoRA tensors and a name for errors; files are opened with the checked reader of models.loading."""
    if isinstance(source, Mapping):
        return dict(source), "LoRA state dict"
    ckpt = open_checkpoint(source)  # names the file when it is missing, truncated or not safetensors
    return {k: ckpt[k].clone() for k in ckpt}, str(source)


def _group(sd: dict[str, Tensor], table: dict, name: str, model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Prefixed module path -> {"A", "B", "alpha"} tensors; keys that match no module raise."""
    groups: dict[str, dict[str, Tensor]] = {}
    unmatched = []
    for key, value in sd.items():
        hit = next(((key[: -len(s)], role) for s, role in _SUFFIXES if key.endswith(s)), None)
        if hit is None or hit[0] not in table:
            unmatched.append(key)
            continue
        part = groups.setdefault(hit[0], {})
        if hit[1] in part:
            raise ValueError(f"{name}: {hit[0]} has two {hit[1]} tensors (two spellings of one key)")
        part[hit[1]] = value
    if unmatched:
        raise ValueError(
            f"{name}: {len(unmatched)} LoRA keys match no module of {type(model).__name__}, "
            f"e.g. {sorted(unmatched)[:_SHOWN]}"
        )
    return groups


def _checked(src: str, part: dict[str, Tensor], weight: Tensor, rows: Tensor | None, name: str):
    """(A, B, alpha) of one source module after checking the ranks and the target's shape."""
    if "A" not in part or "B" not in part:
        missing = "down/A" if "A" not in part else "up/B"
        raise ValueError(f"{name}: {src} has no {missing} weight")
    a, b = part["A"], part["B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
        raise ValueError(f"{name}: {src} rank mismatch: A {tuple(a.shape)} vs B {tuple(b.shape)}")
    out = weight.shape[0] if rows is None else len(rows)
    if a.shape[1] != weight.shape[1] or b.shape[0] != out:
        raise ValueError(
            f"{name}: {src} shape mismatch: delta ({b.shape[0]}, {a.shape[1]}) vs target ({out}, "
            f"{weight.shape[1]}) of weight {tuple(weight.shape)}"
        )
    alpha = part.get("alpha")
    return a, b, None if alpha is None else float(alpha.float().item())


def _merge(entries: list[tuple[Tensor | None, Tensor, Tensor, float | None]], n_out: int):
    """One (A, B, alpha) from several LoRAs on row sets of one weight; each alpha / r is folded into B."""
    if len(entries) == 1 and entries[0][0] is None:
        return entries[0][1:]
    ranks = [a.shape[0] for _, a, _, _ in entries]
    a_cat = torch.cat([a.float() for _, a, _, _ in entries])  # (sum r, in)
    b_blk = torch.zeros(n_out, sum(ranks))  # (out, sum r)
    col = 0
    for (rows, _, b, alpha), r in zip(entries, ranks):
        rows = torch.arange(n_out) if rows is None else rows
        b_blk[rows, col : col + r] = b.float() * ((r if alpha is None else alpha) / r)
        col += r
    return a_cat, b_blk, None


def read_lora(model: nn.Module, source: str | os.PathLike | Mapping[str, Tensor]) -> LoRA:
    """Read a LoRA file (or state dict) into ``{our module path: (A (r, in), B (out, r), alpha or None)}``.

    Raises ValueError (one line) for keys that match no module of ``model``, a missing up/down half, a rank
    mismatch between A and B, or a delta whose shape is not the target weight's; a damaged file raises
    models.loading.CheckpointError naming it.
    """
    sd, name = _load(source)
    table = _targets(model)
    modules = dict(model.named_modules())
    per_target: dict[str, list] = {}
    for src, part in sorted(_group(sd, table, name, model).items()):
        ours, rows = table[src]
        entry = (rows, *_checked(src, part, modules[ours].weight, rows, name))
        per_target.setdefault(ours, []).append(entry)
    return {t: _merge(e, modules[t].weight.shape[0]) for t, e in per_target.items()}


@torch.no_grad()
def fuse_lora(model: nn.Module, source: str | os.PathLike | Mapping[str, Tensor], scale: float = 1.0):
    """Add ``scale * (alpha / r) * B @ A`` into each targeted weight; returns the sorted module paths.

    The sum is formed in fp32 and stored in the weight's dtype and device. Calls stack. Before a weight is
    first changed, a CPU copy of it is kept (memory: the size of every touched weight, in its dtype, e.g.
    about 2 bytes per parameter of the adapted linears in bf16) so ``unfuse_lora`` restores it exactly.
    The file is fully read and checked before any weight changes.
    """
    lora = read_lora(model, source)
    modules = dict(model.named_modules())
    saved = _ORIGINALS.setdefault(model, {})
    for name, (a, b, alpha) in lora.items():
        w = modules[name].weight
        if name not in saved:
            saved[name] = w.detach().to("cpu", copy=True)
        r = a.shape[0]
        factor = scale * (r if alpha is None else alpha) / r
        delta = b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)  # (out, r) @ (r, in)
        w.copy_((w.float() + factor * delta).to(w.dtype))
    return sorted(lora)


@torch.no_grad()
def unfuse_lora(model: nn.Module) -> list[str]:
    """Restore, bit for bit, every weight changed by ``fuse_lora`` since the last unfuse; returns their paths."""
    saved = _ORIGINALS.pop(model, {})
    modules = dict(model.named_modules())
    for name, original in saved.items():
        modules[name].weight.copy_(original)
    return sorted(saved)
