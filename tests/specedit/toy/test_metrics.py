"""Image and token-set metrics of the toy eval on hand-made tensors."""

import math

import pytest
import torch

from specedit.toy import metrics


def _images(b=2, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def test_psnr_identical_is_inf_and_known_mse_gives_known_value():
    a = _images()
    assert torch.isinf(metrics.psnr(a, a)).all()
    b = a + 0.1  # mse 0.01 -> 10 log10(4 / 0.01)
    assert metrics.psnr(a, b) == pytest.approx([10 * math.log10(400)] * 2, rel=1e-5)
    assert metrics.psnr(a, b).shape == (2,)


def test_psnr_in_a_region_only_sees_that_region():
    a = torch.zeros(1, 3, 8, 8)
    b = a.clone()
    b[..., :4, :] = 0.2  # top half off by 0.2, bottom half exact
    top = torch.zeros(8, 8, dtype=torch.bool)
    top[:4] = True
    assert metrics.psnr(a, b, top) == pytest.approx([10 * math.log10(4 / 0.04)], rel=1e-5)
    assert torch.isinf(metrics.psnr(a, b, ~top)).all()
    assert metrics.psnr(a, b) == pytest.approx([10 * math.log10(4 / 0.02)], rel=1e-5)  # half the pixels
    assert torch.isnan(metrics.psnr(a, b, torch.zeros(8, 8, dtype=torch.bool))).all()  # empty region
    per_sample = torch.stack([top, ~top])  # (b, H, W) masks
    out = metrics.psnr(a.expand(2, -1, -1, -1), b.expand(2, -1, -1, -1), per_sample)
    assert out[0] == pytest.approx(20.0, rel=1e-5) and torch.isinf(out[1])


def test_ssim_identical_is_one_and_drops_with_noise():
    a = _images(h=32, w=32)
    assert metrics.ssim(a, a) == pytest.approx([1.0, 1.0], abs=1e-6)
    noisy = a + 0.3 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    s = metrics.ssim(a, noisy)
    assert (s < 0.9).all() and (s > -1).all()
    half = a.clone()
    half[..., 16:, :] = noisy[..., 16:, :]  # rows 16+ noisy
    far = torch.zeros(32, 32, dtype=torch.bool)
    far[:10] = True  # more than the window's radius (5) above the noise
    assert metrics.ssim(a, half, far) == pytest.approx([1.0, 1.0], abs=1e-5)
    assert (metrics.ssim(a, half, ~far) < 0.95).all()
    assert metrics.ssim_map(a, half).shape == a.shape


def test_shape_errors():
    with pytest.raises(ValueError, match="one shape"):
        metrics.psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 4))
    with pytest.raises(ValueError, match="mask must be"):
        metrics.psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not divide"):
        metrics.coarse_mask(torch.zeros(10, 10, dtype=torch.bool), (3, 3))


def test_coarse_mask_marks_cells_with_any_pixel():
    m = torch.zeros(2, 8, 8, dtype=torch.bool)
    m[0, 0, 0] = True  # cell (0, 0)
    m[0, 5, 7] = True  # cell (1, 1) of a 2 x 2 grid of 4 px cells
    cells = metrics.coarse_mask(m, (2, 2))
    assert cells.tolist() == [[[True, False], [False, True]], [[False, False], [False, False]]]
    assert metrics.coarse_mask(m[0], (4, 4)).shape == (1, 4, 4)


def test_iou_precision_recall():
    pred = torch.tensor([[[1, 1], [0, 0]]], dtype=torch.bool)
    true = torch.tensor([[[1, 0], [1, 0]]], dtype=torch.bool)
    assert metrics.iou(pred, true).tolist() == pytest.approx([1 / 3])
    assert metrics.precision(pred, true).tolist() == pytest.approx([1 / 2])
    assert metrics.recall(pred, true).tolist() == pytest.approx([1 / 2])
    assert metrics.iou(true, true).tolist() == [1.0]
    empty = torch.zeros(1, 2, 2, dtype=torch.bool)
    assert math.isnan(metrics.iou(empty, empty)[0]) and math.isnan(metrics.precision(empty, true)[0])
    assert metrics.recall(empty, true).tolist() == [0.0] and math.isnan(metrics.recall(pred, empty)[0])
    batch = torch.stack([pred[0], true[0]])  # per-sample values, broadcast against one true mask
    assert metrics.iou(batch, true[0]).tolist() == pytest.approx([1 / 3, 1.0])
