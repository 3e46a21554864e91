"""Mixed-resolution sampler configurations: every option is validated when the sampler is built."""

import pytest

from samplers.expand import NoRenoise, RaluCorrelated
from samplers.mixed_res import BottleneckSampler, FullResSampler, MixedResSampler

FIT = dict(steps=(5, 8, 5), ends=(0.3, 0.6), shifts=(5.0, 2.0, 2.0), z=4.0)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(ends=(0.6, 0.3)), r"ends must satisfy 0 <= e1 <= e2 < 1, got \(0.6, 0.3\)"),
        (dict(renoise="fresh"), "renoise must be a strategy object such as CoherentField"),
        (dict(renoise=RaluCorrelated(), z=1.5), r"z must be >= 2.0 for RaluCorrelated\(min_z=2.0\), got 1.5"),
        (dict(z=float("nan")), "z must be >= 1.0"),
        (dict(align="middle"), r"MixedResSampler.align must be one of \('topleft', 'center'\), got 'middle'"),
        (dict(ref_mode="half"), r"MixedResSampler.ref_mode must be one of"),
        (dict(steps=(5, -1, 5)), "steps must be three non-negative counts"),
        (
            dict(renoise=NoRenoise(), z=1.0, ends=(0.3, 0.3)),
            "stage 2 starts at progress 0.3000 but ends at 0.3",
        ),
    ],
)
def test_bad_mixed_res_configs(change, message):
    with pytest.raises(ValueError, match=message):
        MixedResSampler(**{**FIT, **change})


def test_bad_baseline_configs():
    with pytest.raises(ValueError, match="FullResSampler.steps must be >= 1, got 0"):
        FullResSampler(0)
    with pytest.raises(ValueError, match=r"every Bottleneck stage needs at least one step, got \(3, 0, 5\)"):
        BottleneckSampler(steps=(3, 0, 5))
