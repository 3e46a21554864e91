"""Demo and evaluation of the toy editor: every method on held-out synthetic edits with ground truth.

Per (method, example) a *record* holds the cost (NFE, TFLOPs from the recorded events, wall time of
``method.run``), the fidelity to the 50-step baseline's output (PSNR / SSIM on the whole image, inside and
outside the true edit mask), the distance to the ground-truth edit, and, for methods with a verifier, how
the verified set T_edit (``verdict.edit``, before the uniform union) matches the true edit region at
coarse-cell granularity (IoU, precision, recall) and the expanded fraction of T_exp (``verdict.mask``).
``aggregate`` turns records into one row per method: means, speedups over the baseline, and the verifier
scores split into local edits (IoU, precision, recall) and global edits (expanded fraction).

Held-out seeds: the demo uses fixed seeds >= 5_000_000, the eval suite 6_000_000 + offset + i (even seeds
local edits, odd seeds global ones); the training set uses seeds below 1_000_000 per training seed.

Under ``torchrun`` (RANK / WORLD_SIZE set) ``evaluate_suite`` shards the examples across ranks (example i
on rank i mod world), and rank 0 gathers and merges the records (``torch.distributed``, gloo on the CPU,
nccl on GPUs).

Long evaluations resume: with ``out``, ``evaluate_suite`` appends each example's records to
``out/examples.jsonl`` as soon as it finishes (rank 0 writes; each line flushed and fsynced) and skips the
(method, seed) pairs already there, so a killed run continues when rerun into the same folder. Every other
file (metrics.jsonl, the plot, the demo's panels and report.json) is written atomically.

Shape legend: b batch (1 here), H W pixels (128), hc wc coarse cells (8 x 8 = 16 px each).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from models.lora import fuse_lora, unfuse_lora
from samplers.mixed_res import FullResSampler, sync
from specedit.evals.runner import Dist, Log, Ranks, RecordStore, clean, open_store, run_rounds
from specedit.families import get_family
from specedit.method import Baseline
from specedit.presets import methods
from specedit.toy import atomic, metrics, validity
from specedit.toy.data import ALL_EDITS, GLOBAL_EDITS, LOCAL_EDITS, STOCHASTIC_EDITS, Example, make_example
from specedit.toy.model import WEIGHTS, ToyEditor, images_to_tensor
from specedit.viz import mask_overlay


def all_methods() -> dict:
    """The named methods with the toy editor's calibration (``specedit.presets`` family "toy"), and the base
    model's ``steps-N`` at each distilled step count N (what ``distilled-N`` is compared with) where the presets
    lack it."""
    table = methods("toy")
    distilled = get_family("toy").distilled
    for n in distilled.steps if distilled else ():
        table.setdefault(f"steps-{n}", Baseline(FullResSampler(n)))
    return table


BASELINE = "baseline-50"
DISTILL_LORA = "distill_lora.safetensors"  # the distilled LoRA's file name in a toy editor folder
# held-out demo edits (add, background, recolour, darker, move, background): local and global alternate
DEMO_SEEDS = (5_000_002, 5_000_001, 5_000_017, 5_000_008, 5_000_009, 5_000_013)
DEMO_METHODS = ("specedit-18", "specedit-9")
EVAL_FIRST_SEED = 6_000_000
STOCHASTIC_FIRST_SEED = 8_000_000
SUITES = {"toy": EVAL_FIRST_SEED, "toy-stochastic": STOCHASTIC_FIRST_SEED}  # suite -> its first seed
ABLATION_METHODS = (
    "specedit-18", "specedit-18-tau0.4", "specedit-18-tau0.9", "specedit-18-ndraft4", "specedit-18-k2",
    "specedit-18-k4", "specedit-18-draft6", "specedit-18-draft8", "specedit-18-z1", "nodraft-18", "semantic-18",
    "uniform-18", "specedit-18-reuse",
)  # fmt: skip
BASELINE_METHODS = (
    "steps-30", "steps-18", "steps-9", "ralu-4x", "ralu-7x", "fresco-30", "fresco-18", "bottleneck-30",
    "bottleneck-18", "specedit-30", "specedit-18", "specedit-11", "specedit-9",
)  # fmt: skip
EVAL_METHODS = (
    "baseline-50", "steps-30", "steps-18", "steps-9", "ralu-4x", "ralu-7x", "fresco-30", "fresco-18",
    "uniform-18", "semantic-18", "specedit-30", "specedit-18", "specedit-11", "specedit-9",
    "specedit-18-tau0.4", "specedit-18-tau0.9", "specedit-18-ndraft4", "specedit-18-k2", "specedit-18-k4",
    "specedit-18-draft6", "specedit-18-draft8", "specedit-18-z1", "nodraft-18", "specedit-18-reuse",
    "bottleneck-18",
)  # fmt: skip
T = 1e12


# ----------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Case:
    """One held-out example: its position in the suite, its seed (also the noise seed) and the data."""

    index: int
    seed: int
    example: Example = field(repr=False)

    @property
    def scope(self) -> str:
        kind = self.example.kind
        return "global" if kind in GLOBAL_EDITS else "stochastic" if kind in STOCHASTIC_EDITS else "local"


def demo_cases(n: int = 4) -> list[Case]:
    """The first ``n`` demo examples (fixed held-out seeds, local and global edits alternating)."""
    if not 1 <= n <= len(DEMO_SEEDS):
        raise ValueError(
            f"the demo has {len(DEMO_SEEDS)} examples; n must be in 1..{len(DEMO_SEEDS)}, got {n}"
        )
    return [Case(i, s, make_example(s)) for i, s in enumerate(DEMO_SEEDS[:n])]


def eval_cases(
    n: int, offset: int = 0, *, indices: Iterable[int] | None = None, suite: str = "toy"
) -> list[Case]:
    """Suite examples ``indices`` (default all ``n``). "toy": seed 6_000_000 + offset + i, a local edit for even
    seeds and a global one for odd seeds; "toy-stochastic": seed 8_000_000 + offset + i, the stochastic kinds in
    turn (add-somewhere, pattern, scatter)."""
    if suite not in SUITES:
        raise ValueError(f"unknown toy suite {suite!r}; choose from {', '.join(SUITES)}")
    if n < 1 or offset < 0:
        raise ValueError(f"need n >= 1 and offset >= 0, got n={n}, offset={offset}")
    out = []
    for i in range(n) if indices is None else indices:
        seed = SUITES[suite] + offset + i
        if suite == "toy":
            kinds = GLOBAL_EDITS if seed % 2 else LOCAL_EDITS
        else:
            kinds = (STOCHASTIC_EDITS[(offset + i) % len(STOCHASTIC_EDITS)],)
        out.append(Case(i, seed, make_example(seed, kinds=kinds)))
    return out


def parse_methods(names: str | Sequence[str], *, reference: str = BASELINE) -> list[str]:
    """Method names (a comma-separated string or a list), checked, with ``reference`` first, no duplicates."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    table = all_methods()
    unknown = [n for n in [reference, *names] if n not in table]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(table)}")
    return list(dict.fromkeys([reference, *names]))


