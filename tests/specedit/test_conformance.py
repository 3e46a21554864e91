"""Editor conformance: the invariants every registered family's editor keeps, and the parts' signatures.

Parametrised over every family in the registry (kontext, qwen, toy) and one registered from outside the
package (``outside_family.py``: a tiny DiT over 1 x 1 patches with its own schedule), each through its own
``tiny_editor``. A new family passes this suite or is not done.
"""

import inspect
import math
from dataclasses import replace

import pytest
import torch
from outside_family import register_outside

from models.work import EditShape, Forecast, Forward, VaeWork
from samplers.caching import FORA, FoCa, FreqCa, TaylorSeer
from samplers.expand import IID, CoherentField, HaarExpander, NoRenoise, RaluCorrelated, ReplicateExpander
from samplers.mixed_res import BottleneckSampler, FullResSampler, MixedResSampler
from specedit import protocols
from specedit.bench import meta_rows
from specedit.drafters import LowResDrafter
from specedit.families import families, get_family
from specedit.method import Baseline, SpecEdit
from specedit.presets import methods
from verify.verifiers import CannyVerifier, FeatureVerifier, FixedVerifier, VarianceVerifier

OUTSIDE = register_outside()
FAMILIES = sorted(families())  # the built-in ones and "outside-tiny"
PLANNED = [
    "specedit-18",
    "specedit-9",
    "nodraft-18",
    "uniform-18",
    "semantic-18",
    "ralu-4x",
    "ralu-7x",
    "fresco-18",
    "bottleneck-18",
    "steps-9",
    "specedit-18-reuse",
    "specedit-18-draft6",
    "taylorseer-9",
    "specedit-30-taylorseer",
]  # fmt: skip (the policies share one schedule path)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return get_family(request.param)


@pytest.fixture(scope="module")
def editor(family):
    return family.tiny_editor()


def test_the_outside_family_is_registered():
    assert {"kontext", "qwen", "toy", "outside-tiny"} <= set(FAMILIES)
    assert get_family("outside-tiny") is OUTSIDE and get_family("flux-kontext-dev").name == "kontext"
    with pytest.raises(ValueError, match="unknown family 'nope'; choose from kontext, qwen, toy"):
        get_family("nope")


def test_editor_satisfies_the_protocol(family, editor):
    assert isinstance(editor, protocols.Editor)
    assert EditShape.of(editor).latent == tuple(editor.source.shape[-2:])
    tokens = editor.pack(editor.source)
    assert tokens.shape[:2] == (editor.source.shape[0], editor.grid[0] * editor.grid[1])
    assert torch.equal(editor.unpack(tokens, editor.grid), editor.source)
    assert editor.patch == family.patch and editor.schedule == family.schedule


@torch.no_grad()
def test_expand_everything_without_coarse_stage_is_the_baseline_exactly(editor):
    base = Baseline(FullResSampler(6)).run(editor, seed=11)
    sampler = MixedResSampler(steps=(0, 0, 6), ends=(0.0, 0.0), shifts=(None, None, None), z=1.0,
                              renoise=NoRenoise())  # fmt: skip
    spec = SpecEdit(drafter=None, verifier=FixedVerifier(True), sampler=sampler).run(editor, seed=11)
    assert torch.equal(spec.latent, base.latent)
    assert spec.nfe == base.nfe == 6


@torch.no_grad()
def test_same_seed_same_output(family, editor):
    m = methods(family)["specedit-18"]
    a, b = m.run(editor, seed=5), m.run(editor, seed=5)
    assert torch.equal(a.latent, b.latent) and torch.equal(a.verdict.mask, b.verdict.mask)
    assert not torch.equal(a.latent, m.run(editor, seed=6).latent)


@pytest.mark.parametrize("name", PLANNED)
@torch.no_grad()
def test_every_method_runs_and_its_plan_is_its_run(family, editor, name):
    """The plan lists the run's events exactly: stages, token counts, reference levels, batch, VAE taps."""
    if name not in methods(family):
        pytest.skip(f"family {family.name!r} fits no split this preset needs")
    m = methods(family)[name]
    out = m.run(editor, seed=2)
    assert out.latent.shape == editor.source.shape and torch.isfinite(out.latent).all()
    plan = m.plan(EditShape.of(editor), out.expanded_fraction)
    assert plan.events == out.events
    assert plan.nfe == out.nfe and all(isinstance(e, Forward | Forecast | VaeWork) for e in out.events)
    flops = out.flops(editor)
    assert math.isclose(flops["total"], sum(editor.cost(e) for e in out.events), rel_tol=1e-12)


@torch.no_grad()
def test_plans_see_the_batch(family):
    ed = family.tiny_editor(batch=2)
    m = methods(family)["uniform-18"]  # the uniform set is the same for every sample
    out = m.run(ed, seed=1)
    assert out.latent.shape[0] == 2 and {e.batch for e in out.events} == {2}
    assert m.plan(EditShape.of(ed), out.expanded_fraction).events == out.events


