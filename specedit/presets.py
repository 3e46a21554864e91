"""Named methods: SpecEdit at 30/18/11/9 NFE, its ablations, and the baselines, all as configurations.

Families: "flux" (FLUX.1-Kontext-dev), "qwen" (Qwen-Image-Edit) and "toy" (the toy editor, with its own
calibrated draft and verifier). Stage splits follow the research memo (section 4.10): they reproduce the
paper's FLOPs at an expanded fraction of about 25 %. Per-stage shifts and the rewind Z are NT-DM fits
(``samplers.ntdm.fit_ntdm``, Z >= ``Z_FLOOR[family]``) against the model's full-resolution shift: e^1.15 =
3.158 for FLUX.1-Kontext and e^0.6935 = 2.001 for Qwen-Image-Edit at 1024^2, e^0.5 = 1.649 for the toy at
16 x 16 tokens. ``tests/specedit/test_presets.py`` refits them.
"""

from __future__ import annotations

import math
from dataclasses import replace

from samplers.expand import ReplicateExpander
from samplers.mixed_res import BottleneckSampler, FullResSampler, MixedResSampler
from samplers.schedules import FLUX_SCHEDULE, QWEN_SCHEDULE
from specedit.drafters import LowResDrafter
from specedit.method import Baseline, SpecEdit
from verify.verifiers import CannyVerifier, FeatureVerifier, VarianceVerifier

# NFE -> ((N1, N2, N3), (e1, e2))
SPLITS = {30: ((4, 18, 8), (0.3, 0.65)), 18: ((5, 8, 5), (0.3, 0.6)), 11: ((3, 3, 5), (0.2, 0.3)),
          9: ((2, 2, 5), (0.2, 0.3))}  # fmt: skip
# full-resolution shift each family's presets are fitted against: FLUX.1-Kontext and Qwen-Image-Edit at 1024^2,
# the toy editor at its 16 x 16 grid (256 tokens)
H_ORI = {
    "flux": math.exp(FLUX_SCHEDULE.mu(4096)),
    "qwen": math.exp(QWEN_SCHEDULE.mu(4096)),
    "toy": math.exp(FLUX_SCHEDULE.mu(256)),
}
# least rewind Z per family. The toy editor's flows are nearly straight (50 -> 9 Euler steps keeps 46 dB) and
# its latents have hard edges, so the up-sampled coarse state carries artefacts that a short rewind leaves in
# place; fidelity to the 50-step output rises with Z (SpecEdit-18's unedited region, 8 calibration edits:
# 26.3 dB at the free fit's Z 2.08, 31.6 at Z >= 8, 34.1 at 12, 36.9 at 24) and flattens from about 12.
# ``specedit-18-z1`` keeps the free fit as an ablation.
Z_FLOOR = {"flux": 1.0, "qwen": 1.0, "toy": 12.0}
# (family, NFE) -> (shifts, Z), from fit_ntdm(steps, ends, H_ORI[family], z_bounds=(Z_FLOOR[family], 100))
FITTED = {
    ("flux", 30): ((10.0, 2.882, 2.376), 9.086),
    ("flux", 18): ((5.813, 2.248, 2.601), 4.437),
    ("flux", 11): ((5.641, 2.257, 2.174), 3.592),
    ("flux", 9): ((7.363, 2.943, 2.770), 6.322),
    ("qwen", 30): ((9.418, 1.957, 1.105), 5.144),
    ("qwen", 18): ((3.426, 1.315, 1.276), 2.561),
    ("qwen", 11): ((2.981, 0.904, 1.369), 2.352),
    ("qwen", 9): ((3.653, 1.689, 1.710), 3.080),
    ("toy", 30): ((2.797, 1.614, 0.774), 12.0),
    ("toy", 18): ((1.008, 1.029, 0.745), 12.0),
    ("toy", 11): ((1.504, 0.500, 0.995), 12.0),
    ("toy", 9): ((1.954, 0.630, 1.273), 12.0),
}
# fit_ntdm with z_bounds=(1, 100) where the family's floor is higher (the "-z1" ablation)
FREE_FIT = {("toy", 18): ((2.550, 0.983, 0.966), 2.076)}
# The toy editor's grid is 16 x 16 tokens, so a 4x draft would be 4 x 4 (32 px): coarser than the 8 x 8 cells it
# must judge. Its calibrated draft is 2x (8 x 8 tokens, closer to the paper's 16 x 16-token draft in absolute
# size), verified against the round-trip source with min-max scores. tau is the best local IoU with at least
# 0.7 expanded on global edits over 30 local and 30 global calibration edits (seeds 7,000,000+;
# `python benchmarks/calibrate_toy_verifier.py --n 60`): IoU 0.648, 0.927 expanded on global ones.
TOY_DRAFTER = LowResDrafter(factor=2, steps=8)
TOY_VERIFIER = FeatureVerifier(tau=0.05, reference="roundtrip", score_norm="minmax")
# RALU's own presets (FLUX.1-dev, h_ori = 3): (steps, ends, shifts, Z, up_ratio)
RALU = {"4x": ((5, 6, 7), (0.3, 0.45), (5.019, 2.589, 2.226), 6.317, 0.3),
        "7x": ((2, 3, 5), (0.2, 0.3), (8.141, 2.856, 2.193), 6.261, 0.1)}  # fmt: skip
