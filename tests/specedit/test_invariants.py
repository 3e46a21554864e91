"""SpecEdit invariants: the guard rails of every later change."""

from dataclasses import replace

import pytest
import torch
from toy_editor import tiny_editor

from models.packing import grid_ids
from samplers.expand import HaarExpander, ReplicateExpander
from samplers.layout import Layout, mixed_indices
from samplers.mixed_res import BottleneckSampler, FullResSampler, MixedResSampler
from specedit.drafters import LowResDrafter
from specedit.method import Baseline, SpecEdit
from specedit.presets import methods
from specedit.protocols import (
    Drafter,
    Editor,
    TokenExpander,
    Verifier,
)
from specedit.protocols import (
    MixedResSampler as MixedResSamplerProtocol,
)
from verify.verifiers import CannyVerifier, FeatureVerifier, FixedVerifier, VarianceVerifier


@pytest.fixture(scope="module")
def editor():
    return tiny_editor()


@torch.no_grad()
def test_expand_everything_without_coarse_stage_is_the_baseline_exactly(editor):
    base = Baseline(FullResSampler(6)).run(editor, seed=11)
    sampler = MixedResSampler(
        steps=(0, 0, 6), ends=(0.0, 0.0), shifts=(None, None, None), z=1.0, renoise="none"
    )
    spec = SpecEdit(drafter=None, verifier=FixedVerifier(True), sampler=sampler).run(editor, seed=11)
    assert torch.equal(spec.latent, base.latent)
    assert spec.nfe == base.nfe == 6


def test_layout_ids_match_official_on_full_grids(editor):
    assert torch.equal(editor.ids(Layout.full((8, 8))), grid_ids((8, 8)))
    assert torch.equal(editor.ids(Layout.full((4, 4))), grid_ids((4, 4)))
    # a mixed layout with every cell expanded places the children on the fine grid (in coarse units)
    everything = Layout.mixed(torch.ones(4, 4, dtype=torch.bool))
    _, children = mixed_indices(torch.ones(4, 4, dtype=torch.bool))
    fine = grid_ids((8, 8))[children] / 2
    assert torch.equal(editor.ids(everything), fine)
    nothing = Layout.mixed(torch.zeros(4, 4, dtype=torch.bool))
    assert torch.equal(editor.ids(nothing), grid_ids((4, 4)))
    centred = Layout.mixed(torch.zeros(4, 4, dtype=torch.bool), align="center")
    assert torch.equal(editor.ids(centred)[:, 1:], grid_ids((4, 4))[:, 1:] + 0.25)


@torch.no_grad()
def test_same_seed_same_output(editor):
    m = methods()["specedit-18"]
    a, b = m.run(editor, seed=5), m.run(editor, seed=5)
    assert torch.equal(a.latent, b.latent) and torch.equal(a.verdict.mask, b.verdict.mask)
    assert not torch.equal(a.latent, m.run(editor, seed=6).latent)


@torch.no_grad()
def test_batch_with_shared_and_differing_token_sets():
    ed = tiny_editor(batch=2)
    uniform = replace(methods()["uniform-18"])
    out = uniform.run(ed, seed=1)  # the uniform set is the same for every sample
    assert out.latent.shape[0] == 2
    ed.source[1] = -ed.source[1]  # the second sample now differs: its verified set differs
    with pytest.raises(ValueError, match="one token set per batch"):
        replace(
            methods()["specedit-18"], verifier=FeatureVerifier(tau=0.5, score_norm="minmax", uniform=None)
        ).run(ed, seed=1)


def test_components_satisfy_their_protocols(editor):
    assert isinstance(editor, Editor)
    assert isinstance(LowResDrafter(), Drafter)
    for v in (FeatureVerifier(), FixedVerifier(), CannyVerifier(), VarianceVerifier()):
        assert isinstance(v, Verifier)
    for e in (HaarExpander(), ReplicateExpander()):
        assert isinstance(e, TokenExpander)
    for s in (MixedResSampler(), FullResSampler(), BottleneckSampler()):
        assert isinstance(s, MixedResSamplerProtocol)


@pytest.mark.parametrize(
    "name",
    [
        "specedit-18",
        "specedit-9",
        "nodraft-18",
        "uniform-18",
        "ralu-7x",
        "fresco-18",
        "bottleneck-18",
        "steps-9",
        "specedit-18-reuse",
        "specedit-18-draft6",
    ],
)
@torch.no_grad()
def test_every_method_runs_and_its_plan_matches_its_run(editor, name):
    m = methods()[name]
    out = m.run(editor, seed=2)
    assert out.latent.shape == editor.source.shape and torch.isfinite(out.latent).all()
    n_exp = int(out.verdict.mask[0].sum()) if out.verdict is not None else 0
    planned = m.events(editor.grid, n_exp)
    key = lambda e: (e["kind"], e.get("stage"), e.get("n_target"), e.get("ref_factor"), e.get("size"))
    assert sorted(map(key, out.events), key=str) == sorted(map(key, planned), key=str)


@torch.no_grad()
def test_draft_reuse_skips_stage_one(editor):
    out = methods()["specedit-18-reuse"].run(editor, seed=3)
    stages = [e["stage"] for e in out.events if e["kind"] == "forward"]
    assert "coarse" not in stages and stages.count("draft") == 8 and out.nfe == 13


def test_bad_sampler_configs():
    with pytest.raises(ValueError, match="ends must satisfy"):
        MixedResSampler(ends=(0.6, 0.3))
    with pytest.raises(ValueError, match="renoise must be one of"):
        MixedResSampler(renoise="fresh")
    with pytest.raises(ValueError, match="needs z >= 2"):
        MixedResSampler(renoise="ralu_correlated", z=1.5)
