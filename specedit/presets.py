"""Named methods: SpecEdit at 30/18/11/9 NFE, its ablations, and the baselines, all as configurations.

``methods(family)`` builds them for one registered family (``specedit.families``): the SpecEdit presets take
the family's NT-DM-fitted stage shifts and rewind Z, and its draft and verifier; the baselines are the same
for every family. There is no default family.

Stage splits (``SPLITS``) are chosen so that 30/18/11/9 NFE reproduce the paper's FLOPs at an expanded fraction
of about 25 % (the paper gives the NFE and FLOPs, not the split). RALU's presets are its own released ones;
Bottleneck Sampling's splits scale its paper's FLUX.1-dev split (6, 20, 8) of 34 steps to 30 and 18 NFE.
"""

from __future__ import annotations

from dataclasses import replace

from samplers.expand import RaluCorrelated, ReplicateExpander
from samplers.mixed_res import BottleneckSampler, FullResSampler, MixedResSampler
from specedit.families import Family, get_family
from specedit.method import Baseline, SpecEdit
from verify.verifiers import CannyVerifier, VarianceVerifier

# NFE -> ((N1, N2, N3), (e1, e2))
SPLITS = {30: ((4, 18, 8), (0.3, 0.65)), 18: ((5, 8, 5), (0.3, 0.6)), 11: ((3, 3, 5), (0.2, 0.3)),
          9: ((2, 2, 5), (0.2, 0.3))}  # fmt: skip
# RALU's own presets (FLUX.1-dev, h_ori = 3): (steps, ends, shifts, Z, up_ratio)
RALU = {"4x": ((5, 6, 7), (0.3, 0.45), (5.019, 2.589, 2.226), 6.317, 0.3),
        "7x": ((2, 3, 5), (0.2, 0.3), (8.141, 2.856, 2.193), 6.261, 0.1)}  # fmt: skip
BOTTLENECK = {30: (5, 18, 7), 18: (3, 10, 5)}
FRESCO_FRACTION = 0.25  # Fresco's variance selection at the expanded fraction the SpecEdit presets assume


def specedit_sampler(nfe: int, family: str | Family, *, free: bool = False) -> MixedResSampler:
    """The mixed-resolution sampler of SpecEdit-``nfe`` with ``family``'s fit (``free``: without its Z floor)."""
    fam = get_family(family)
    steps, ends = SPLITS[nfe]
    shifts, z = (fam.free_fit if free else fam.fitted)[nfe]
    return MixedResSampler(steps=steps, ends=ends, shifts=shifts, z=z)


def specedit(nfe: int, family: str | Family) -> SpecEdit:
    fam = get_family(family)
    return SpecEdit(drafter=fam.drafter, verifier=fam.verifier, sampler=specedit_sampler(nfe, fam))


def ralu(level: str) -> SpecEdit:
    steps, ends, shifts, z, up_ratio = RALU[level]
    sampler = MixedResSampler(steps=steps, ends=ends, shifts=shifts, z=z, renoise=RaluCorrelated(),
                              expander=ReplicateExpander())  # fmt: skip
    return SpecEdit(drafter=None, verifier=CannyVerifier(up_ratio=up_ratio), sampler=sampler)


def methods(family: str | Family) -> dict[str, object]:
    """Every named method for one model family (a registered name, a model name or a Family)."""
    fam = get_family(family)
    out: dict[str, object] = {"baseline-50": Baseline(FullResSampler(50))}
    for n in (30, 18, 10, 9):
        out[f"steps-{n}"] = Baseline(FullResSampler(n))
    fitted = [n for n in SPLITS if n in fam.fitted]  # a family may fit only some splits
    for n in fitted:
        out[f"specedit-{n}"] = specedit(n, fam)
    out.update({"ralu-4x": ralu("4x"), "ralu-7x": ralu("7x")})
    fresco = VarianceVerifier(FRESCO_FRACTION)
    for n in (30, 18):
        if n in fitted:
            out[f"fresco-{n}"] = SpecEdit(drafter=None, verifier=fresco, sampler=specedit_sampler(n, fam))
    for n in (30, 18):
        out[f"bottleneck-{n}"] = Baseline(BottleneckSampler(steps=BOTTLENECK[n]))
    if 18 in fitted:
        out.update(ablations(fam, out["specedit-18"]))
    return out


def ablations(fam: Family, s18: SpecEdit) -> dict[str, SpecEdit]:
    """SpecEdit-18's ablations (paper Table 9 and sections 7.x), as configurations."""
    v, d = s18.verifier, s18.drafter
    out = {
        "uniform-18": replace(s18, drafter=None, verifier=replace(v, semantic=False)),
        "semantic-18": replace(s18, verifier=replace(v, uniform=None)),
        "nodraft-18": replace(s18, drafter=None),
        "specedit-18-reuse": replace(s18, draft_reuse=True),
    }
    for tau in (0.4, 0.9):
        out[f"specedit-18-tau{tau}"] = replace(s18, verifier=replace(v, tau=tau))
    out["specedit-18-ndraft4"] = replace(s18, drafter=replace(d, steps=4))
    for k in (2, 4):
        out[f"specedit-18-k{k}"] = replace(s18, verifier=replace(v, uniform=k))
    for f in fam.draft_ablations:
        out[f"specedit-18-draft{f:g}"] = replace(s18, drafter=replace(d, factor=f))
    if 18 in fam.free_fit:  # the NT-DM fit without the family's floor on the rewind
        out["specedit-18-z1"] = replace(s18, sampler=specedit_sampler(18, fam, free=True))
    return out


def get(name: str, family: str | Family):
    """One named method of ``family``; an unknown name lists the valid ones."""
    table = methods(family)
    if name not in table:
        raise ValueError(f"unknown method {name!r} for family {get_family(family).name!r}; "
                         f"choose from {', '.join(table)}")  # fmt: skip
    return table[name]
