"""Named methods: SpecEdit at 30/18/11/9 NFE, its ablations, and the baselines, all as configurations.

``methods(family)`` builds them for one registered family (``specedit.families``): the SpecEdit presets take
the family's NT-DM-fitted stage shifts and rewind Z, and its draft and verifier; the baselines are the same
for every family. There is no default family.

Step-distilled models (a family's ``distilled`` record): ``distilled-N`` samples N steps on the distilled
schedule; ``specedit-distill-N`` splits N into (coarse, mixed, full) steps by ``DISTILL_SPLITS`` and walks the
distilled N-step schedule's own sigma points (see :func:`distill_sampler`); its draft runs the distilled
weights' own step count on their schedule. Both expect the distilled weights (``weights="distilled"``).
The splits reproduce the paper's FLOPs for SpecEdit + step distillation on FLUX.1-Kontext (Table 7: 9.68x at
8 NFE, 13.03x at 6, with an 8-step draft).

Stage splits (``SPLITS``) are chosen so that 30/18/11/9 NFE reproduce the paper's FLOPs at an expanded fraction
of about 25 % (the paper gives the NFE and FLOPs, not the split). RALU's presets are its own released ones;
Bottleneck Sampling's splits scale its paper's FLUX.1-dev split (6, 20, 8) of 34 steps to 30 and 18 NFE.
"""

from __future__ import annotations

from dataclasses import replace

from samplers.caching import FORA, FoCa, FreqCa, TaylorSeer
from samplers.expand import RaluCorrelated, ReplicateExpander
from samplers.mixed_res import BottleneckSampler, FullResSampler, MixedResSampler
from samplers.schedules import flow_sigmas
from specedit.families import Family, get_family
from specedit.method import Baseline, SpecEdit
from verify.verifiers import STATIC_BUCKETS, CannyVerifier, FeatureVerifier, VarianceVerifier

# NFE -> ((N1, N2, N3), (e1, e2))
SPLITS = {30: ((4, 18, 8), (0.3, 0.65)), 18: ((5, 8, 5), (0.3, 0.6)), 11: ((3, 3, 5), (0.2, 0.3)),
          9: ((2, 2, 5), (0.2, 0.3))}  # fmt: skip
# RALU's own presets (FLUX.1-dev, h_ori = 3): (steps, ends, shifts, Z, up_ratio)
RALU = {"4x": ((5, 6, 7), (0.3, 0.45), (5.019, 2.589, 2.226), 6.317, 0.3),
        "7x": ((2, 3, 5), (0.2, 0.3), (8.141, 2.856, 2.193), 6.261, 0.1)}  # fmt: skip
BOTTLENECK = {30: (5, 18, 7), 18: (3, 10, 5)}
DISTILL_SPLITS = {8: (1, 4, 3), 6: (1, 3, 2), 4: (1, 2, 1)}  # NFE -> (N1, N2, N3) on a distilled model
# feature caches on the 50-step baseline, named by method and interval (the paper's Tables 1-3 settings;
# TaylorSeer order 1 and FreqCa order 2 / cutoff 0.1 / 3 warm-up steps are their public code's defaults)
CACHES = {"fora-5": FORA(interval=5), "fora-7": FORA(interval=7), "taylorseer-6": TaylorSeer(interval=6),
          "taylorseer-9": TaylorSeer(interval=9), "freqca-6": FreqCa(interval=6), "freqca-9": FreqCa(interval=9),
          "foca-6": FoCa(interval=6), "foca-9": FoCa(interval=9)}  # fmt: skip
# SpecEdit-30 + TaylorSeer (the paper's Table 7): interval 4, order 1, 3 warm-up steps, restarted per stage on
# the mixed and full stages (the 4-step coarse stage lies within the warm-up); "-all" also caches the coarse
# stage, "-full" only the full stage (compositions the paper did not report)
SPECEDIT_CACHES = {"specedit-30-taylorseer": ("mixed", "full"),
                   "specedit-30-taylorseer-all": ("coarse", "mixed", "full"),
                   "specedit-30-taylorseer-full": ("full",)}  # fmt: skip
SPECEDIT_CACHE = TaylorSeer(interval=4)
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


def distill_sampler(nfe: int, family: str | Family) -> MixedResSampler:
    """SpecEdit's stages on a step-distilled model: they visit exactly the sigmas of its ``nfe``-step schedule.

    A distilled student is accurate at the sigmas it was distilled on, so the rule is: stage boundaries sit at
    the schedule's points after N1 and N1 + N2 steps, every stage's shift is the schedule's own shift h at the
    fit size (``ShiftSchedule.shift``; uniform steps in u = sigma / (h - (h - 1) sigma) then reproduce its
    points), and transitions re-noise without a rewind (Z = 1), which would move every later step off them,
    unless the family sets a rewind floor (``Family.z_floor``): the toy's up-sampled coarse states keep their
    artefacts without a long rewind (see its family record), and on 6 toy edits Z = 12 instead of 1 lifts
    specedit-distill-8 from 21.0 to 36.0 dB PSNR to the 50-step teacher. Exact for a fixed shift (Lightning) and,
    for a dynamic shift, at the fit size (1024^2 for the built-in families); a schedule with a terminal
    stretch is only approximated.
    """
    fam = get_family(family)
    schedule = (fam.distilled.schedule if fam.distilled else None) or fam.schedule
    n1, n2, n3 = DISTILL_SPLITS[nfe]
    sigmas = flow_sigmas(nfe, fam.fit_tokens, schedule).tolist()
    h = schedule.shift(fam.fit_tokens)
    ends = (1.0 - sigmas[n1], 1.0 - sigmas[n1 + n2])
    return MixedResSampler(steps=(n1, n2, n3), ends=ends, shifts=(h, h, h), z=fam.z_floor)


def distilled_methods(fam: Family) -> dict[str, object]:
    """``distilled-N`` and ``specedit-distill-N`` for each NFE of the family's distilled record."""
    d = fam.distilled
    out: dict[str, object] = {}
    for nfe in d.steps if d else ():
        out[f"distilled-{nfe}"] = Baseline(FullResSampler(nfe, schedule=d.schedule), weights="distilled")
    for nfe in d.steps if d else ():
        if nfe in DISTILL_SPLITS:
            drafter = replace(fam.drafter, steps=d.steps[nfe], schedule=d.schedule)
            sampler = distill_sampler(nfe, fam)
            out[f"specedit-distill-{nfe}"] = SpecEdit(drafter, fam.verifier, sampler, weights="distilled")
    return out


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
    for n in (18, 9):  # static token budgets for compiled runs (verify.verifiers.STATIC_BUCKETS)
        if n in fitted and isinstance(out[f"specedit-{n}"].verifier, FeatureVerifier):
            v = out[f"specedit-{n}"].verifier
            out[f"specedit-{n}-static"] = replace(
                out[f"specedit-{n}"], verifier=replace(v, buckets=STATIC_BUCKETS)
            )
    out.update(distilled_methods(fam))
    out.update({name: Baseline(FullResSampler(50, cache=c)) for name, c in CACHES.items()})
    if 30 in fitted:
        s30 = out["specedit-30"].sampler
        for name, stages in SPECEDIT_CACHES.items():
            sampler = replace(s30, cache=SPECEDIT_CACHE, cache_stages=stages)
            out[name] = replace(out["specedit-30"], sampler=sampler)
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
