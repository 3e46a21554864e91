"""Calibrate the toy editor's verifier threshold: sweep tau on held-out calibration edits, print the table.

The draft and the verifier's cell scores do not depend on tau, so each calibration edit is drafted and
scored once per verifier variant, and the thresholds are swept afterwards. Calibration seeds are
7_000_000 + i (even: a local edit, odd: a global one); the eval suite's seeds (6_000_000+) stay untouched.

    python benchmarks/calibrate_toy_verifier.py --n 60 [--weights DIR]

Prints, per variant and tau: the mean IoU / precision / recall of the verified set T_edit with the true
edit cells on local edits, and the mean expanded fraction of T_edit on global edits; then the tau with the
best local IoU among those that keep the global expanded fraction >= --min-global.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

import torch

from samplers.field import NoiseField
from specedit.toy import metrics
from specedit.toy.data import GLOBAL_EDITS, LOCAL_EDITS, make_example
from specedit.toy.evaluate import load_toy
from specedit.toy.family import TOY_DRAFTER, TOY_VERIFIER

FIRST_SEED = 7_000_000
TAUS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3)
VARIANTS = {
    "roundtrip/minmax/mean (preset)": TOY_VERIFIER,
    "roundtrip/minmax/max": replace(TOY_VERIFIER, pool="max"),
    "full/minmax/mean": replace(TOY_VERIFIER, reference="full"),
}


def _mean(xs) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


@torch.no_grad()
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=60, help="calibration edits (half local, half global)")
    p.add_argument("--weights", default=None, help="toy editor folder (default: the shipped weights)")
    p.add_argument("--min-global", type=float, default=0.7, help="least expanded fraction on global edits")
    args = p.parse_args(argv)
    toy = load_toy(args.weights)
    scores: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {k: [] for k in VARIANTS}
    for i in range(args.n):
        seed = FIRST_SEED + i
        ex = make_example(seed, kinds=GLOBAL_EDITS if seed % 2 else LOCAL_EDITS)
        ed = toy.editor([ex.source], ex.instruction)
        field = NoiseField.sample(tuple(ed.source.shape), seed, dtype=ed.source.dtype)
        draft = TOY_DRAFTER.draft(ed, field).latent
        for name, verifier in VARIANTS.items():
            cells = verifier.verify(ed, draft).score[0]
            true = metrics.coarse_mask(torch.from_numpy(ex.mask), tuple(cells.shape))[0]
            scores[name].append(("global" if seed % 2 else "local", cells, true))
        print(f"\rdrafted and scored {i + 1}/{args.n}", end="", flush=True)
    print()
    for name, items in scores.items():
        print(f"\n{name}\n{'tau':>6} {'IoU L':>7} {'P L':>6} {'R L':>6} {'exp G':>6}")
        best = None
        for tau in TAUS:
            loc = [(c > tau, t) for s, c, t in items if s == "local"]
            glo = [(c > tau).float().mean().item() for s, c, _ in items if s == "global"]
            iou = _mean([metrics.iou(a, b).item() for a, b in loc])
            prec = _mean([metrics.precision(a, b).item() for a, b in loc])
            rec = _mean([metrics.recall(a, b).item() for a, b in loc])
            exp = _mean(glo)
            print(f"{tau:6.3f} {iou:7.3f} {prec:6.3f} {rec:6.3f} {exp:6.3f}")
            if exp >= args.min_global and (best is None or iou > best[1]):
                best = (tau, iou, exp)
        if best:
            print(f"best tau {best[0]} (local IoU {best[1]:.3f}, global expanded {best[2]:.3f})")


if __name__ == "__main__":
    main()
