"""Paper-style benchmarks: FLOPs (planned, full size, no weights) and latency (random weights, any device).

Per method it reports NFE, TFLOPs (every transformer forward incl. the draft and CFG branches, plus the
verifier's VAE work), the FLOPs speedup over the 50-step baseline, the expanded fraction and, with weights,
the median latency of ``method.run`` (draft + verification + all sampling stages; prompt encoding and the
final VAE decode are common to every method and excluded) with a breakdown into transformer forwards, VAE
work and the rest (mixed-resolution bookkeeping: gathers, scatters, ids, masks, expansion, re-noising), and
the ``torch.compile`` graphs built after the warm-up (``recompiles``; a compiled transformer should build none).
Every family is found through ``specedit.families``: its cost model prices the plans, its random-weight
editor is timed.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor

from models.attention import get_backend, resolve
from models.compile import compile_count
from models.work import Forecast
from samplers.mixed_res import sync
from specedit.families import Family, get_family
from specedit.presets import methods

T = 1e12
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def meta_rows(names: list[str], *, family: str | Family, height: int, width: int, expand_fraction: float,
              text_tokens: int | None = None, ref_size: tuple[int, int] | None = None) -> list[dict]:  # fmt: skip
    """FLOPs of each method at full size, priced from its plan (no weights, no run). ``expand_fraction`` is the
    assumed outcome of threshold verifiers; ``ref_size``: the reference's pixel size where it may differ."""
    fam = get_family(family)
    shape = fam.shape(height, width)
    kw = dict(text_tokens=text_tokens, ref_grid=fam.grid(*ref_size) if ref_size else None)
    costs = {True: fam.costs(shape.grid, **kw)}
    table = methods(fam)
    if not all(
        fam.cfg_for(table[n]) for n in names
    ):  # only then is the family's cost model asked for cfg=False
        costs[False] = fam.costs(shape.grid, **kw, cfg=False)
    tflops = lambda m: sum(costs[fam.cfg_for(m)].cost(e) for e in m.plan(shape, expand_fraction).events) / T
    base = tflops(table["baseline-50"])
    rows = []
    for name in names:
        plan = table[name].plan(shape, expand_fraction)
        t = tflops(table[name])
        rows.append({"method": name, "nfe": plan.nfe, "tflops": t, "flops_speedup": base / t, "latency_s": None,
                     "latency_speedup": None, "expanded_fraction": plan.fraction,
                     "cache_mib": cache_bytes(table[name], plan.events, costs[True]) / 2**20})  # fmt: skip
    return rows


def cache_bytes(method, events, costs, itemsize: int = 2) -> float:
    """Peak bytes a method's feature cache holds (0 without one): its policy's feature sets (``held``) times
    the elements of the block stack's streams of the largest cached stage, per CFG branch, in bf16 (2 bytes)."""
    policy = getattr(getattr(method, "sampler", None), "cache", None)
    cached = [e for e in events if isinstance(e, Forecast)]
    if policy is None or not cached:
        return 0.0
    return float(max(policy.held * costs.stream_elements(e) * itemsize for e in cached))


# ----------------------------------------------------------------------------------------------- latency
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
            sync(self._editor.source)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self._editor.source)
            setattr(self, attr, getattr(self, attr) + time.perf_counter() - t0)
            return out

        return run

    def denoiser(self, layout):
        return self._timed(self._editor.denoiser(layout), "forward_s")

    def features(self, latent: Tensor, taps):
        return self._timed(self._editor.features, "vae_s")(latent, taps)

    def decode(self, latent: Tensor):
        return self._timed(self._editor.decode, "vae_s")(latent)


@torch.no_grad()
def _timed_run(method, editor, seed: int) -> tuple[float, float, float, object, int]:
    timed = TimedEditor(editor)
    compiled = compile_count()
    sync(editor.source)
    t0 = time.perf_counter()
    result = method.run(timed, seed)
    sync(editor.source)
    return time.perf_counter() - t0, timed.forward_s, timed.vae_s, result, compile_count() - compiled


def _summary(runs: list[tuple[float, float, float, object, int]]) -> dict:
    """Median run (by wall time) with its forward / VAE / remaining ("overhead") split; ``recompiles``: graphs
    ``torch.compile`` built during the timed runs (all of them; 0 after a sufficient warm-up)."""
    total, fwd, vae, result, _ = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    return {"latency_s": statistics.median(r[0] for r in runs), "forward_s": fwd, "vae_s": vae,
            "overhead_s": total - fwd - vae, "overhead_pct": 100 * (total - fwd - vae) / total,
            "recompiles": sum(r[4] for r in runs), "result": result}  # fmt: skip


@torch.no_grad()
def time_methods(named: dict, editor, *, seed: int = 0, warmup: int = 1, repeats: int = 3) -> dict[str, dict]:
    """Median wall time of ``method.run`` per method on ``editor`` (or ``editor[name]``, a mapping). Runs are
    interleaved round-robin after the warm-ups, so drift of the machine's speed (shared CPUs, clocks) affects
    every method alike."""
    on = lambda name: editor[name] if isinstance(editor, dict) else editor  # noqa: E731
    for name, m in named.items():
        for _ in range(warmup):
            m.run(on(name), seed)
    runs = {name: [] for name in named}
    for _ in range(repeats):
        for name, m in named.items():
            runs[name].append(_timed_run(m, on(name), seed))
    return {name: _summary(r) for name, r in runs.items()}


def latency_rows(names: list[str], editor, *, family: str | Family, expand_fraction: float | None,
                 warmup: int = 1, repeats: int = 3, peak_tflops: float | None = None) -> list[dict]:  # fmt: skip
    """Run every method (and the 50-step baseline) on ``editor`` and report FLOPs and latency; verifiers with a
    data-dependent rule expand ``expand_fraction`` of the cells (a fixed budget) when it is given. Step-distilled
    methods whose weights expect CFG off run on ``editor.without_cfg()``."""
    fam = get_family(family)
    table = methods(fam)
    order = ["baseline-50"] + [n for n in names if n != "baseline-50"]
    budget = lambda m: m if expand_fraction is None else m.with_budget(expand_fraction)
    plain = editor.without_cfg() if hasattr(editor, "without_cfg") else editor
    editors = {n: editor if fam.cfg_for(table[n]) else plain for n in order}
    timings = time_methods({n: budget(table[n]) for n in order}, editors, warmup=warmup, repeats=repeats)
    rows, base = [], None
    for name in order:
        t = dict(timings[name])
        result = t.pop("result")
        tflops = result.flops(editors[name])["total"] / T
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


def attention_used(editor) -> str:
    """The attention backend the editor's transformer runs under the current setting (``models.attention``):
    a masked text stream (padded prompts) hands the mask-less kernels' calls to "sdpa"."""
    masked = any(getattr(editor, n, None) is not None for n in ("txt_mask", "neg_mask"))
    neg = getattr(editor, "neg_txt", None)
    masked = masked or (neg is not None and neg.shape[1] != editor.txt.shape[1])
    return resolve(get_backend(), masked)


def device_peak(device: str, dtype: torch.dtype) -> float | None:
    """Dense bf16 tensor-core peak of known GPUs (None elsewhere)."""
    if not device.startswith("cuda") or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
