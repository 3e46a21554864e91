"""Matplotlib plots of evaluation rows (optional: ``pip install 'specedit[notebooks]'``).

matplotlib is imported inside the functions, so importing this module never needs it; ``available()`` says
whether it can be used. Rows are the aggregated dicts of ``specedit.toy.evaluate.aggregate``.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from pathlib import Path


def available() -> bool:
    """Whether matplotlib is importable."""
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    if not available():
        raise ImportError("plots need matplotlib: pip install 'specedit[notebooks]'")
    import matplotlib.pyplot as plt  # headless machines fall back to the Agg backend by themselves

    return plt


def _family(name: str) -> str:
    for prefix in ("specedit-18-", "specedit", "steps", "ralu", "fresco", "bottleneck", "baseline"):
        if name.startswith(prefix):
            return {"specedit-18-": "ablation"}.get(prefix, prefix)
    return "ablation"


COLORS = {"specedit": "tab:red", "ablation": "tab:orange", "steps": "tab:gray", "ralu": "tab:blue",
          "fresco": "tab:green", "bottleneck": "tab:purple", "baseline": "black"}  # fmt: skip


def speed_quality(rows: Sequence[dict], *, x: str = "flops_speedup", y: str = "psnr_ref",
                  reference: str = "baseline-50", ax=None, title: str | None = None):  # fmt: skip
    """Scatter of one labelled point per method: ``x`` (FLOPs speedup) against ``y`` (PSNR vs the 50-step
    output); the reference is a dashed line at x = 1 (its fidelity to itself is undefined). Returns the axes."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for r in rows:
        vx, vy = r.get(x), r.get(y)
        if r["method"] == reference or vx is None or vy is None or not math.isfinite(vy):
            continue
        fam = _family(r["method"])
        ax.scatter(vx, vy, color=COLORS[fam], s=28, zorder=3)
        ax.annotate(r["method"], (vx, vy), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    ax.text(1.0, 1.0, f" {reference}", transform=ax.get_xaxis_transform(), va="top", fontsize=7)
    if x == "flops_speedup" and y == "latency_speedup":  # where wall time follows the FLOPs
        hi = max([r[x] for r in rows if r.get(x) is not None] + [1.0])
        ax.plot([1, hi], [1, hi], color="gray", lw=0.8, ls=":")
    labels = {"flops_speedup": f"FLOPs speedup vs {reference}", "latency_speedup": f"latency speedup vs {reference}",
              "psnr_ref": f"PSNR vs {reference} output (dB)", "ssim_ref": f"SSIM vs {reference} output"}  # fmt: skip
    ax.set_xlabel(labels.get(x, x))
    ax.set_ylabel(labels.get(y, y))
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return ax


def save_speed_quality(rows: Sequence[dict], path: str | os.PathLike, **kw) -> Path:
    """Write :func:`speed_quality` to ``path`` (PNG) and close the figure."""
    plt = _pyplot()
    ax = speed_quality(rows, **kw)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ax.figure.savefig(path, dpi=130)
    plt.close(ax.figure)
    return path


def metric_bars(rows: Sequence[dict], keys: Sequence[str] = ("iou_local", "precision_local", "recall_local"),
                *, ax=None, title: str | None = None):  # fmt: skip
    """Grouped bars of ``keys`` per method (e.g. the verifier's IoU / precision / recall on local edits)."""
    plt = _pyplot()
    rows = [r for r in rows if any(r.get(k) is not None for k in keys)]
    if ax is None:
        _, ax = plt.subplots(figsize=(max(5, 0.6 * len(rows) * len(keys)), 3.5), constrained_layout=True)
    width = 0.8 / len(keys)
    for j, k in enumerate(keys):
        vals = [r.get(k) if r.get(k) is not None else math.nan for r in rows]
        ax.bar([i + j * width for i in range(len(rows))], vals, width, label=k)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r["method"] for r in rows], rotation=45,
                  ha="right", fontsize=7)  # fmt: skip
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    return ax