def resolve(methods: str | Sequence[str] | Mapping[str, object], *, reference: str = BASELINE) -> dict:
    """{name: method} with ``reference`` first: names are looked up in ``specedit.presets.methods()``; a
    mapping may also hold custom configurations (e.g. a ``dataclasses.replace`` of a preset)."""
    if isinstance(methods, Mapping):
        table = all_methods()
        if reference not in methods and reference not in table:
            raise ValueError(f"unknown reference method {reference!r}")
        return {reference: methods.get(reference, table.get(reference)), **methods}
    table = all_methods()
    return {n: table[n] for n in parse_methods(methods, reference=reference)}


def load_toy(weights: str | os.PathLike | None = None, *, device="cpu", dtype=torch.float32) -> ToyEditor:
    """The toy editor from ``weights`` (default: the shipped ``specedit/toy/weights``)."""
    path = Path(weights) if weights is not None else WEIGHTS
    if not (path / "config.json").is_file():
        hint = "the shipped weights are not there yet" if weights is None else "not a toy editor folder"
        raise FileNotFoundError(
            f"no toy editor weights in {path} ({hint}): pass --weights DIR (a folder written by "
            "`specedit train-toy`, e.g. runs/toy/weights)"
        )
    return ToyEditor.load(path, device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------- running
def to_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) or (1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    image = image[0] if image.ndim == 4 else image
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


@dataclass
class Outcome:
    """One method's edit of one case: the image (1, 3, H, W) in [-1, 1], the result, its wall time and, for a
    one-stage sampler, the curvature of its path (:func:`curvature`)."""

    image: Tensor
    result: object
    latency_s: float
    curvature: float | None = None


def curvature(steps: Sequence[dict]) -> float | None:
    """How far a sampled path is from a straight line: the sigma-weighted variance of the step velocities about
    their mean (the chord's velocity, (x_end - x_start) / (sigma_end - sigma_start)), over the chord velocity's
    squared norm. 0 for a straight rectified flow (one constant velocity), which one Euler step integrates
    exactly; larger where the velocity turns as the sample commits to one of several outcomes. ``steps``: the
    sampler's callback infos (sigma, sigma_next, v); None unless every step is of one stage and shape."""
    if not steps or len({(s.get("stage"), tuple(s["v"].shape)) for s in steps}) != 1:
        return None
    w = torch.tensor([float(s["sigma"] - s["sigma_next"]) for s in steps], dtype=torch.float64)
    v = torch.stack([s["v"].double() for s in steps])  # (steps, b, n, c)
    w = (w / w.sum()).view(-1, *[1] * (v.ndim - 1))
    chord = (w * v).sum(0)
    spread = (w * (v - chord) ** 2).sum(0).sum()
    return float(spread / chord.pow(2).sum())


def weights_of(method) -> str:
    """The weights a method runs on: "distilled" (the editor with the distilled LoRA fused) or "base"."""
    return getattr(method, "weights", "base")


def default_lora(weights: str | os.PathLike | None = None) -> Path:
    """The distilled LoRA of a toy editor folder (default: the shipped one), whether or not it exists."""
    return (Path(weights) if weights is not None else WEIGHTS) / DISTILL_LORA


def check_lora(named: Mapping[str, object], lora: str | os.PathLike | None) -> None:
    """One-line error when a method of ``named`` needs the distilled weights and ``lora`` is not a file."""
    needing = [n for n, m in named.items() if weights_of(m) == "distilled"]
    if needing and (lora is None or not Path(lora).is_file()):
        raise FileNotFoundError(f"{needing[0]} runs on the distilled weights: no distilled LoRA at {lora} "
                                "(train one: specedit train-toy --distill; pass it with --lora)")  # fmt: skip


@torch.no_grad()
def run_case(toy: ToyEditor, case: Case, named: Mapping[str, object], *, warmup: bool = False,
             log: Log = None, lora: str | os.PathLike | None = None) -> tuple[dict[str, Outcome], object]:  # fmt: skip
    """Edit ``case`` with every method of ``named`` ({name: method}); each ``method.run`` is timed
    (device-synchronised). Methods whose ``weights`` is "distilled" run after the others with ``lora`` fused
    into the transformer (``models.lora.fuse_lora``), which is restored bit for bit afterwards. Returns the
    outcomes (in ``named``'s order) and the editor adapter (for costs)."""
    check_lora(named, lora)
    ed = toy.editor([case.example.source], case.example.instruction)
    if warmup:  # first-call allocations and kernel selection out of the timed runs
        all_methods()["steps-9"].run(ed, case.seed)
    out = {}
    for weights in ("base", "distilled"):
        group = {n: m for n, m in named.items() if weights_of(m) == weights}
        if not group:
            continue
        if weights == "distilled":
            fuse_lora(toy.dit, lora)
        try:
            out.update(_run_group(ed, case, group, log))
        finally:
            if weights == "distilled":
                unfuse_lora(toy.dit)
    return {n: out[n] for n in named}, ed


def _run_group(ed, case: Case, named: Mapping[str, object], log: Log) -> dict[str, Outcome]:
    out = {}
    for name, method in named.items():
        steps = []
        sync(ed.source)
        t0 = time.perf_counter()
        result = method.run(ed, case.seed, callback=steps.append)
        sync(ed.source)
        seconds = time.perf_counter() - t0
        out[name] = Outcome(ed.decode(result.latent).clamp(-1, 1), result, seconds, curvature(steps))
        if log:
            log(f"example {case.index} (seed {case.seed}) {name}: {seconds:.2f} s")
    return out


def _f(x: Tensor) -> float:
    return float(x.reshape(-1)[0])


def score(
    case: Case, outcome: Outcome, reference: Tensor, editor, *, method: str, weights: str = "base"
) -> dict:
    """The record of one (method, case): costs, fidelity to ``reference``, ground truth, verifier quality."""
    ex = case.example
    img, gt = outcome.image.float().cpu(), images_to_tensor([ex.target])
    ref = reference.float().cpu()
    edit = torch.from_numpy(ex.mask)[None]
    keep = ~edit
    result = outcome.result
    rec = {
        "method": method, "weights": weights, "index": case.index, "seed": case.seed, "kind": ex.kind,
        "scope": case.scope,
        "instruction": ex.instruction, "nfe": result.nfe, "tflops": result.flops(editor)["total"] / T,
        "latency_s": outcome.latency_s,
        "psnr_ref": _f(metrics.psnr(img, ref)), "psnr_ref_edit": _f(metrics.psnr(img, ref, edit)),
        "psnr_ref_keep": _f(metrics.psnr(img, ref, keep)), "ssim_ref": _f(metrics.ssim(img, ref)),
        "ssim_ref_edit": _f(metrics.ssim(img, ref, edit)), "ssim_ref_keep": _f(metrics.ssim(img, ref, keep)),
        "psnr_gt": _f(metrics.psnr(img, gt)), "psnr_gt_edit": _f(metrics.psnr(img, gt, edit)),
    }  # fmt: skip
    if outcome.curvature is not None:
        rec["curvature"] = outcome.curvature
    if ex.request is not None:  # a stochastic edit: is the output one of its valid outcomes?
        check = validity.check(ex, to_uint8(img))
        rec.update({"valid": float(check["valid"]), "valid_object": float(check["object"]),
                    "valid_preserved": float(check["preserved"]), "found": float(check["found"]),
                    "preserved_psnr": check["preserved_psnr"]})  # fmt: skip
    verdict = result.verdict
    if verdict is not None:
        pred = verdict.edit if verdict.edit is not None else verdict.mask
        pred = pred.cpu()
        true = metrics.coarse_mask(edit, tuple(pred.shape[-2:]))
        rec.update({
            "expanded_fraction": float(verdict.mask.float().mean()), "edit_fraction": float(pred.float().mean()),
            "true_fraction": float(true.float().mean()), "iou": _f(metrics.iou(pred, true)),
            "precision": _f(metrics.precision(pred, true)), "recall": _f(metrics.recall(pred, true)),
        })  # fmt: skip
    return rec


def evaluate_case(toy: ToyEditor, case: Case, named: Mapping[str, object], *, reference: str = BASELINE,
                  warmup: bool = False, log: Log = None, skip: Iterable[tuple[str, int]] = (),
                  lora: str | os.PathLike | None = None) -> tuple[list[dict], dict[str, Outcome]]:  # fmt: skip
    """Records of ``case`` for the methods of ``named`` ({name: method}, ``reference`` among them) whose
    (method, seed) is not in ``skip``, and the outcomes. The reference runs whenever another method does: the
    others are scored against its output."""
    skip = set(skip)
    todo = [m for m in named if (m, case.seed) not in skip]
    if not todo:
        return [], {}
    outcomes, ed = run_case(toy, case, {reference: named[reference], **{m: named[m] for m in todo}},
                            warmup=warmup, log=log, lora=lora)  # fmt: skip
    ref = outcomes[reference].image
    return [score(case, outcomes[m], ref, ed, method=m, weights=weights_of(named[m])) for m in todo], outcomes


def evaluate(toy: ToyEditor, cases: Sequence[Case], methods, *, reference: str = BASELINE, log: Log = None,
             keep: bool = False, lora: str | os.PathLike | None = None) -> tuple[list[dict], dict]:  # fmt: skip
    """Records of every (method, case) for ``methods`` (names or {name: method}, see :func:`resolve`; the
    ``reference`` is added first); with ``keep`` also the outcomes per case index (for panels)."""
    named = resolve(methods, reference=reference)
    check_lora(named, lora)
    records, kept = [], {}
    for j, case in enumerate(cases):
        recs, outcomes = evaluate_case(
            toy, case, named, reference=reference, warmup=j == 0, log=log, lora=lora
        )
        records += recs
        if keep:
            kept[case.index] = outcomes
    return records, kept


# ----------------------------------------------------------------------------------------------- aggregation
def _mean(values: Iterable) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


FIDELITY = ("psnr_ref", "psnr_ref_edit", "psnr_ref_keep", "ssim_ref", "ssim_ref_edit", "ssim_ref_keep",
            "psnr_gt", "psnr_gt_edit")  # fmt: skip
OPTIONAL = ("curvature", "valid", "valid_object", "valid_preserved")  # means over the records that have them


def aggregate(records: Sequence[dict], *, reference: str = BASELINE) -> list[dict]:
    """One row per method (in record order): means over examples, speedups over ``reference``, and the
    verifier's IoU / precision / recall on local edits and expanded fraction on global ones.
    Means skip undefined values (an empty region, a self-comparison's infinite PSNR)."""
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["method"], []).append(r)
    if reference not in by:
        raise ValueError(f"the records hold no {reference!r} runs (the speedups' reference)")
    rows = []
    for name, rs in by.items():
        local = [r for r in rs if r["scope"] == "local"]
        glob = [r for r in rs if r["scope"] == "global"]
        row = {"method": name, "weights": rs[0].get("weights", "base"), "n": len(rs), "n_local": len(local),
               "n_global": len(glob),
               "nfe": _mean(r["nfe"] for r in rs), "tflops": _mean(r["tflops"] for r in rs),
               "latency_s": _mean(r["latency_s"] for r in rs)}  # fmt: skip
        row.update({k: _mean(r[k] for r in rs) for k in FIDELITY})
        row.update({k: _mean(r[k] for r in rs if k in r) for k in OPTIONAL if any(k in r for r in rs)})
        if "iou" in rs[0]:
            row.update({f"{k}_local": _mean(r[k] for r in local) for k in ("iou", "precision", "recall")})
            row["expanded_fraction_local"] = _mean(r["expanded_fraction"] for r in local)
            row["expanded_fraction_global"] = _mean(r["expanded_fraction"] for r in glob)
            row["expanded_fraction"] = _mean(r["expanded_fraction"] for r in rs)
            row["iou"] = _mean(r["iou"] for r in rs)
        rows.append(row)
    base = next(r for r in rows if r["method"] == reference)
    for row in rows:
        row["flops_speedup"] = base["tflops"] / row["tflops"]
        row["latency_speedup"] = base["latency_s"] / row["latency_s"]
    return rows


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """``rows`` (made JSON-safe by :func:`clean`) as JSON lines, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_jsonl(path, (clean(r) for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _fmt(v, spec: str, width: int) -> str:
    return ("-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)).rjust(
        width
    )


DEMO_COLUMNS = (
    ("NFE", "nfe", ".0f", 4), ("TFLOPs", "tflops", ".4f", 8), ("lat s", "latency_s", ".2f", 7),
    ("x lat", "latency_speedup", ".2f", 6), ("x FLOPs", "flops_speedup", ".2f", 7),
    ("PSNR", "psnr_ref", ".2f", 6), ("in", "psnr_ref_edit", ".2f", 6), ("out", "psnr_ref_keep", ".2f", 6),
    ("SSIM", "ssim_ref", ".3f", 6), ("in", "ssim_ref_edit", ".3f", 6), ("out", "ssim_ref_keep", ".3f", 6),
    ("PSNR gt", "psnr_gt", ".2f", 7), ("IoU", "iou", ".3f", 6), ("exp", "expanded_fraction", ".3f", 6),
)  # fmt: skip
EVAL_COLUMNS = (
    ("NFE", "nfe", ".0f", 4), ("TFLOPs", "tflops", ".4f", 8), ("x FLOPs", "flops_speedup", ".2f", 7),
    ("lat s", "latency_s", ".2f", 7), ("x lat", "latency_speedup", ".2f", 6),
    ("PSNR", "psnr_ref", ".2f", 6), ("edit", "psnr_ref_edit", ".2f", 6), ("keep", "psnr_ref_keep", ".2f", 6),
    ("SSIM", "ssim_ref", ".3f", 6), ("edit", "ssim_ref_edit", ".3f", 6), ("keep", "ssim_ref_keep", ".3f", 6),
    ("gt", "psnr_gt", ".2f", 6), ("gt ed", "psnr_gt_edit", ".2f", 6), ("IoU L", "iou_local", ".3f", 6),
    ("P L", "precision_local", ".3f", 6), ("R L", "recall_local", ".3f", 6),
    ("exp G", "expanded_fraction_global", ".3f", 6), ("curv", "curvature", ".4f", 7),
)  # fmt: skip
STOCHASTIC_COLUMNS = (
    ("NFE", "nfe", ".0f", 4), ("TFLOPs", "tflops", ".4f", 8), ("x FLOPs", "flops_speedup", ".2f", 7),
    ("lat s", "latency_s", ".2f", 7), ("x lat", "latency_speedup", ".2f", 6),
    ("PSNR", "psnr_ref", ".2f", 6), ("edit", "psnr_ref_edit", ".2f", 6), ("keep", "psnr_ref_keep", ".2f", 6),
    ("valid", "valid", ".3f", 6), ("object", "valid_object", ".3f", 6), ("kept", "valid_preserved", ".3f", 6),
    ("draw", "psnr_gt", ".2f", 6), ("exp", "expanded_fraction", ".3f", 6), ("curv", "curvature", ".4f", 7),
)  # fmt: skip


def format_table(rows: Sequence[dict], columns=EVAL_COLUMNS, *, title: str = "") -> str:
    """A fixed-width table of aggregated rows ("-": undefined, e.g. a method's fidelity to itself)."""
    width = max([22, *(len(r["method"]) + 1 for r in rows)])
    head = "method".ljust(width) + " ".join(c[0].rjust(c[3]) for c in columns)
    lines = [title] if title else []
    lines.append(head)
    for r in rows:
        lines.append(r["method"].ljust(width) + " ".join(_fmt(r.get(k), s, w) for _, k, s, w in columns))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- panels
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _text_tile(text: str, size: tuple[int, int], *, font_size: int = 15, chars: int = 24) -> Image.Image:
    tile = Image.new("RGB", size, (255, 255, 255))
    wrapped = "\n".join(textwrap.fill(para, chars) for para in text.split("\n"))
    ImageDraw.Draw(tile).multiline_text((8, 8), wrapped, fill=(0, 0, 0), font=_font(font_size), spacing=4)
    return tile


def token_overlay(image: Image.Image, verdict) -> Image.Image:
    """``image`` with T_edit (the verified cells) in red and the rest of T_exp (the uniform grid) in blue."""
    edit = verdict.edit if verdict.edit is not None else verdict.mask
    rest = verdict.mask & ~edit
    return mask_overlay(mask_overlay(image, rest[:1].cpu(), color=(40, 90, 255)), edit[:1].cpu())


def panel(case: Case, outcomes: dict[str, Outcome], *, reference: str = BASELINE, scale: int = 2,
          notes: dict[str, str] | None = None) -> Image.Image:  # fmt: skip
    """input | instruction | reference | (method, its verified tokens over the input)... | ground truth, each
    tile ``scale`` times enlarged under a label and an optional note (``notes`` by method name)."""
    ex = case.example
    big = lambda a: Image.fromarray(a).resize(
        (a.shape[1] * scale, a.shape[0] * scale), Image.Resampling.NEAREST
    )
    src = big(ex.source)
    text = _text_tile(f"{ex.instruction}\n\n({ex.kind}, seed {case.seed})", src.size)
    tiles = [
        ("input", src, ""),
        ("instruction", text, ""),
        (reference, big(to_uint8(outcomes[reference].image)), ""),
    ]
    for name, o in outcomes.items():
        if name == reference:
            continue
        tiles.append((name, big(to_uint8(o.image)), (notes or {}).get(name, "")))
        if o.result.verdict is not None:
            tiles.append(
                (f"{name} tokens", token_overlay(src, o.result.verdict), "red: verified, blue: grid")
            )
    tiles.append(("ground truth", big(ex.target), ""))
    (w, h), head, pad = src.size, 40, 4
    sheet = Image.new("RGB", (len(tiles) * (w + pad) + pad, h + head + pad), (255, 255, 255))
    draw, font = ImageDraw.Draw(sheet), _font(13)
    for i, (label, tile, note) in enumerate(tiles):
        x = pad + i * (w + pad)
        sheet.paste(tile, (x, head))
        draw.text((x + 2, 4), label, fill=(0, 0, 0), font=font)
        draw.text((x + 2, 21), note, fill=(90, 90, 90), font=font)
    return sheet


# ----------------------------------------------------------------------------------------------- demo
def demo(toy: ToyEditor, out: str | os.PathLike, *, methods=DEMO_METHODS, n: int = 4, log: Log = None,
         lora: str | os.PathLike | None = None) -> dict:  # fmt: skip
    """Edit the demo examples with the baseline and ``methods`` (names or {name: method}); write one panel per
    example and report.json (atomically), and delete the panels of an earlier demo in ``out`` that this one did
    not write; no other file in ``out`` is touched. Returns the report (aggregated rows under "methods",
    per-example records under "records", the panels' paths under "examples")."""
    out = atomic.check_folder(out)
    cases = demo_cases(n)
    out.mkdir(parents=True, exist_ok=True)
    atomic.clean_stale(out, _demo_owns)
    t0 = time.perf_counter()
    records, kept = evaluate(toy, cases, methods, log=log, keep=True, lora=lora)
    rows = aggregate(records)
    examples = []
    for case in cases:
        recs = {r["method"]: r for r in records if r["index"] == case.index}
        notes = {
            m: f"{r['psnr_ref']:.1f} dB, {r['tflops'] * 1e3:.1f} GF" for m, r in recs.items() if m != BASELINE
        }
        path = out / f"panel_{case.index}_{case.example.kind}.png"
        atomic.save_image(panel(case, kept[case.index], notes=notes), path)
        examples.append({"index": case.index, "seed": case.seed, "kind": case.example.kind, "scope": case.scope,
                         "instruction": case.example.instruction, "panel": str(path)})  # fmt: skip
    report = {
        "methods": rows, "examples": examples, "records": records, "reference": BASELINE,
        "device": str(toy.device), "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    atomic.write_json(out / "report.json", clean(report))
    _remove_stale_panels(out, {Path(e["panel"]).name for e in examples})
    return report


PANEL = re.compile(rf"panel_\d+_({'|'.join(ALL_EDITS)})\.png")


def _demo_owns(name: str) -> bool:
    """Whether a file name is one the demo writes (its panels and report.json); it touches no other file."""
    return name == "report.json" or PANEL.fullmatch(name) is not None


def _remove_stale_panels(out: Path, keep: set[str]) -> None:
    """Delete the panels of an earlier demo in ``out`` that this one did not write (e.g. after ``--n 1``)."""
    for f in out.iterdir():
        if PANEL.fullmatch(f.name) and f.name not in keep and f.is_file():
            f.unlink()


def fingerprint(toy: ToyEditor) -> str:
    """A digest (16 hex digits) of the editor's weights, their dtypes and its latent statistics and device type:
    records of an eval folder are only resumed by the editor that wrote them."""
    h = hashlib.sha256(f"{toy.ae.config!r} {toy.device.type}".encode())
    for module in (toy.dit, toy.ae, toy.text):
        for name, tensor in module.state_dict().items():
            h.update(f"{name} {tensor.dtype}".encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


RECORDS, SETUP, IMAGES = "examples.jsonl", "suite.json", "images"
SUITE_FILES = (RECORDS, SETUP, "metrics.jsonl", "speed_quality.png")


def suite_records(out: str | os.PathLike, setup: dict, suite: Mapping[tuple[str, int], int]) -> RecordStore:
    """The record store of an eval folder: ``examples.jsonl`` (records identified by (method, seed)) and
    ``suite.json`` (editor fingerprint, device type, reference, seed offset); see
    :class:`specedit.evals.runner.RecordStore`."""
    return RecordStore(
        out, setup, suite, id_field="seed", records=RECORDS, setup_file=SETUP, owned=SUITE_FILES
    )


def _store(out, toy: ToyEditor, names: Sequence[str], *, n: int, offset: int, reference: str,
           lora: str | None, images: bool, suite: str) -> Callable[[], RecordStore] | None:  # fmt: skip
    """How rank 0 opens the record store of ``out`` (None without ``out``)."""
    if out is None:
        return None
    setup = {"editor": fingerprint(toy), "device": toy.device.type, "reference": reference, "offset": offset}
    if suite != "toy":  # the deterministic suite's folders predate the field
        setup["suite"] = suite
    if lora is not None:  # the distilled methods' weights (only suites that run them record it)
        setup["lora"] = lora
    if images:  # only runs that save images record it: their records name the files
        setup["images"] = IMAGES
    keys = {(m, SUITES[suite] + offset + i): i for m in names for i in range(n)}
    return lambda: suite_records(out, setup, keys)


def image_path(record: Mapping) -> str:
    """The output image of a record, relative to the eval folder: ``images/<method>/<kind>/<seed>.png``."""
    return f"{IMAGES}/{record['method']}/{record['kind']}/{record['seed']}.png"


def _save_images(out: Path, records: list[dict], outcomes: Mapping[str, Outcome]) -> list[dict]:
    """Write each record's output image (atomically) and name it in the record."""
    for r in records:
        r["image"] = image_path(r)
        (out / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        atomic.save_image(Image.fromarray(to_uint8(outcomes[r["method"]].image)), out / r["image"])
    return records


def evaluate_suite(toy: ToyEditor, methods=EVAL_METHODS, *, n: int, offset: int = 0, reference: str = BASELINE,
                   dist: Dist | None = None, log: Log = None, out: str | os.PathLike | None = None,
                   lora: str | os.PathLike | None = None, images: bool = False,
                   suite: str = "toy") -> list[dict] | None:  # fmt: skip
    """Records of the eval ``suite`` ("toy" or "toy-stochastic", :func:`eval_cases`) for ``methods`` (names or
    {name: method}), sharded over the ranks of ``dist`` (default: from the environment); the merged records
    (ordered by method, then example) on rank 0, None on the other ranks.

    With ``out``, each example's records are appended to ``out/examples.jsonl`` when it finishes (by rank 0,
    after gathering the ranks' examples of that round) and (method, seed) pairs already there are not run
    again; the records returned are then all of the suite's, earlier ones included (see :func:`suite_records`).
    With ``images`` too, every output image is saved under ``out`` (:func:`image_path`) before its record is,
    for the judges (``specedit.evals.scoring``).
    """
    dist = dist or Dist.from_env()
    named = resolve(methods, reference=reference)
    check_lora(named, lora)
    distilled = any(weights_of(m) == "distilled" for m in named.values())
    lora_id = atomic.sha256(lora)[:16] if distilled else None
    if out is not None:
        out = atomic.check_folder(out)
    elif images:
        raise ValueError("images=True needs an out folder to save them in")
    cases = eval_cases(n, offset, indices=dist.shard(n), suite=suite)

    def step(j: int, case: Case) -> list[dict]:
        recs, outcomes = evaluate_case(toy, case, named, reference=reference, warmup=j == 0, log=log, skip=done,
                                       lora=lora)  # fmt: skip
        return _save_images(out, recs, outcomes) if images else recs

    with Ranks(dist, toy.device) as ranks:
        make = _store(out, toy, list(named), n=n, offset=offset, reference=reference, lora=lora_id,
                      images=images, suite=suite)  # fmt: skip
        store, done = open_store(ranks, make)
        if done and log:
            log(f"{len(done)} records already in {store.path if store else out}: not run again")
        todo = [c for c in cases if any((m, c.seed) not in done for m in named)]
        new = run_rounds(ranks, todo, step, store)  # rounds: one example per rank
    if dist.rank != 0:
        return None
    records = list(store.records.values()) if store is not None else new
    order = {m: i for i, m in enumerate(named)}
    return sorted(records, key=lambda r: (order[r["method"]], r["index"]))


def write_suite(records: Sequence[dict], out: str | os.PathLike, *, reference: str = BASELINE,
                plot: bool = True) -> dict:  # fmt: skip
    """metrics.jsonl (one aggregated row per method), examples.jsonl (one per method and example) and the
    speed-versus-quality plot (when matplotlib is importable), each written atomically; returns the rows and the
    paths written. An examples.jsonl already in ``out`` may only hold records that ``records`` has too (as after
    :func:`evaluate_suite` with this ``out``): a one-line error otherwise, so many records are never replaced by
    a few."""
    out = atomic.check_folder(out)
    keep = {(r["method"], r.get("seed")) for r in records}
    lost = [r for r in atomic.read_lines(out / RECORDS) if (r.get("method"), r.get("seed")) not in keep]
    if lost:
        raise ValueError(f"{out / RECORDS} holds {len(lost)} records that are not among the {len(records)} to "
                         f"write (e.g. {lost[0].get('method')} on seed {lost[0].get('seed')}): write to a new "
                         "folder")  # fmt: skip
    rows = aggregate(records, reference=reference)
    paths = {"metrics": str(write_jsonl(rows, out / "metrics.jsonl")),
             "examples": str(write_jsonl(records, out / RECORDS))}  # fmt: skip
    note = None
    if plot:
        from specedit import viz_plots

        if viz_plots.available():
            import matplotlib.pyplot as plt

            ax = viz_plots.speed_quality(rows, reference=reference)
            paths["plot"] = str(atomic.save_figure(ax.figure, out / "speed_quality.png", dpi=130))
            plt.close(ax.figure)
        else:
            note = "matplotlib is not installed: no plot (pip install 'specedit[notebooks]')"
    return {"rows": rows, "paths": paths, "note": note}
