"""Verifiers: the discrepancy metric, thresholds, the uniform set, budgets, static buckets, Canny and variance
selection."""

from dataclasses import replace

import pytest
import torch

from specedit.kontext.family import tiny_editor
from verify.canny import canny
from verify.discrepancy import dilate, feature_distance, normalize_scores, pool_scores
from verify.verifiers import CannyVerifier, FeatureVerifier, VarianceVerifier, uniform_cells


@pytest.fixture(scope="module")
def editor():
    return tiny_editor()


def test_feature_distance_range_and_identity():
    a = {"x": torch.randn(2, 8, 4, 4), "y": torch.randn(2, 3, 8, 8)}
    d = feature_distance(a, a, (8, 8))
    assert torch.equal(d, torch.zeros(2, 8, 8))
    neg = feature_distance(a, {k: -v for k, v in a.items()}, (8, 8))
    assert torch.allclose(neg, torch.full_like(neg, 4.0), atol=1e-5)  # opposite directions: 2 - 2cos = 4


def test_pooling_normalisation_dilation():
    s = torch.arange(16.0).view(1, 4, 4)
    assert pool_scores(s, (2, 2)).tolist() == [[[2.5, 4.5], [10.5, 12.5]]]
    assert pool_scores(s, (2, 2), "max").tolist() == [[[5.0, 7.0], [13.0, 15.0]]]
    n = normalize_scores(s, "minmax")
    assert n.min() == 0 and n.max() == 1
    m = torch.zeros(1, 5, 5, dtype=torch.bool)
    m[0, 2, 2] = True
    assert int(dilate(m, 1).sum()) == 9 and torch.equal(dilate(m, 0), m)


def test_uniform_set():
    u = uniform_cells((32, 32), 3, 1, "cpu")
    assert int(u.sum()) == 121  # 11.8 % at 1024^2, the paper's uniform set (k = 3)
    assert int(uniform_cells((32, 32), 2, 1, "cpu").sum()) == 256


@torch.no_grad()
def test_identical_candidate_selects_only_the_uniform_set(editor):
    v = FeatureVerifier().verify(editor, editor.source)
    assert not v.edit.any() and torch.equal(v.mask, uniform_cells((4, 4), 3, 1, "cpu"))


@torch.no_grad()
def test_a_local_change_is_found(editor):
    cand = editor.source.clone()
    cand[..., 8:16, 8:16] += 3 * torch.randn(1, 4, 8, 8)  # change the bottom-right coarse quadrant
    v = FeatureVerifier(tau=0.5, score_norm="minmax", uniform=None).verify(editor, cand)
    assert v.edit[0, 2:, 2:].all() and not v.edit[0, :2, :2].any()
    # the draft arrives at a lower resolution and is upsampled back
    low = torch.nn.functional.avg_pool2d(cand, 4)
    assert FeatureVerifier(uniform=None, score_norm="minmax", tau=0.5).verify(editor, low).mask.shape == (
        1,
        4,
        4,
    )


@torch.no_grad()
def test_budget_expands_a_fixed_fraction(editor):
    cand = editor.source + torch.randn_like(editor.source)
    for frac in (0.25, 0.5, 1.0):
        v = FeatureVerifier(budget=frac).verify(editor, cand)
        assert int(v.mask.sum()) == round(frac * 16)


def test_canny_finds_a_square_outline():
    img = torch.zeros(1, 32, 32)
    img[:, 8:24, 8:24] = 255
    e = canny(img)
    assert e[0, 8:24, 7:9].any(dim=1).all()  # left edge found on every row of the square
    assert not e[0, 12:20, 12:20].any() and not e[0, :4, :4].any()  # nothing inside or far outside


@torch.no_grad()
def test_ralu_and_fresco_selectors(editor):
    coarse = torch.randn(1, 4, 8, 8)
    v = CannyVerifier(up_ratio=0.25).verify(editor, coarse)
    assert int(v.mask.sum()) == 4 and v.events[0].op == "decode"
    fv = VarianceVerifier(0.5).verify(editor, coarse)
    assert int(fv.mask.sum()) == 8
    low = VarianceVerifier(0.5, order="low_first").verify(editor, coarse)
    assert not (low.mask & fv.mask).any()


def test_static_buckets_round_the_threshold_count_up(editor):
    """The thresholded set (plus the uniform set) is kept and completed with the next best cells up to the
    smallest bucket that holds it; plans report the bucket."""
    from models.work import EditShape
    from verify.verifiers import STATIC_BUCKETS

    cand = editor.source.clone()
    cand[..., 4:8, :12] += 3 * torch.randn(1, 4, 4, 12)  # three cells of the second row change
    exact = FeatureVerifier(tau=0.5, score_norm="minmax", uniform=None)
    bucketed = replace(exact, buckets=STATIC_BUCKETS)
    a, b = exact.verify(editor, cand), bucketed.verify(editor, cand)
    n = a.mask[0].numel()
    assert 0 < a.mask.sum() < b.mask.sum() and (a.mask <= b.mask).all()
    assert b.mask.sum() / n in STATIC_BUCKETS and b.mask.sum() / n == bucketed.bucket(a.mask.sum() / n)
    assert bucketed.plan(EditShape.of(editor), 0.3).fraction == 0.375
    with pytest.raises(
        ValueError, match=r"buckets must be increasing fractions ending at 1.0, got \(0.5, 0.25"
    ):
        FeatureVerifier(buckets=(0.5, 0.25, 1.0))
