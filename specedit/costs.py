"""FLOPs accounting (2 x MACs over every matmul, attention included) for full-size editors without weights.

Transformer forwards use each model's analytic counter; the one-off encoders and the VAE are counted with
``torch.utils.flop_counter.FlopCounterMode`` on meta-device modules (shapes only, nothing allocated). On
meta, scaled-dot-product attention decomposes into matmuls that the counter sees; on real CPU tensors the
counter has no formula for the CPU flash kernel, which is why the meta device is used throughout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from models import flux, flux_ae
from models.loading import build_on_meta
from models.packing import grid_of

T = 1e12

# The paper's 50-step baselines (Tables 1 and 5), TFLOPs.
PAPER_BASELINE_TFLOPS = {"flux-kontext-dev": 8299.54, "qwen-image-edit": 28219.71}


def count_on_meta(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` whose tensors live on the meta device."""
    fc = FlopCounterMode(display=False)
    with fc, torch.no_grad():
        fn()
    return fc.get_total_flops()


def flux_ae_flops(height: int, width: int, cfg: flux_ae.FluxAEConfig = flux_ae.FLUX_AE) -> dict[str, int]:
    """Encode and decode FLOPs of the FLUX AE at ``height`` x ``width`` pixels."""
    ae = build_on_meta(lambda: flux_ae.AutoEncoder(cfg))
    f = cfg.factor
    with torch.device("meta"):
        image = torch.empty(1, cfg.in_channels, height, width)
        latent = torch.empty(1, cfg.z_channels, height // f, width // f)
    return {
        "encode": count_on_meta(lambda: ae.encode(image)),
        "decode": count_on_meta(lambda: ae.decode(latent)),
    }


def flux_kontext_forward_flops(
    target_tokens: int, ref_tokens: int, text_tokens: int, *, measure: bool = True
) -> dict:
    """One full-size FLUX.1-Kontext-dev forward: analytic, and counted on the meta model when ``measure``."""
    cfg = flux.FLUX_KONTEXT_DEV
    n = target_tokens + ref_tokens
    out = {"analytic": flux.flops(cfg, n, text_tokens)["total"]}
    if measure:
        model = build_on_meta(lambda: flux.Flux(cfg))
        with torch.device("meta"):
            args = dict(
                img=torch.empty(1, n, cfg.in_channels),
                img_ids=torch.empty(1, n, 3),
                txt=torch.empty(1, text_tokens, cfg.context_in_dim),
                txt_ids=torch.empty(1, text_tokens, 3),
                timesteps=torch.empty(1),
                y=torch.empty(1, cfg.vec_in_dim),
                guidance=torch.empty(1),
            )
        out["measured"] = count_on_meta(lambda: model(**args))
    return out


def flux_kontext_baseline(
    height: int,
    width: int,
    ref_height: int,
    ref_width: int,
    text_tokens: int,
    steps: int,
    *,
    measure: bool = True,
) -> dict:
    """Cost of a plain ``steps``-step Kontext edit: transformer forwards plus the one-off encoders and VAE."""
    tgt, ref = grid_of(height, width), grid_of(ref_height, ref_width)
    n_tgt, n_ref = tgt[0] * tgt[1], ref[0] * ref[1]
    fwd = flux_kontext_forward_flops(n_tgt, n_ref, text_tokens, measure=measure)
    per_forward = fwd.get("measured", fwd["analytic"])
    enc = flux_ae_flops(ref_height, ref_width)["encode"]
    dec = flux_ae_flops(height, width)["decode"]
    one_off = {
        "vae_encode_reference": enc / T,
        "vae_decode": dec / T,
        **_flux_text_encoder_tflops(text_tokens),
    }
    total = steps * per_forward / T + sum(one_off.values())
    result = {
        "model": "flux-kontext-dev",
        "height": height,
        "width": width,
        "ref_height": ref_height,
        "ref_width": ref_width,
        "text_tokens": text_tokens,
        "steps": steps,
        "tokens": {"target": n_tgt, "reference": n_ref, "text": text_tokens},
        "forwards_per_step": 1,  # guidance distilled: no CFG branch
        "tflops_per_forward": per_forward / T,
        "tflops_per_forward_analytic": fwd["analytic"] / T,
        "tflops_transformer": steps * per_forward / T,
        "one_off_tflops": one_off,
        "tflops_total": total,
    }
    return result


def _flux_text_encoder_tflops(text_tokens: int) -> dict[str, float]:
    """T5-XXL over ``text_tokens`` and CLIP-L over 77 tokens, when those models are available."""
    out = {}
    try:
        from models import clip, t5
    except ImportError:  # encoders not present in this checkout
        return out
    out["t5"] = t5.flops(t5.T5_XXL, text_tokens)["total"] / T
    out["clip"] = clip.flops(clip.CLIP_L, 77)["total"] / T
    return out


def paper_comparison(model: str, tflops_total: float) -> dict:
    paper = PAPER_BASELINE_TFLOPS[model]
    return {"paper_tflops_total": paper, "vs_paper_pct": 100 * (tflops_total / paper - 1)}


def qwen_edit_baseline(
    height: int,
    width: int,
    ref_height: int,
    ref_width: int,
    text_tokens: int,
    neg_text_tokens: int,
    steps: int,
    *,
    vl_side: int = 1024,
    measure: bool = True,
) -> dict:
    """Cost of a plain ``steps``-step Qwen-Image-Edit edit with true CFG (two forwards per step).

    ``text_tokens`` / ``neg_text_tokens`` are the DiT text-stream lengths of the positive and negative
    prompts after the 64-token drop; they include the Qwen2.5-VL image tokens (1369 for a 1024^2 image).
    One-off costs: the VL encoder for both prompts (vision tower on the ``vl_side`` image, LLM on 64 + L
    tokens), the VAE encode of the reference and the decode of the output, as the 2-D VAE we run them.
    """
    from models import qwen2_5_vl, qwen_image, qwen_image_vae
    from models.qwen_processor import smart_resize

    cfg = qwen_image.QWEN_IMAGE_EDIT
    tgt, ref = grid_of(height, width), grid_of(ref_height, ref_width)
    n = tgt[0] * tgt[1] + ref[0] * ref[1]
    per_branch = {L: qwen_image.flops(cfg, n, L)["total"] for L in (text_tokens, neg_text_tokens)}
    measured = None
    if measure:
        model = build_on_meta(lambda: qwen_image.QwenImage(cfg))
        measured = {}
        for L in per_branch:
            with torch.device("meta"):
                args = (
                    torch.empty(1, n, cfg.in_channels),
                    torch.empty(1, n, 3),
                    torch.empty(1, L, cfg.joint_attention_dim),
                    torch.empty(1, L, 3),
                    torch.empty(1),
                )
            measured[L] = count_on_meta(lambda a=args: model(*a))
    per_step = sum((measured or per_branch)[L] for L in (text_tokens, neg_text_tokens))
    vh, vw = smart_resize(vl_side, vl_side)
    grid_thw = [(1, vh // 14, vw // 14)]
    vl = sum(
        qwen2_5_vl.flops(qwen2_5_vl.QWEN25VL_7B, 64 + L, grid_thw)["total"]
        for L in (text_tokens, neg_text_tokens)
    )
    vae = qwen_image_vae.QWEN_IMAGE_VAE
    one_off = {
        "vl_encoder_pos_neg": vl / T,
        "vae_encode_reference": qwen_image_vae.flops(vae, ref_height, ref_width)["encode"] / T,
        "vae_decode": qwen_image_vae.flops(vae, height, width)["decode"] / T,
    }
    return {
        "model": "qwen-image-edit",
        "height": height,
        "width": width,
        "ref_height": ref_height,
        "ref_width": ref_width,
        "text_tokens": text_tokens,
        "neg_text_tokens": neg_text_tokens,
        "steps": steps,
        "tokens": {
            "target": tgt[0] * tgt[1],
            "reference": ref[0] * ref[1],
            "text": text_tokens,
            "negative_text": neg_text_tokens,
        },
        "forwards_per_step": 2,  # true CFG: conditional and unconditional branch
        "tflops_per_forward": (measured or per_branch)[text_tokens] / T,
        "tflops_per_forward_analytic": per_branch[text_tokens] / T,
        "tflops_per_step": per_step / T,
        "tflops_transformer": steps * per_step / T,
        "one_off_tflops": one_off,
        "tflops_total": steps * per_step / T + sum(one_off.values()),
    }
