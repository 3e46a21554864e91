"""FLOPs of a plain FLUX.1-Kontext-dev edit at full size, counted on the meta device (``specedit flops``).

Transformer forwards use the analytic count (``models.flux.flops``), checked against ``FlopCounterMode`` on the
meta-built model when ``measure``; the one-off encoders and the AE are counted on meta modules.
"""

from __future__ import annotations

import torch

from models import clip, flux, flux_ae, t5
from models.loading import build_on_meta
from models.packing import grid_of
from models.work import count_on_meta

T = 1e12
PAPER_BASELINE_TFLOPS = 8299.54  # the paper's 50-step FLUX.1-Kontext-dev baseline (Table 1)


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
    """T5-XXL over ``text_tokens`` and CLIP-L over 77 tokens."""
    return {
        "t5": t5.flops(t5.T5_XXL, text_tokens)["total"] / T,
        "clip": clip.flops(clip.CLIP_L, 77)["total"] / T,
    }


def paper_comparison(tflops_total: float, paper: float) -> dict:
    return {"paper_tflops_total": paper, "vs_paper_pct": 100 * (tflops_total / paper - 1)}


def flops_report(*, height: int = 1024, width: int = 1024, ref_height: int | None = None,
                 ref_width: int | None = None, text_tokens: int | None = None, neg_text_tokens: int | None = None,
                 steps: int = 50, measure: bool = True) -> dict:  # fmt: skip
    """``specedit flops`` for FLUX.1-Kontext-dev (512 T5 tokens by default; one forward per step, guidance
    distilled), compared with the paper's total at its setting (1024^2 + 1024^2, 512 tokens, 50 steps)."""
    if neg_text_tokens is not None:
        raise ValueError(
            "--neg-text-tokens: FLUX.1-Kontext-dev's baseline has no negative prompt (guidance is distilled)"
        )
    out = flux_kontext_baseline(height, width, ref_height or height, ref_width or width, text_tokens or 512, steps,
                                measure=measure)  # fmt: skip
    setting = (height, width, out["ref_height"], out["ref_width"], out["text_tokens"], steps)
    if setting == (1024, 1024, 1024, 1024, 512, 50):
        out.update(paper_comparison(out["tflops_total"], PAPER_BASELINE_TFLOPS))
    return out