BOTTLENECK = {30: (5, 18, 7), 18: (3, 10, 5)}


def specedit_sampler(nfe: int, family: str = "flux") -> MixedResSampler:
    steps, ends = SPLITS[nfe]
    shifts, z = FITTED[(family, nfe)]
    return MixedResSampler(steps=steps, ends=ends, shifts=shifts, z=z)


def specedit(nfe: int, family: str = "flux") -> SpecEdit:
    if family == "toy":
        return SpecEdit(drafter=TOY_DRAFTER, verifier=TOY_VERIFIER, sampler=specedit_sampler(nfe, family))
    return SpecEdit(
        drafter=LowResDrafter(), verifier=FeatureVerifier(), sampler=specedit_sampler(nfe, family)
    )


def ralu(level: str) -> SpecEdit:
    steps, ends, shifts, z, up_ratio = RALU[level]
    sampler = MixedResSampler(steps=steps, ends=ends, shifts=shifts, z=z, renoise="ralu_correlated",
                              expander=ReplicateExpander())  # fmt: skip
    return SpecEdit(drafter=None, verifier=CannyVerifier(up_ratio=up_ratio), sampler=sampler)


def methods(family: str = "flux") -> dict[str, object]:
    """Every named method for one model family."""
    out: dict[str, object] = {"baseline-50": Baseline(FullResSampler(50))}
    for n in (30, 18, 10, 9):
        out[f"steps-{n}"] = Baseline(FullResSampler(n))
    for n in SPLITS:
        out[f"specedit-{n}"] = specedit(n, family)
    s18 = specedit(18, family)
    out.update({
        "ralu-4x": ralu("4x"),
        "ralu-7x": ralu("7x"),
        "fresco-30": SpecEdit(drafter=None, verifier=VarianceVerifier(0.25), sampler=specedit_sampler(30, family)),
        "fresco-18": SpecEdit(drafter=None, verifier=VarianceVerifier(0.25), sampler=specedit_sampler(18, family)),
        "bottleneck-30": Baseline(BottleneckSampler(steps=BOTTLENECK[30])),
        "bottleneck-18": Baseline(BottleneckSampler(steps=BOTTLENECK[18])),
        # ablations of SpecEdit-18 (paper Table 9 and sections 7.x), as configurations
        "uniform-18": replace(s18, drafter=None, verifier=replace(s18.verifier, semantic=False)),
        "semantic-18": replace(s18, verifier=replace(s18.verifier, uniform=None)),
        "nodraft-18": replace(s18, drafter=None),
        "specedit-18-reuse": replace(s18, draft_reuse=True),
    })  # fmt: skip
    for tau in (0.4, 0.9):
        out[f"specedit-18-tau{tau}"] = replace(s18, verifier=replace(s18.verifier, tau=tau))
    out["specedit-18-ndraft4"] = replace(s18, drafter=replace(s18.drafter, steps=4))
    for k in (2, 4):
        out[f"specedit-18-k{k}"] = replace(s18, verifier=replace(s18.verifier, uniform=k))
    for f in (4, 6, 8) if family == "toy" else (6, 8):
        out[f"specedit-18-draft{f}"] = replace(s18, drafter=replace(s18.drafter, factor=f))
    if Z_FLOOR[family] > 1.0:  # the NT-DM fit without the family's floor on the rewind
        shifts, z = FREE_FIT[(family, 18)]
        out["specedit-18-z1"] = replace(s18, sampler=replace(s18.sampler, shifts=shifts, z=z))
    return out


def get(name: str, family: str = "flux"):
    table = methods(family)
    if name not in table:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(table)}")
    return table[name]
