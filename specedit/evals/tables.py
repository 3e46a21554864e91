"""Tables like the paper's: judge scores per method next to its latency and FLOPs speedups.

GEdit-Bench (as its statistics script defines it): per item SC and PQ are the minimum of the judge's
sub-scores and O = sqrt(SC * PQ); a method's score per language is the mean over its task types of the
per-type means (**category mean**, GEdit's definition). ImgEdit-Bench: per item the mean of the rubric's three
1-5 scores; per category the mean over its items; overall as the mean over all items (**sample-weighted**, what
the SpecEdit paper's "Overall" matches) and as the mean of the category means. Both means are given for both
suites, labelled. Items with a malformed judge answer are left out of the means and counted in ``malformed``.

Speedups are the reference method's mean latency (whole edit, seconds) and mean sampling TFLOPs over the same
items divided by the method's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

GEDIT_METRICS = ("SC", "PQ", "O")
IMGEDIT_METRICS = ("score",)


def _mean(values: Iterable) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def speedups(records: Sequence[Mapping], reference: str) -> dict[str, dict]:
    """Per method: mean latency, TFLOPs and NFE over its items, and the speedups over ``reference`` measured
    on the same items."""
    by: dict[str, dict] = {}
    for r in records:
        by.setdefault(r["method"], {})[r["key"]] = r
    if reference not in by:
        raise ValueError(f"the records hold no {reference!r} runs (the speedups' reference)")
    out = {}
    for method, recs in by.items():
        keys = [k for k in recs if k in by[reference]]
        mean = lambda field, rs, keys=keys: _mean(rs[k].get(field) for k in keys)
        lat, ref_lat = mean("latency_s", recs), mean("latency_s", by[reference])
        tf, ref_tf = mean("tflops", recs), mean("tflops", by[reference])
        out[method] = {
            "n": len(recs), "nfe": mean("nfe", recs), "latency_s": lat, "tflops": tf,
            "latency_speedup": ref_lat / lat if lat and ref_lat else None,
            "flops_speedup": ref_tf / tf if tf and ref_tf else None,
            "expanded_fraction": mean("expanded_fraction", recs),
            **{f: mean(f, recs) for f in ("psnr", "ssim", "psnr_unchanged", "ssim_unchanged", "mask_iou")},
        }  # fmt: skip
    return out


def _category_scores(scores: Sequence[Mapping], metrics: Sequence[str]) -> dict[str, dict]:
    """Per category: the mean of each metric over its well-formed items and the item count."""
    by: dict[str, list] = {}
    for s in scores:
        by.setdefault(s["category"], []).append(s)
    return {c: {"n": len(ss), **{m: _mean(s[m] for s in ss) for m in metrics}} for c, ss in by.items()}


def score_rows(scores: Sequence[Mapping], records: Sequence[Mapping], *, metrics: Sequence[str],
               reference: str, by_language: bool) -> list[dict]:  # fmt: skip
    """One row per method (and language when ``by_language``): each metric as category mean (``<m>``) and
    sample-weighted mean (``<m>_weighted``), per-category means (``categories``), malformed-answer count, and
    the method's speedups."""
    speed = speedups(records, reference)
    groups: dict[tuple, list] = {}
    for s in scores:
        groups.setdefault((s["method"], s.get("language", "en") if by_language else "all"), []).append(s)
    rows = []
    for (method, language), ss in groups.items():
        good = [s for s in ss if not s.get("malformed")]
        cats = _category_scores(good, metrics)
        row = {"method": method, "language": language, "n": len(ss), "malformed": len(ss) - len(good)}
        for m in metrics:
            row[m] = _mean(c[m] for c in cats.values())
            row[f"{m}_weighted"] = _mean(s[m] for s in good)
        row["categories"] = cats
        row.update({k: v for k, v in speed.get(method, {}).items() if k != "n"})
        rows.append(row)
    order = {m: i for i, m in enumerate(speed)}
    return sorted(rows, key=lambda r: (r["language"], order.get(r["method"], len(order))))


def _cell(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: Sequence[Mapping], metrics: Sequence[str], *, title: str = "") -> str:
    """A markdown table: method, language, each metric (category mean / sample-weighted), malformed, NFE,
    latency and FLOPs speedups."""
    head = ["method", "lang", "n"]
    head += [f"{m} (cat. mean)" for m in metrics] + [f"{m} (weighted)" for m in metrics]
    head += ["malformed", "NFE", "latency (s)", "latency speedup", "TFLOPs", "FLOPs speedup"]
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["language"], str(r["n"])]
        cells += [_cell(r.get(m)) for m in metrics] + [_cell(r.get(f"{m}_weighted")) for m in metrics]
        cells += [str(r["malformed"]), _cell(r.get("nfe"), ".0f"), _cell(r.get("latency_s"), ".2f"),
                  _cell(r.get("latency_speedup"), ".2f"), _cell(r.get("tflops"), ".2f"),
                  _cell(r.get("flops_speedup"), ".2f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def category_markdown(rows: Sequence[Mapping], metric: str) -> str:
    """Per-category means of ``metric`` (ImgEdit's table layout): one row per method and language."""
    cats = list(dict.fromkeys(c for r in rows for c in r["categories"]))
    head = ["method", "lang", *cats, "overall (weighted)", "overall (cat. mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_cell(r["categories"].get(c, {}).get(metric)) for c in cats]
        cells += [_cell(r.get(f"{metric}_weighted")), _cell(r.get(metric))]
        lines.append("| " + " | ".join([r["method"], r["language"], *cells]) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[Mapping], metric: str, *, speed: str = "latency_speedup"):
    """Score (category mean of ``metric``) against ``speed`` per method and language; a matplotlib Axes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for language in dict.fromkeys(r["language"] for r in rows):
        pts = [r for r in rows if r["language"] == language and r.get(speed) and r.get(metric) is not None]
        ax.scatter([r[speed] for r in pts], [r[metric] for r in pts], label=language)
        for r in pts:
            ax.annotate(
                r["method"], (r[speed], r[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    ax.set_xlabel(speed.replace("_", " ") + " (x)")
    ax.set_ylabel(f"{metric} (category mean)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return ax
