"""Methods on both toy suites at matched FLOPs: quality against FLOPs speedup, and how curved each suite is.

Reads the metrics.jsonl of a deterministic (`specedit eval --suite toy`) and a stochastic
(`specedit eval --suite toy-stochastic`) run of the same editor and methods, and prints:

- per suite, every method's FLOPs speedup, fidelity to the same-seed 50-step output (whole / edited /
  unedited PSNR) and the suite's own quality (ground-truth PSNR; validity on the stochastic suite);
- each method against the step-reduction run (steps-N) nearest in FLOPs speedup, with the differences;
- the curvature of each suite: the 50-step paths' curvature (``specedit.toy.evaluate.curvature``) and the
  PSNR of the 9-step output to the 50-step one.

With --plot it writes quality against FLOPs speedup, one panel per suite (matplotlib).

    python benchmarks/toy_method_comparison.py --det out/eval-toy --sto out/eval-toy-stochastic \
        --markdown results.md --plot results.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def rows_of(folder: str) -> dict[str, dict]:
    path = Path(folder) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run specedit eval --out {folder} first")
    return {r["method"]: r for r in map(json.loads, path.read_text().splitlines()) if r}


def fmt(v, spec=".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def nearest_steps(rows: dict[str, dict], method: str) -> str | None:
    steps = [m for m in rows if m.startswith("steps-")]
    if not steps or method.startswith("steps-"):
        return None
    return min(steps, key=lambda m: abs(math.log(rows[m]["flops_speedup"] / rows[method]["flops_speedup"])))


def table(rows: dict[str, dict], stochastic: bool) -> list[str]:
    quality = ("valid", "valid", ".3f") if stochastic else ("GT dB", "psnr_gt", ".2f")
    head = f"| method | x FLOPs | PSNR to 50-step: whole / edited / unedited | {quality[0]} | vs nearest steps-N |"
    out = [head, "|---|---|---|---|---|"]
    for m, r in rows.items():
        if m == "baseline-50":
            continue
        near = nearest_steps(rows, m)
        vs = ""
        if near:
            s = rows[near]
            dq = r[quality[1]] - s[quality[1]]
            dp = r["psnr_ref"] - s["psnr_ref"]
            vs = f"{near} ({s['flops_speedup']:.2f}x): {dp:+.2f} dB, {quality[0]} {dq:+{quality[2]}}"
        fid = " / ".join(fmt(r.get(k)) for k in ("psnr_ref", "psnr_ref_edit", "psnr_ref_keep"))
        out.append(
            f"| {m} | {r['flops_speedup']:.2f} | {fid} | {fmt(r.get(quality[1]), quality[2])} | {vs} |"
        )
    return out


def curvature_lines(det: dict[str, dict], sto: dict[str, dict]) -> list[str]:
    out = [
        "| suite | curvature of the 50-step paths | steps-9 PSNR to the 50-step output (whole / edited) |",
        "|---|---|---|",
    ]
    for name, rows in (("deterministic", det), ("stochastic", sto)):
        base, s9 = rows.get("baseline-50", {}), rows.get("steps-9", {})
        out.append(
            f"| {name} | {fmt(base.get('curvature'), '.4f')} | {fmt(s9.get('psnr_ref'))} / "
            f"{fmt(s9.get('psnr_ref_edit'))} |"
        )
    return out


def plot(det: dict[str, dict], sto: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from specedit import viz_plots

    fig, axes = plt.subplots(1, 3, figsize=(18, 5), constrained_layout=True)
    viz_plots.speed_quality(list(det.values()), ax=axes[0], title="deterministic suite: fidelity")
    viz_plots.speed_quality(list(sto.values()), ax=axes[1], title="stochastic suite: fidelity")
    viz_plots.speed_quality(list(sto.values()), y="valid", ax=axes[2], title="stochastic suite: validity")
    axes[2].set_ylabel("valid outputs (fraction)")
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--det", required=True, help="eval folder of --suite toy")
    p.add_argument("--sto", required=True, help="eval folder of --suite toy-stochastic")
    p.add_argument("--markdown", default=None, help="also write the tables to this file")
    p.add_argument("--plot", default=None, help="quality against FLOPs speedup (PNG)")
    a = p.parse_args()
    det, sto = rows_of(a.det), rows_of(a.sto)
    lines = ["## Deterministic suite", *table(det, False), "", "## Stochastic suite", *table(sto, True), "",
             "## Curvature", *curvature_lines(det, sto)]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")
    if a.plot:
        plot(det, sto, a.plot)


if __name__ == "__main__":
    main()
