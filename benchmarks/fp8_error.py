"""Weight-only fp8 error: transformer outputs on random weights, and whole edits of the toy editor.

    python benchmarks/fp8_error.py [--edits 4] [--steps 50] [--out benchmarks/results/fp8_error.json]

Random weights (``models.init.random_module``: N(0, 0.02) matrices, unit norm scales) at a tiny and a mid
size of FLUX and Qwen-Image, one forward on random inputs: the relative L2 error ``|y - y_ref| / |y_ref|`` of
the transformer output for bf16 against fp32, fp8 (``models.fp8.quantize_fp8``, bf16 activations) against bf16
and fp8 (fp32 activations) against fp32. Toy editor (the shipped weights, ``specedit.toy.evaluate.load_toy``):
held-out suite edits (``eval_cases``) run as a ``steps``-step baseline; PSNR (dB, 8-bit outputs) of the fp8
edit against the fp32 edit, next to bf16 against fp32.

Measured on the CPU (benchmarks/results/fp8_error_2026-12-02.json, 4 edits of 28 steps): fp8 against bf16,
relative output error 1.3 % FLUX mid, 0.86 % Qwen-Image mid (bf16 against fp32: 10.5 %, 4.5 %); toy edits
48.1 dB mean PSNR fp8 against fp32 (43.0 to 55.1), bf16 against fp32 53.5 dB.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from models.flux import FLUX_TINY, Flux
from models.fp8 import quantize_fp8
from models.init import random_module
from models.qwen_image import QWEN_IMAGE_TINY, QwenImage, official_ids

FLUX_MID = replace(FLUX_TINY, in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=128,
                   hidden_size=768, num_heads=6, depth=4, depth_single_blocks=8, axes_dim=(16, 56, 56))  # fmt: skip
QWEN_MID = replace(QWEN_IMAGE_TINY, in_channels=64, out_channels=16, num_layers=8, num_heads=6,
                   head_dim=128, joint_attention_dim=128, axes_dim=(16, 56, 56))  # fmt: skip


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def flux_inputs(cfg, n=256, l=64):
    g = torch.Generator().manual_seed(1)
    side = int(n**0.5)
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1)
    ids = ids.reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(n, 1), ids.float()], 1)
    return dict(img=torch.randn(1, n, cfg.in_channels, generator=g), img_ids=img_ids,
                txt=torch.randn(1, l, cfg.context_in_dim, generator=g), txt_ids=torch.zeros(l, 3),
                timesteps=torch.tensor([0.6]), y=torch.randn(1, cfg.vec_in_dim, generator=g),
                guidance=torch.tensor([2.5]))  # fmt: skip


def qwen_inputs(cfg, side=16, l=64):
    g = torch.Generator().manual_seed(2)
    img_ids, txt_ids = official_ids([(1, side, side)], l)
    return dict(img=torch.randn(1, side * side, cfg.in_channels, generator=g), img_ids=img_ids,
                txt=torch.randn(1, l, cfg.joint_attention_dim, generator=g), txt_ids=txt_ids,
                timesteps=torch.tensor([0.6]))  # fmt: skip


def forward(model, x: dict, dtype: torch.dtype):
    cast = {k: v.to(dtype) if v.is_floating_point() and k != "timesteps" else v for k, v in x.items()}
    return model(**cast)


@torch.no_grad()
def compare(factory, x: dict) -> dict:
    """Relative output errors of one architecture (``factory``) on the inputs ``x``."""
    y32 = forward(random_module(factory), x, torch.float32)
    y16 = forward(random_module(factory, dtype=torch.bfloat16), x, torch.bfloat16)
    fp8_32, fp8_16 = random_module(factory), random_module(factory, dtype=torch.bfloat16)
    quantize_fp8(fp8_32)
    quantize_fp8(fp8_16)
    y8_32, y8_16 = forward(fp8_32, x, torch.float32), forward(fp8_16, x, torch.bfloat16)
    return dict(bf16_vs_fp32=rel(y16, y32), fp8_bf16_vs_bf16=rel(y8_16, y16), fp8_fp32_vs_fp32=rel(y8_32, y32),
                fp8_bf16_vs_fp32=rel(y8_16, y32))  # fmt: skip


def random_weights() -> list[dict]:
    rows = []
    for name, cfg in (("flux-tiny", FLUX_TINY), ("flux-mid", FLUX_MID)):
        rows.append(dict(model=name, **compare(lambda cfg=cfg: Flux(cfg), flux_inputs(cfg))))
        print(json.dumps(rows[-1]), flush=True)
    for name, cfg in (("qwen-tiny", QWEN_IMAGE_TINY), ("qwen-mid", QWEN_MID)):
        rows.append(dict(model=name, **compare(lambda cfg=cfg: QwenImage(cfg), qwen_inputs(cfg))))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def psnr_u8(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@torch.no_grad()
def toy_edits(n: int, steps: int) -> list[dict]:
    from specedit.toy.evaluate import eval_cases, load_toy

    variants = {"fp32": load_toy(), "bf16": load_toy(dtype=torch.bfloat16), "fp8": load_toy()}
    quantize_fp8(variants["fp8"].dit)
    rows = []
    for case in eval_cases(n):
        ex = case.example
        kw = dict(seed=case.seed, steps=steps, output="pil")
        img = {k: np.asarray(t.edit(ex.source, ex.instruction, **kw).image) for k, t in variants.items()}
        rows.append(dict(case=case.index, kind=ex.kind, psnr_fp8_vs_fp32=psnr_u8(img["fp8"], img["fp32"]),
                         psnr_bf16_vs_fp32=psnr_u8(img["bf16"], img["fp32"]),
                         psnr_fp32_vs_target=psnr_u8(img["fp32"], ex.target)))  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()
    result = dict(random_weights=random_weights(), toy=toy_edits(a.edits, a.steps))
    toy = result["toy"]
    result["toy_mean"] = {k: float(np.mean([r[k] for r in toy])) for k in toy[0] if k.startswith("psnr")}
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result["toy_mean"]))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
