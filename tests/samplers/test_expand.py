"""Expansion and re-noise invariants: exact flow-matching statistics, energy preservation, the pure field."""

from types import SimpleNamespace

import pytest
import torch

from models.packing import pack, unpack
from samplers.expand import (
    IID,
    CoherentField,
    HaarExpander,
    NoRenoise,
    RaluCorrelated,
    ReplicateExpander,
    Transition,
    rewind,
)
from samplers.field import NoiseField, dc, haar, ihaar, upsample_nearest

ED = SimpleNamespace(patch=2, pack=pack, unpack=unpack)  # what expanders ask of an editor: its packing


def _t(e, s, field_tokens, *, z=1.0, groups=None, fresh=None):
    groups = torch.zeros(0, 4, dtype=torch.long) if groups is None else groups
    return Transition(e, s, z, field_tokens, groups, fresh or (lambda shape: torch.zeros(shape)))


def _field(shape=(2, 4, 16, 16), seed=0):
    return NoiseField.sample(shape, seed, dtype=torch.float64)


def test_haar_is_orthonormal_and_self_inverse():
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64)
    c = haar(x)
    assert torch.allclose(ihaar(c), x, atol=1e-12)
    assert torch.allclose(c.pow(2).sum(), x.pow(2).sum())


def test_pure_field_expands_to_itself_exactly():
    """(iii): expanding DC(E) at sigma = 1 with field noise returns E bit for bit."""
    f = NoiseField.sample((1, 4, 16, 16), 3)
    out = HaarExpander().expand(ED, f.at((8, 8)), 1.0, None, f)
    assert torch.equal(out, f.fine)
    assert torch.equal(HaarExpander(eps="field").expand(ED, f.at((8, 8)), 1.0, f.at((8, 8)), f), f.fine)


@pytest.mark.parametrize("sigma", [0.9, 0.5, 0.1])
@pytest.mark.parametrize("details", ["field", "fresh"])
def test_exact_flow_matching_statistics(sigma, details):
    """(i): a state on the coarse path expands onto the fine path with nearest-upsampled signal."""
    f = _field()
    x0 = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    eps_c = f.at((8, 8))
    coarse = (1 - sigma) * x0 + sigma * eps_c
    out = HaarExpander(details=details).expand(ED, coarse, sigma, eps_c, f)
    noise = (out - (1 - sigma) * upsample_nearest(x0)) / sigma
    assert torch.allclose(dc(noise), eps_c, atol=1e-12)  # the fine noise's DC is the coarse noise
    if details == "field":
        assert torch.allclose(noise, f.fine, atol=1e-12)


def test_fresh_details_are_unit_white_noise():
    f = NoiseField.sample((4, 16, 64, 64), 1)
    out = HaarExpander(details="fresh").expand(ED, f.at((32, 32)), 1.0, None, f)
    assert abs(out.std().item() - 1) < 0.01
    lag1 = (out[..., :, 1:] * out[..., :, :-1]).mean().item()
    assert abs(lag1) < 0.01


def test_energy_preserved():
    """(ii): the coefficient -> children map is an isometry, block by block."""
    f = _field()
    sigma, coarse, eps = (
        0.6,
        torch.randn(2, 4, 8, 8, dtype=torch.float64),
        torch.randn(2, 4, 8, 8, dtype=torch.float64),
    )
    out = HaarExpander(details="fresh").expand(ED, coarse, sigma, eps, f)
    coef = haar(out)
    assert torch.allclose(coef[:, 0], 2 * coarse - sigma * eps, atol=1e-12)  # the DC is the coarse token's
    blocks_out = out.unfold(-2, 2, 2).unfold(-2, 2, 2).pow(2).sum((-1, -2))
    assert torch.allclose(blocks_out, coef.pow(2).sum(1), atol=1e-10)


def test_token_space_and_replicate_shapes():
    f = _field()
    coarse = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    assert HaarExpander(space="token").expand(ED, coarse, 0.5, None, f).shape == (2, 4, 16, 16)
    rep = ReplicateExpander().expand(ED, coarse, 0.5, None, f)
    # a packed token's whole 2x2 pattern is copied to each child token: the child grid repeats the parent
    assert torch.equal(rep[..., 0:2, 0:2], coarse[..., 0:2, 0:2]) and torch.equal(
        rep[..., 0:2, 2:4], coarse[..., 0:2, 0:2]
    )
    with pytest.raises(ValueError, match="details must be one of"):
        HaarExpander(details="zero")


def test_coherent_renoise_moves_along_the_path():
    e, z = 0.6, 4.0
    s = rewind(e, z)
    x0, noise = torch.randn(1, 10, 8, dtype=torch.float64), torch.randn(1, 10, 8, dtype=torch.float64)
    out = CoherentField().renoise(e * x0 + (1 - e) * noise, _t(e, s, noise))
    assert torch.allclose(out, s * x0 + (1 - s) * noise, atol=1e-12)
    assert s == pytest.approx(e / (z * (1 - e) + e)) and rewind(e, 1.0) == pytest.approx(e)


def test_iid_renoise_statistics():
    e, s = 0.5, 0.2
    x0 = torch.zeros(1, 200_000, 1, dtype=torch.float64)
    eps = torch.randn_like(x0)
    fresh = lambda shape: torch.randn(shape, dtype=torch.float64)
    out = IID().renoise(e * x0 + (1 - e) * eps, _t(e, s, eps, fresh=fresh))
    assert abs(out.std().item() - (1 - s)) < 0.01


def test_ralu_correlated_whitens_replicated_blocks():
    """RALU's NT: replicated (perfectly correlated) noise becomes white with variance (1-s)^2."""
    e, z = 0.3, 6.317
    s = rewind(e, z)
    n_blocks = 50_000
    eps = torch.randn(1, n_blocks, 1, dtype=torch.float64).repeat_interleave(4, 1)  # 4 identical children
    groups = torch.arange(4 * n_blocks).view(-1, 4)
    out = RaluCorrelated().renoise((1 - e) * eps, _t(e, s, torch.randn_like(eps), z=z, groups=groups))
    blocks = out.view(n_blocks, 4)
    cov = blocks.T @ blocks / n_blocks
    assert torch.allclose(cov, (1 - s) ** 2 * torch.eye(4, dtype=torch.float64), atol=0.01)
    with pytest.raises(ValueError, match="Z >= 2"):
        RaluCorrelated().renoise(eps, _t(e, s, eps, z=1.5))


def test_no_renoise_keeps_the_state_and_refuses_a_rewind():
    x = torch.randn(1, 6, 4)
    assert NoRenoise().renoise(x, _t(0.5, 0.5, x)) is x
    with pytest.raises(ValueError, match="cannot rewind progress 0.5 to 0.2"):
        NoRenoise().renoise(x, _t(0.5, 0.2, x))


def test_field_levels_are_unit_variance_and_consistent():
    f = NoiseField.sample((2, 16, 64, 64), 0)
    assert torch.equal(f.at((32, 32)), dc(f.fine)) and torch.equal(f.at((16, 16)), dc(dc(f.fine)))
    for size in [(32, 32), (16, 16), (11, 11), (8, 8)]:
        assert abs(f.at(size).std().item() - 1) < 0.1, size
    assert torch.equal(NoiseField.sample((1, 4, 8, 8), 5).fine, NoiseField.sample((1, 4, 8, 8), 5).fine)
