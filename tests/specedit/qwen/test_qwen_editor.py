"""The Qwen-Image-Edit adapter: official ids, true CFG on one token set, costs (the shared invariants run in
``tests/specedit/test_conformance.py``)."""

import math
from dataclasses import replace

import pytest
import torch
from refs import max_rel_err, randomize_

from models import qwen_image, qwen_image_vae
from models.qwen_image import QWEN_IMAGE_TINY, QwenImage, official_ids
from models.qwen_image_vae import QWEN_IMAGE_VAE_TINY, QwenImageVAE
from models.work import Forward, VaeWork
from samplers.layout import Layout, mixed_indices, scaled_grid
from samplers.mixed_res import FullResSampler
from specedit.method import Baseline
from specedit.presets import methods
from specedit.protocols import Editor
from specedit.qwen.editor import QwenCosts, QwenEditor

GRID = (8, 12)  # fine token grid of the tiny source: non-square, divisible by 4


def tiny_qwen_editor(n_extra: int = 1, *, batch: int = 1, seed: int = 0, **kw) -> QwenEditor:
    """A random tiny editor: source (b, 4, 16, 24), ``n_extra`` references of other sizes before it (2509
    layout), prompts of 7 and 5 tokens (so the batched CFG forward pads and masks the negative one)."""
    g = torch.Generator().manual_seed(seed)
    model = randomize_(QwenImage(QWEN_IMAGE_TINY), seed=seed + 1).eval()
    vae = randomize_(QwenImageVAE(QWEN_IMAGE_VAE_TINY), seed=seed + 2).eval()
    rand = lambda *shape: torch.randn(1, *shape, generator=g).expand(batch, *shape).clone()
    source = rand(4, 2 * GRID[0], 2 * GRID[1])
    refs = tuple(rand(4, 14 - 4 * i, 8 + 2 * i) for i in range(n_extra))  # grids (7, 4), (5, 5): odd sides
    return QwenEditor(model, vae, rand(7, 24), source, neg_txt=rand(5, 24), refs=refs, **kw)


@pytest.fixture(scope="module")
def editor():
    return tiny_qwen_editor()


def _shapes(ed: QwenEditor, factor: float = 1.0) -> list[tuple[int, int, int]]:
    """img_shapes as the pipelines build them, with the references at ``factor``."""
    return [(1, *scaled_grid(ed.grid, factor))] + [(1, *scaled_grid(g, factor)) for g in ed.ref_grids]


@pytest.mark.parametrize("n_extra", [0, 1, 2], ids=["edit", "2509-two-images", "2509-three-images"])
def test_ids_on_full_layouts_are_official(n_extra):
    ed = tiny_qwen_editor(n_extra)
    for length in (7, 5, 0):
        img, txt = ed.ids(Layout.full(ed.grid), length)
        want_img, want_txt = official_ids(_shapes(ed), length)
        assert torch.equal(img, want_img) and torch.equal(txt, want_txt)
    # the draft: every image 4x coarser per side, still the official ids of those grids
    img, txt = ed.ids(Layout.full(scaled_grid(ed.grid, 4), ref_factor=4))
    want_img, want_txt = official_ids(_shapes(ed, 4), 7)
    assert torch.equal(img, want_img) and torch.equal(txt, want_txt)


def test_ids_of_mixed_layouts(editor):
    """Children sit at half their fine centred coordinates; text starts after the coarse extent."""
    hc, wc = GRID[0] // 2, GRID[1] // 2
    n_ref = sum(g[0] * g[1] for _, *g in _shapes(editor, 2)[1:])
    coarse_img, coarse_txt = official_ids(_shapes(editor, 2), 7)
    everything = torch.ones(hc, wc, dtype=torch.bool)
    img, txt = editor.ids(Layout.mixed(everything))
    _, children = mixed_indices(everything)
    fine = official_ids([(1, *GRID)], 0)[0][children]
    assert torch.equal(img[: len(children), 1:], fine[:, 1:] / 2) and not img[: len(children), 0].any()
    assert torch.equal(img[len(children) :], coarse_img[-n_ref:]) and torch.equal(txt, coarse_txt)
    nothing = torch.zeros(hc, wc, dtype=torch.bool)
    assert torch.equal(editor.ids(Layout.mixed(nothing))[0], coarse_img)
    centred = editor.ids(Layout.mixed(nothing, align="center"))[0]
    assert torch.equal(centred[: hc * wc, 1:], coarse_img[: hc * wc, 1:] + 0.25)


def test_satisfies_the_editor_protocol(editor):
    assert isinstance(editor, Editor)
    assert editor.grid == GRID and editor.ref_grids == ((7, 4), (8, 12))


def _record_forwards(ed: QwenEditor, layout: Layout):
    calls = []
    hook = ed.model.register_forward_pre_hook(lambda _m, args: calls.append([a.clone() for a in args[:2]]))
    try:
        x = torch.randn(ed.source.shape[0], len(layout), 16)
        v = ed.denoiser(layout)(x, torch.tensor(0.7))
    finally:
        hook.remove()
    return x, v, calls