@torch.no_grad()
def test_differing_token_sets_in_one_batch_raise(family):
    ed = family.tiny_editor(batch=2)
    ed.source[1] = -ed.source[1]  # the second sample now differs: its verified set differs
    verifier = FeatureVerifier(tau=0.5, score_norm="minmax", uniform=None)
    with pytest.raises(ValueError, match="one token set per batch"):
        replace(methods(family)["specedit-18"], verifier=verifier).run(ed, seed=1)


@torch.no_grad()
def test_draft_reuse_skips_stage_one(family, editor):
    out = methods(family)["specedit-18-reuse"].run(editor, seed=3)
    stages = [e.stage for e in out.events if isinstance(e, Forward)]
    assert "coarse" not in stages and stages.count("draft") == 8 and out.nfe == 13


@torch.no_grad()
def test_callback_sees_every_forward(family, editor):
    seen = []
    out = methods(family)["specedit-9"].run(editor, seed=4, callback=lambda info: seen.append(info["stage"]))
    assert seen == [e.stage for e in out.events if isinstance(e, Forward)]


def test_bench_flops_through_the_registry(family):
    size = 128 * family.vae_factor * family.patch // 8  # a 16 x 16 fine grid
    rows = meta_rows(["baseline-50", "specedit-18", "specedit-9"], family=family.name, height=size, width=size,
                     expand_fraction=0.25)  # fmt: skip
    assert [r["nfe"] for r in rows] == [50, 18, 9] and rows[0]["flops_speedup"] == 1.0
    assert rows[1]["flops_speedup"] > 1.5 and rows[2]["flops_speedup"] > rows[1]["flops_speedup"]
    assert rows[1]["expanded_fraction"] == 0.25


# ----------------------------------------------------------------------------------------------- signatures
PARTS = {
    protocols.Drafter: [LowResDrafter()],
    protocols.Verifier: [FeatureVerifier(), FixedVerifier(), CannyVerifier(), VarianceVerifier()],
    protocols.TokenExpander: [HaarExpander(), ReplicateExpander()],
    protocols.Sampler: [
        MixedResSampler(steps=(5, 8, 5), ends=(0.3, 0.6), shifts=(5.0, 2.0, 2.0), z=4.0),
        FullResSampler(),
        BottleneckSampler(),
    ],  # fmt: skip
    protocols.Renoise: [CoherentField(), IID(), NoRenoise(), RaluCorrelated()],
    protocols.FeatureCache: [FORA(interval=5), TaylorSeer(interval=6), FreqCa(interval=9), FoCa(interval=9)],
}


def _methods_of(proto) -> list[str]:
    return [n for n, v in vars(proto).items() if inspect.isfunction(v) and not n.startswith("_")]


def _params(fn) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("proto", list(PARTS), ids=lambda p: p.__name__)
def test_parts_have_the_protocols_signatures(proto):
    for part in PARTS[proto]:
        assert isinstance(part, proto), part
        for name in _methods_of(proto):
            assert _params(getattr(part, name)) == _params(getattr(proto, name)), (type(part).__name__, name)


def test_editors_and_methods_have_the_protocols_signatures(editor):
    for name in _methods_of(protocols.Editor):
        assert _params(getattr(editor, name)) == _params(getattr(protocols.Editor, name)), name
    for m in (methods("kontext")["specedit-18"], methods("kontext")["baseline-50"]):
        for name in _methods_of(protocols.Method):
            assert _params(getattr(m, name)) == _params(getattr(protocols.Method, name)), name


@torch.no_grad()
def test_non_finite_values_raise_naming_the_stage(family):
    ed = family.tiny_editor()
    bad = ed.source.clone()
    bad[0, 0, 0, 0] = float("nan")
    m = methods(family)["specedit-18"]
    with pytest.raises(ValueError, match=r"the source latent \(1, .*\) contains NaN or inf"):
        m.run(_with_source(ed, bad), seed=0)
    wrapped = _NaNAfter(ed, calls=20)  # the denoiser turns NaN in the mixed stage (8 draft + 5 coarse + 7)
    with pytest.raises(ValueError, match=r"NaN or inf in stage 'mixed' at step 7 of 8"):
        m.run(wrapped, seed=0)


def _with_source(ed, source):
    ed = _Proxy(ed)
    ed.source = source
    return ed


class _Proxy:
    def __init__(self, ed):
        self.__dict__["_ed"] = ed

    def __getattr__(self, name):
        return getattr(self._ed, name)


class _NaNAfter(_Proxy):
    """Its denoiser returns NaN from the ``calls``-th forward on."""

    def __init__(self, ed, calls: int):
        super().__init__(ed)
        self.__dict__["n"], self.__dict__["calls"] = 0, calls

    def denoiser(self, layout):
        inner = self._ed.denoiser(layout)

        def run(x, sigma):
            self.__dict__["n"] += 1
            v = inner(x, sigma)
            return v * float("nan") if self.n >= self.calls else v

        return run
