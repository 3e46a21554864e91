"""VAE tiling (models.tiling): tile layout, blend weights, exactness on local maps, seam error bounds."""

import pytest
import torch

from models.flux_ae import FLUX_AE_TINY, AutoEncoder
from models.init import randomized_module
from models.qwen_image_vae import QWEN_IMAGE_VAE_TINY, QwenImageVAE
from models.tiling import TiledVAE, check_tiling, ramps, tile_starts, tiled


@pytest.mark.parametrize("size,tile,overlap", [(48, 16, 4), (50, 16, 4), (10, 8, 4), (16, 16, 4), (7, 16, 4),
                                               (100, 24, 0), (37, 12, 6)])  # fmt: skip
def test_tiles_cover_and_weights_partition_unity(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and min(starts[-1] + tile, size) == size
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # overlap at least as asked
    total = torch.zeros(size)
    for a, w in zip(starts, ramps(size, starts, tile)):
        assert (w > 0).all() and (w <= 1).all()
        total[a : a + len(w)] += w
    if all(b - a >= tile // 2 for a, b in zip(starts, starts[1:])):  # no pixel in three tiles
        torch.testing.assert_close(total, torch.ones(size))


def test_tiled_is_exact_for_a_local_map():
    x = torch.randn(2, 3, 40, 56)
    up = lambda t: (3 * t).repeat_interleave(2, -1).repeat_interleave(2, -2)  # noqa: E731
    torch.testing.assert_close(tiled(up, x, 16, 4, 1, 2), up(x), rtol=0, atol=1e-5)
    down = lambda t: torch.nn.functional.avg_pool2d(t, 4)  # noqa: E731
    torch.testing.assert_close(tiled(down, x, 4, 1, 4, 1), down(x), rtol=0, atol=1e-5)


VAES = {"flux": lambda: AutoEncoder(FLUX_AE_TINY), "qwen": lambda: QwenImageVAE(QWEN_IMAGE_VAE_TINY)}


@pytest.mark.parametrize("name", VAES)
@torch.no_grad()
def test_one_tile_is_untiled_and_shapes_pass_through(name):
    vae = randomized_module(VAES[name])
    wrapped = TiledVAE(vae, 32)
    z = torch.randn(1, vae.latent_channels, 16, 24)
    assert torch.equal(wrapped.decode(z), vae.decode(z)) and torch.equal(wrapped(z), vae.decode(z))
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    assert torch.equal(wrapped.encode(x), vae.encode(x))
    assert wrapped.config is vae.config and wrapped.latent_channels == vae.latent_channels
    assert wrapped.overlap == 8 and set(wrapped.decoder_features(z, ("mid",))) == {"mid"}


@pytest.mark.parametrize("name", VAES)
@torch.no_grad()
def test_seam_error_is_bounded(name):
    """Random weights, 48 x 64 latent, 3 x 3 tiles of 24 overlapping by 8: the tiled decode stays near the
    untiled one (benchmarks/vae_tiling.py prints the figures; max error measured 0.45 FLUX, 0.28 Qwen on
    outputs of range about 4 and 1)."""
    vae = randomized_module(VAES[name])
    z = torch.randn(1, vae.latent_channels, 48, 64)
    full = vae.decode(z)
    d = (TiledVAE(vae, 24, 8).decode(z) - full).abs()
    scale = float(full.abs().max())
    print(f"{name}: seam error max {float(d.max()):.4f} mean {float(d.mean()):.4f} (output max {scale:.2f})")
    assert float(d.mean()) < 0.03 * scale and float(d.max()) < 0.3 * scale
    z5 = TiledVAE(vae, 24, 8).decode(z[:, :, None]) if name == "qwen" else None
    assert z5 is None or z5.shape == (1, 3, 1, *full.shape[-2:])


@pytest.mark.parametrize("name", VAES)
@torch.no_grad()
def test_tiled_encode_runs_and_is_close(name):
    vae = randomized_module(VAES[name])
    x = torch.rand(1, 3, 128, 192) * 2 - 1
    full, t = vae.encode(x), TiledVAE(vae, 16, 4).encode(x)
    assert t.shape == full.shape
    assert float((t - full).abs().mean()) < 0.1 * float(full.abs().max())
    with pytest.raises(ValueError, match="multiple of"):
        TiledVAE(vae, 16).encode(x[..., :127])


def test_bad_tiling():
    for tile, overlap in ((1, 0), (1.5, 0), (True, 0), (16, 9), (16, -1), (16, 2.0)):
        with pytest.raises(ValueError, match="vae tile"):
            check_tiling(tile, overlap)
