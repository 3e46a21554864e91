"""Paper-style benchmarks: FLOPs (on the meta device, no weights) and latency (random weights, any device).

Per method it reports NFE, TFLOPs (every transformer forward incl. the draft and CFG branches, plus the
verifier's VAE work), the FLOPs speedup over the 50-step baseline, the expanded fraction and, with weights,
the median latency of ``method.run`` (draft + verification + all sampling stages; prompt encoding and the
final VAE decode are common to every method and excluded) with a breakdown into transformer forwards, VAE
work and the rest (mixed-resolution bookkeeping: gathers, scatters, ids, masks, expansion, re-noising).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from models import flux, flux_ae
from models.loading import build_on_meta
from models.packing import grid_of
from specedit.kontext.editor import KontextCosts, KontextEditor
from specedit.method import Baseline, SpecEdit
from specedit.presets import methods
from verify.verifiers import CannyVerifier, FeatureVerifier, FixedVerifier, VarianceVerifier

T = 1e12


@dataclass(frozen=True)
class BenchConfig:
    """A model size to benchmark: transformer and AE configs and the text length."""

    model: flux.FluxConfig
    ae: flux_ae.FluxAEConfig
    text_tokens: int


FLUX_CONFIGS = {
    "full": BenchConfig(flux.FLUX_KONTEXT_DEV, flux_ae.FLUX_AE, 512),
    # the CPU size: d = 512 with 4 + 8 blocks, a quarter-width AE, small text features
    "mid": BenchConfig(
        replace(flux.FLUX_KONTEXT_DEV, hidden_size=512, num_heads=8, axes_dim=(8, 28, 28), depth=4,
                depth_single_blocks=8, context_in_dim=256, vec_in_dim=64),
        replace(flux_ae.FLUX_AE, ch=32),
        32,
    ),
    "tiny": BenchConfig(replace(flux.FLUX_TINY, in_channels=64, out_channels=64),
                        replace(flux_ae.FLUX_AE_TINY, z_channels=16), 8),
}  # fmt: skip


def budgeted(method, fraction: float | None):
    """The method with its feature verifier expanding a fixed ``fraction`` of coarse cells (top scores)."""
    if (
        fraction is None
        or not isinstance(method, SpecEdit)
        or not isinstance(method.verifier, FeatureVerifier)
    ):
        return method
    if not method.verifier.semantic:
        return method
    return replace(method, verifier=replace(method.verifier, budget=fraction))


def planned_fraction(method, fraction: float, grid: tuple[int, int]) -> float | None:
    """The expanded fraction a method would realise given ``fraction`` for budgeted verifiers."""
    if isinstance(method, Baseline):
        return None
    v = method.verifier
    hc, wc = grid[0] // 2, grid[1] // 2
    if isinstance(v, FeatureVerifier):
        if not v.semantic:
            k = v.uniform or 1
            return ((hc + k - 1) // k) * ((wc + k - 1) // k) / (hc * wc)
        return fraction
    if isinstance(v, CannyVerifier):
        return int(hc * wc * v.up_ratio) / (hc * wc)
    if isinstance(v, VarianceVerifier):
        return int(hc * wc * v.fraction) / (hc * wc)
    if isinstance(v, FixedVerifier):
        return float(v.expand)
    return fraction


def meta_costs(family: str, grid: tuple[int, int], text_tokens: int | None = None, ref_grid=None):
    """Full-size cost model of a family: FLUX.1-Kontext-dev (512 T5 tokens) or Qwen-Image-Edit (true CFG, 1400
    text tokens per branch incl. the VL image tokens, one reference of the target's size)."""
    if family == "flux":
        cfg = FLUX_CONFIGS["full"]
        return KontextCosts(cfg.model, cfg.ae, text_tokens or cfg.text_tokens, grid)
    if family == "qwen":
        from models import qwen_image, qwen_image_vae
        from specedit.qwen.editor import QwenCosts

        n = text_tokens or 1400
        return QwenCosts(
            qwen_image.QWEN_IMAGE_EDIT, qwen_image_vae.QWEN_IMAGE_VAE, n, n, grid, (ref_grid or grid,)
        )
    raise ValueError(f"unknown family {family!r}")


def meta_rows(names: list[str], *, height: int, width: int, expand_fraction: float, family: str = "flux",
              text_tokens: int | None = None, ref_size: tuple[int, int] | None = None) -> list[dict]:  # fmt: skip
    """FLOPs of each method at full size, counted from its plan (no weights, no run). ``ref_size`` (Qwen only):
    the reference's pixel size when it differs from the target's."""
    grid = grid_of(height, width)
    costs = meta_costs(family, grid, text_tokens, grid_of(*ref_size) if ref_size else None)
    table = methods(family)
    rows = []
    base = _plan_tflops(table["baseline-50"], grid, 0, costs)
    for name in names:
        m = table[name]
        frac = planned_fraction(m, expand_fraction, grid)
        n_exp = round((frac or 0.0) * (grid[0] // 2) * (grid[1] // 2))
        events = m.events(grid, n_exp)
        tflops = _plan_tflops(m, grid, n_exp, costs)
        nfe = sum(1 for e in events if e["kind"] == "forward" and e["stage"] != "draft")
        rows.append({"method": name, "nfe": nfe, "tflops": tflops, "flops_speedup": base / tflops,
                     "latency_s": None, "latency_speedup": None, "expanded_fraction": frac})  # fmt: skip
    return rows


def _plan_tflops(method, grid, n_exp: int, costs) -> float:
    return sum(costs.cost(e) for e in method.events(grid, n_exp)) / T


# ----------------------------------------------------------------------------------------------- latency
def random_editor(config: BenchConfig, height: int, width: int, *, device="cpu", dtype=torch.float32,
                  seed: int = 0) -> KontextEditor:  # fmt: skip
    """A Kontext editor with random weights (std 0.02, norm scales 1) and random conditioning."""
    model = _materialize(build_on_meta(lambda: flux.Flux(config.model)), device, dtype, seed)
    ae = _materialize(build_on_meta(lambda: flux_ae.AutoEncoder(config.ae)), device, dtype, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    f = config.ae.factor
    rand = lambda *shape: torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    source = rand(1, config.ae.z_channels, height // f, width // f)
    return KontextEditor(model, ae, rand(1, config.text_tokens, config.model.context_in_dim),
                         rand(1, config.model.vec_in_dim), source)  # fmt: skip


@torch.no_grad()
def _materialize(module: torch.nn.Module, device, dtype, seed: int) -> torch.nn.Module:
    module = module.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, 0.02, generator=g)
        elif name.endswith(("scale", "norm.weight", "norm1.weight", "norm2.weight", "norm_out.weight")):
            p.fill_(1.0)
        else:
            p.zero_()
    return module.eval()


class TimedEditor:
    """Proxy of an editor that times its transformer forwards and its VAE work (device-synchronised)."""

    def __init__(self, editor):
        self._editor = editor
        self.forward_s = 0.0
        self.vae_s = 0.0

    def __getattr__(self, name):
        return getattr(self._editor, name)

    def _timed(self, fn, attr: str):
        def run(*args, **kwargs):
            _sync(self._editor.source)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(self._editor.source)
            setattr(self, attr, getattr(self, attr) + time.perf_counter() - t0)
            return out

        return run

    def denoiser(self, layout):
        return self._timed(self._editor.denoiser(layout), "forward_s")

    def features(self, latent: Tensor, taps):
        return self._timed(self._editor.features, "vae_s")(latent, taps)

    def decode(self, latent: Tensor):
        return self._timed(self._editor.decode, "vae_s")(latent)


def _sync(x: Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


@torch.no_grad()
def _timed_run(method, editor, seed: int) -> tuple[float, float, float, object]:
    timed = TimedEditor(editor)
    _sync(editor.source)
    t0 = time.perf_counter()
    result = method.run(timed, seed)
    _sync(editor.source)
    return time.perf_counter() - t0, timed.forward_s, timed.vae_s, result


def _summary(runs: list[tuple[float, float, float, object]]) -> dict:
    """Median run (by wall time) with its forward / VAE / remaining ("overhead") split."""
    total, fwd, vae, result = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    return {"latency_s": statistics.median(r[0] for r in runs), "forward_s": fwd, "vae_s": vae,
            "overhead_s": total - fwd - vae, "overhead_pct": 100 * (total - fwd - vae) / total,
            "result": result}  # fmt: skip


@torch.no_grad()
def time_methods(named: dict, editor, *, seed: int = 0, warmup: int = 1, repeats: int = 3) -> dict[str, dict]:
    """Median wall time of ``method.run`` per method. Runs are interleaved round-robin after the warm-ups,
    so drift of the machine's speed (shared CPUs, clocks) affects every method alike."""
    for m in named.values():
        for _ in range(warmup):
            m.run(editor, seed)
    runs = {name: [] for name in named}
    for _ in range(repeats):
        for name, m in named.items():
            runs[name].append(_timed_run(m, editor, seed))
    return {name: _summary(r) for name, r in runs.items()}


def latency_rows(names: list[str], editor: KontextEditor, *, expand_fraction: float | None, family: str = "flux",
                 warmup: int = 1, repeats: int = 3, peak_tflops: float | None = None) -> list[dict]:  # fmt: skip
    """Run every method (and the 50-step baseline) on ``editor`` and report FLOPs and latency."""
    table = methods(family)
    order = ["baseline-50"] + [n for n in names if n != "baseline-50"]
    timings = time_methods({n: budgeted(table[n], expand_fraction) for n in order}, editor, warmup=warmup,
                           repeats=repeats)  # fmt: skip
    rows, base = [], None
    for name in order:
        t = dict(timings[name])
        result = t.pop("result")
        tflops = result.flops(editor)["total"] / T
        frac = None if result.verdict is None else result.verdict.fraction
        row = {"method": name, "nfe": result.nfe, "tflops": tflops, "latency_s": t["latency_s"],
               "expanded_fraction": frac, **{k: v for k, v in t.items() if k != "latency_s"},
               "stage_s": {k: round(v, 4) for k, v in result.seconds.items()}}  # fmt: skip
        if name == "baseline-50":
            base = row
            if peak_tflops:
                row["mfu"] = tflops / t["forward_s"] / peak_tflops
        row["flops_speedup"] = base["tflops"] / tflops
        row["latency_speedup"] = base["latency_s"] / t["latency_s"]
        if name in names:
            rows.append(row)
    return rows


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def device_peak(device: str, dtype: torch.dtype) -> float | None:
    """Dense bf16 tensor-core peak of known GPUs (None elsewhere)."""
    if not device.startswith("cuda") or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