@pytest.mark.parametrize("batched", [True, False])
@torch.no_grad()
def test_cfg_branches_share_one_token_set(batched):
    """Batched: one forward of 2b with the same image tokens and ids in both halves. Sequential: two forwards
    of b with identical image inputs. Either way only the text differs; checked on a mixed layout."""
    ed = tiny_qwen_editor(batch=2, batched_cfg=batched)
    mask = torch.zeros(GRID[0] // 2, GRID[1] // 2, dtype=torch.bool)
    mask[1, 2:5] = True
    layout = Layout.mixed(mask)
    x, v, calls = _record_forwards(ed, layout)
    assert v.shape == x.shape
    img_ids, _ = ed.ids(layout)
    if batched:
        assert len(calls) == 1
        img, ids = calls[0]
        assert img.shape[0] == 4 and torch.equal(img[:2], img[2:]) and torch.equal(img[:2, : len(layout)], x)
        assert ids.ndim == 2 and torch.equal(ids, img_ids)  # one id table for the whole 2b batch
    else:
        assert len(calls) == 2
        (img_c, ids_c), (img_u, ids_u) = calls
        assert img_c.shape[0] == 2 and torch.equal(img_c, img_u) and torch.equal(ids_c, ids_u)
        assert torch.equal(ids_c, img_ids)


@torch.no_grad()
def test_batched_and_sequential_cfg_agree():
    for name in ("baseline", "specedit-9"):
        m = Baseline(FullResSampler(4)) if name == "baseline" else methods("qwen")[name]
        batched = m.run(tiny_qwen_editor(batched_cfg=True), seed=3)
        sequential = m.run(tiny_qwen_editor(batched_cfg=False), seed=3)
        assert max_rel_err(batched.latent, sequential.latent) <= 1e-6, name


@torch.no_grad()
def test_without_negative_prompt_one_forward_of_the_conditional_branch(editor):
    ed = tiny_qwen_editor(0)
    plain = QwenEditor(ed.model, ed.vae, ed.txt, ed.source, cfg_scale=7.0)
    layout = Layout.full(GRID)
    x, v, calls = _record_forwards(plain, layout)
    assert len(calls) == 1 and calls[0][0].shape[0] == 1
    refs, _ = plain.reference(1.0)
    img_ids, txt_ids = plain.ids(layout)
    want = qwen_image.target_velocity(plain.model, x, 0.7, plain.txt, txt_ids, refs=refs, img_ids=img_ids)
    assert torch.equal(v, want)
    assert plain.costs.neg_text_tokens is None


def test_full_size_forward_flops():
    """1024^2 target + 1024^2 reference, 1400 text tokens in both branches: 2 x 198.236 TFLOPs;
    coarser references cost less; VAE events count the 2-D decoder we run."""
    costs = QwenCosts(
        qwen_image.QWEN_IMAGE_EDIT, qwen_image_vae.QWEN_IMAGE_VAE, 1400, 1400, (64, 64), ((64, 64),)
    )
    fwd = costs.cost(Forward("full", 4096, 1.0))
    assert math.isclose(fwd, 2 * qwen_image.flops(qwen_image.QWEN_IMAGE_EDIT, 8192, 1400)["total"])
    assert round(fwd / 2e12, 3) == 198.236
    coarse = costs.cost(Forward("coarse", 1024, 2.0))
    assert math.isclose(coarse, 2 * qwen_image.flops(qwen_image.QWEN_IMAGE_EDIT, 2048, 1400)["total"])
    one_branch = replace(costs, neg_text_tokens=None)
    assert one_branch.cost(Forward("full", 4096, 1.0)) == fwd / 2
    decode = costs.cost(VaeWork("decode", (128, 128)))
    assert decode == qwen_image_vae.flops(qwen_image_vae.QWEN_IMAGE_VAE, 1024, 1024)["decode"]
    feats = costs.cost(VaeWork("features", (128, 128), ("conv_in", "mid", "up0"), count=2))
    assert 0 < feats < 2 * decode
    with pytest.raises(TypeError, match="cannot price"):
        costs.cost({"kind": "encode"})
    with pytest.raises(
        ValueError, match=r"VaeWork.op must be one of \('decode', 'features', 'encode'\), got 'up'"
    ):
        VaeWork("up", (8, 8))


def test_bad_editor_inputs(editor):
    m, v, txt = editor.model, editor.vae, editor.txt
    with pytest.raises(ValueError, match="multiple of 4"):
        QwenEditor(m, v, txt, torch.zeros(1, 4, 18, 24))
    with pytest.raises(ValueError, match=r"source must be \(b, 4, H, W\)"):
        QwenEditor(m, v, txt, torch.zeros(1, 16, 16, 24))
    with pytest.raises(ValueError, match=r"txt must be \(1, l, 24\)"):
        QwenEditor(m, v, torch.zeros(1, 7, 32), editor.source)
    with pytest.raises(ValueError, match="neg_txt is None but its mask is given"):
        QwenEditor(m, v, txt, editor.source, neg_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match=r"refs\[0\] must be"):
        QwenEditor(m, v, txt, editor.source, refs=(torch.zeros(1, 4, 7, 8),))
