"""The FLUX.1-Kontext adapter: official ids on full grids, fractional ids in mixed layouts, full-size costs."""

import math

import pytest
import torch

from models import flux, flux_ae
from models.packing import grid_ids
from models.work import Forward, VaeWork
from samplers.layout import Layout, mixed_indices
from specedit.kontext import KontextCosts, KontextEditor
from specedit.kontext.family import tiny_editor


def test_layout_ids_match_official_on_full_grids():
    editor = tiny_editor()
    assert torch.equal(editor.ids(Layout.full((8, 8))), grid_ids((8, 8)))
    assert torch.equal(editor.ids(Layout.full((4, 4))), grid_ids((4, 4)))
    # a mixed layout with every cell expanded places the children on the fine grid (in coarse units)
    everything = Layout.mixed(torch.ones(4, 4, dtype=torch.bool))
    _, children = mixed_indices(torch.ones(4, 4, dtype=torch.bool))
    assert torch.equal(editor.ids(everything), grid_ids((8, 8))[children] / 2)
    nothing = Layout.mixed(torch.zeros(4, 4, dtype=torch.bool))
    assert torch.equal(editor.ids(nothing), grid_ids((4, 4)))
    centred = Layout.mixed(torch.zeros(4, 4, dtype=torch.bool), align="center")
    assert torch.equal(editor.ids(centred)[:, 1:], grid_ids((4, 4))[:, 1:] + 0.25)


def test_full_size_costs():
    """1024^2 target + 1024^2 reference, 512 T5 tokens: 165.458 TFLOPs a forward; coarse references cost
    less; the batch multiplies; VAE work is the AE decoder counted on meta."""
    costs = KontextCosts(flux.FLUX_KONTEXT_DEV, flux_ae.FLUX_AE, 512, (64, 64))
    fwd = costs.cost(Forward("full", 4096, 1.0))
    assert round(fwd / 1e12, 3) == 165.458
    assert costs.cost(Forward("coarse", 1024, 2.0)) == flux.flops(flux.FLUX_KONTEXT_DEV, 2048, 512)["total"]
    assert math.isclose(costs.cost(Forward("full", 4096, 1.0, batch=2)), 2 * fwd)
    decode = costs.cost(VaeWork("decode", (128, 128)))
    feats = costs.cost(VaeWork("features", (128, 128), ("conv_in", "mid", "up0"), count=2))
    assert 0 < feats < 2 * decode


def test_bad_inputs_are_named_before_any_work():
    ed = tiny_editor()
    nan_txt = ed.txt.clone()
    nan_txt[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"txt \(1, 5, \d+\) contains NaN or inf"):
        KontextEditor(ed.model, ed.ae, nan_txt, ed.y, ed.source)
    with pytest.raises(ValueError, match="guidance must be finite, got nan"):
        KontextEditor(ed.model, ed.ae, ed.txt, ed.y, ed.source, guidance=float("nan"))
    with pytest.raises(
        ValueError,
        match="the source latent is torch.bfloat16 but the transformer's weights are torch.float32",
    ):
        KontextEditor(ed.model, ed.ae, ed.txt, ed.y, ed.source.bfloat16())
