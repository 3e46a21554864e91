"""Block-wise offload (models.offload): the offload path gives the resident path's output bit for bit.

On the CPU the device and the home are both the CPU, but every block is still copied in before it runs and
evicted after, so the prefetch window, the eviction and the parameter swapping run as on CUDA (the stream
helper does nothing there). The CUDA test checks the same with pinned memory and the side stream.
"""

import pytest
import torch
from torch import nn

from models.flux import FLUX_TINY, Flux
from models.init import randomized_module
from models.offload import BlockOffload, Streams, block_lists, measure, offload_blocks
from models.qwen_image import QWEN_IMAGE_TINY, QwenImage, official_ids


def flux_inputs(b=2, n=8, l=5, device="cpu"):
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(b, n, 16, generator=g), torch.randn(b, n, 3, generator=g),
            torch.randn(b, l, 24, generator=g), torch.zeros(b, l, 3), torch.rand(b, generator=g),
            torch.randn(b, 20, generator=g), torch.full((b,), 2.5))  # fmt: skip
    return tuple(a.to(device) for a in args)


def qwen_inputs(b=2, device="cpu"):
    g = torch.Generator().manual_seed(2)
    img_ids, txt_ids = official_ids([(1, 4, 4)], 6)
    img = torch.randn(b, 16, 16, generator=g)
    txt = torch.randn(b, 6, 24, generator=g)
    return tuple(t.to(device) for t in (img, img_ids, txt, txt_ids, torch.rand(b, generator=g)))


def homes(model):
    return [(n, t.data_ptr()) for n, t in model.state_dict(keep_vars=True).items()]


@pytest.mark.parametrize("resident", [1, 2, 3, 10])
@torch.no_grad()
def test_flux_offload_is_bit_exact(resident):
    model = randomized_module(lambda: Flux(FLUX_TINY))
    x = flux_inputs()
    ref = model(*x)
    before = homes(model)
    off = offload_blocks(model, "cpu", resident)
    out, again = model(*x), model(*x)
    assert torch.equal(out, ref) and torch.equal(again, ref)
    n = FLUX_TINY.depth + FLUX_TINY.depth_single_blocks
    assert off.transfers == 2 * n  # every block copied in once per forward
    assert off.peak_resident == min(resident, n) and not off.loaded  # bounded, and nothing left after
    assert homes(model) == before  # the home tensors are put back, never replaced or copied
    assert model.block_offload is off


@pytest.mark.parametrize("resident", [1, 2])
@torch.no_grad()
def test_qwen_offload_is_bit_exact(resident):
    model = randomized_module(lambda: QwenImage(QWEN_IMAGE_TINY))
    x = qwen_inputs()
    ref = model(*x)
    off = offload_blocks(model, "cpu", resident)
    assert torch.equal(model(*x), ref)
    assert off.transfers == QWEN_IMAGE_TINY.num_layers and off.peak_resident == resident


@torch.no_grad()
def test_blocks_run_on_copies_and_window_is_bounded():
    model = randomized_module(lambda: Flux(FLUX_TINY))
    off = offload_blocks(model, "cpu", 2)
    home = model.single_blocks[0].linear1.weight
    seen = {}

    def probe(m, args):
        seen["ptr"] = m.linear1.weight.data_ptr()
        seen["loaded"] = sorted(off.loaded)

    h = model.single_blocks[0].register_forward_pre_hook(probe)  # runs after the offload's own hook
    model(*flux_inputs())
    h.remove()
    assert seen["ptr"] != home.data_ptr()  # the block ran on a copy
    assert seen["loaded"] == [2, 3]  # block 2 (first single block) and the prefetched block 3
    assert model.single_blocks[0].linear1.weight is home


@torch.no_grad()
def test_out_of_order_call_keeps_the_bound_and_home_changes_are_seen():
    model = randomized_module(lambda: Flux(FLUX_TINY))
    off = offload_blocks(model, "cpu", 2)
    x = flux_inputs()
    ref = model(*x)
    off._fetch(3)  # a stale prefetch outside the next window
    block = model.double_blocks[0]
    block.img_mlp[0].weight.mul_(1.5)  # changes the home weight, as a fused LoRA does
    out = model(*x)
    assert off.peak_resident == 2 and not off.loaded
    assert not torch.equal(out, ref)


def test_errors():
    model = randomized_module(lambda: Flux(FLUX_TINY))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="resident blocks must be an integer >= 1"):
            BlockOffload(list(model.double_blocks), "cpu", bad)
    offload_blocks(model, "cpu")
    with pytest.raises(ValueError, match="offloaded already"):
        offload_blocks(model, "cpu")
    with pytest.raises(TypeError, match="has no block list"):
        offload_blocks(nn.Linear(2, 2), "cpu")
    assert [len(x) for x in block_lists(Flux(FLUX_TINY))] == [2, 2]


def test_remove_restores_plain_running():
    model = randomized_module(lambda: Flux(FLUX_TINY))
    x = flux_inputs()
    off = offload_blocks(model, "cpu", 1)
    off.remove()
    with torch.no_grad():
        model(*x)
    assert off.transfers == 0


def test_streams_and_measure_off_cuda():
    s = Streams(torch.device("cpu"))
    with s.copying():
        pass
    assert s.record() is None and s.side is None
    s.wait(None)
    r = measure(lambda: 3, "cpu")
    assert r["result"] == 3 and r["peak_bytes"] is None and r["seconds"] >= 0


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_offload_is_bit_exact_and_lean():
    model = randomized_module(lambda: Flux(FLUX_TINY))
    x = flux_inputs(device="cuda")
    ref = model.cuda()(*x)
    model = randomized_module(lambda: Flux(FLUX_TINY))
    off = offload_blocks(model, "cuda", 2)
    assert model.double_blocks[0].img_mlp[0].weight.is_pinned()
    assert model.img_in.weight.is_cuda and not model.double_blocks[0].img_mlp[0].weight.is_cuda
    r = measure(lambda: model(*x), "cuda")
    assert torch.equal(r["result"], ref) and off.peak_resident == 2 and r["peak_bytes"] > 0


# ----------------------------------------------------------------------------------------------- pipelines
@pytest.mark.parametrize("option,value,match", [
    ("transformer_offload", 0, "transformer_offload must be None or a number of resident blocks >= 1"),
    ("transformer_offload", True, "transformer_offload must be None"),
    ("fp8", "yes", "fp8 must be True or False"),
    ("vae_tiling", 1, "vae tile must be an integer >= 2"),
    ("vae_tiling", 8.0, "vae tile must be an integer >= 2"),
    ("text_encoder_offload", 0, "text_encoder_offload must be None or a number of resident blocks >= 1"),
])  # fmt: skip
def test_bad_pipeline_options_fail_before_loading(option, value, match):
    from specedit.kontext.pipeline import KontextPipeline
    from specedit.qwen.pipeline import QwenEditPipeline

    for cls in (KontextPipeline, QwenEditPipeline):
        with pytest.raises(ValueError, match=match):  # the folder does not exist: nothing was loaded
            cls.from_pretrained("/nonexistent/folder", **{option: value})


@pytest.fixture(scope="module")
def kontext_repo(tmp_path_factory):
    from refs_kontext import write_tiny_kontext_repo

    return write_tiny_kontext_repo(tmp_path_factory.mktemp("kontext") / "FLUX.1-Kontext-dev")


def aligned(model, lists=None):
    """``model`` with its blocks' memory-mapped weights replaced by copies. A mapped weight sits where the file
    puts it (often not 64-byte aligned) and the CPU matmul kernels round differently there, so the bit-exact
    reference for the offload path (whose blocks run on fresh, aligned copies) has its blocks on aligned
    copies, as a GPU-resident transformer has."""
    for m in (m for lst in lists or block_lists(model) for m in lst.modules()):
        for k, t in m._parameters.items():
            if t is not None:
                m._parameters[k] = torch.nn.Parameter(t.detach().clone(), requires_grad=False)
    return model


def _image(h, w, seed=5):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@torch.no_grad()
def test_kontext_pipeline_lean_options(kontext_repo):
    from models.fp8 import FP8Linear
    from models.tiling import TiledVAE
    from specedit.kontext.pipeline import KontextPipeline

    image, kw = _image(64, 96), dict(steps=2, seed=3, height=64, width=96)
    base = KontextPipeline.from_pretrained(kontext_repo)
    aligned(base.model)
    ref = base.edit(image, "a red kite", output="np", **kw)
    off = KontextPipeline.from_pretrained(kontext_repo, transformer_offload=1)
    assert off.model.block_offload.resident == 1
    out = off.edit(image, "a red kite", output="np", **kw)
    assert torch.equal(out.latent, ref.latent) and (out.images == ref.images).all()
    lean = KontextPipeline.from_pretrained(kontext_repo, transformer_offload=2, fp8=True, vae_tiling=8)
    assert isinstance(lean.model.double_blocks[0].img_mlp[0], FP8Linear)
    assert isinstance(lean.ae.module, TiledVAE) and lean.ae.module.tile == 8
    got = lean.edit(image, "a red kite", output="np", **kw)
    rel = float((got.latent - ref.latent).norm() / ref.latent.norm())
    assert rel < 0.05  # fp8 (measured 0.007)
    # 8-pixel tiles of a random tiny VAE: far from its untiled decode (seam bounds: tests/models/test_tiling.py)
    assert got.images.shape == ref.images.shape and abs(got.images - ref.images).mean() < 0.2


@pytest.fixture(scope="module")
def qwen_repo(tmp_path_factory):
    from refs_qwen_repo import write_qwen_edit_repo

    root = tmp_path_factory.mktemp("qwen") / "edit"
    write_qwen_edit_repo(root, seed=3)
    return root


@torch.no_grad()
def test_qwen_pipeline_offload_and_text_encoder_stays_mapped(qwen_repo):
    """Offload is bit-exact end to end; the VL encoder's CPU weights are views of the checkpoint's memory
    map before and after an edit (borrowed copies never replace them)."""
    from models.loading import file_span
    from specedit.qwen.pipeline import QwenEditPipeline

    image, kw = _image(96, 128), dict(steps=2, seed=1, output="latent")
    base = QwenEditPipeline.from_pretrained(qwen_repo, area=128 * 128)
    aligned(base.transformer)
    ref = base.edit(image, "a kite", **kw)
    pipe = QwenEditPipeline.from_pretrained(qwen_repo, area=128 * 128, transformer_offload=2)
    te = pipe.text_encoder
    before = {n: p.data_ptr() for n, p in te.named_parameters()}
    assert all(file_span(p) is not None for p in te.parameters())
    out = pipe.edit(image, "a kite", **kw)
    assert torch.equal(out.latent, ref.latent)
    assert {n: p.data_ptr() for n, p in te.named_parameters()} == before
    assert all(file_span(p) is not None for p in te.parameters())


@torch.no_grad()
def test_qwen_text_encoder_streaming_is_exact_and_keeps_the_map(qwen_repo):
    """text_encoder_offload: the VL encoder's vision blocks and decoder layers stream through the device one
    at a time from their memory-mapped home tensors (not pinned), and the edit is the borrowed-encoder one."""
    from models.loading import file_span
    from specedit.qwen.pipeline import QwenEditPipeline

    image, kw = _image(96, 128), dict(steps=2, seed=1, output="latent")
    base = QwenEditPipeline.from_pretrained(qwen_repo, area=128 * 128)
    te = base.text_encoder
    aligned(te, [te.visual.blocks, te.model.layers])
    ref = base.edit(image, "a kite", **kw)
    pipe = QwenEditPipeline.from_pretrained(qwen_repo, area=128 * 128, text_encoder_offload=1)
    te = pipe.text_encoder
    homes = [p for lst in (te.visual.blocks, te.model.layers) for p in lst.parameters()]
    ptrs = [p.data_ptr() for p in homes]
    assert torch.equal(pipe.edit(image, "a kite", **kw).latent, ref.latent)
    off = te.block_offload
    assert off.peak_resident == 1 and off.transfers >= len(te.visual.blocks) + len(te.model.layers)
    assert [p.data_ptr() for p in homes] == ptrs and all(file_span(p) is not None for p in homes)


def test_kontext_refuses_text_encoder_offload(kontext_repo):
    from specedit.kontext.pipeline import KontextPipeline

    with pytest.raises(ValueError, match="text_encoder_offload streams Qwen-Image-Edit's VL encoder"):
        KontextPipeline.from_pretrained(kontext_repo, text_encoder_offload=1)


def test_borrowed_elsewhere_keeps_the_memory_map(qwen_repo):
    """What the pipelines do around prompt encoding on another device, with the meta device standing in for
    a GPU: inside, the encoder holds copies there; after, the very same mapped CPU tensors."""
    from models.loading import file_span
    from specedit.pipeline import borrowed
    from specedit.qwen.pipeline import _load

    te = _load(qwen_repo, qwen_repo, "text_encoder", None, torch.device("cpu"))
    home = {n: p for n, p in te.named_parameters()}
    with borrowed(te, "meta") as m:
        assert {p.device.type for p in m.parameters()} == {"meta"}
    assert all(p is home[n] and file_span(p) is not None for n, p in te.named_parameters())


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_text_encoding_keeps_the_memory_map(qwen_repo):
    from models.loading import file_span
    from specedit.qwen.pipeline import QwenEditPipeline

    pipe = QwenEditPipeline.from_pretrained(qwen_repo, area=128 * 128, device="cuda", transformer_offload=2)
    te = pipe.text_encoder
    before = {n: p.data_ptr() for n, p in te.named_parameters()}
    pipe.edit(_image(96, 128), "a kite", steps=2, seed=1, output="latent")
    assert {n: p.data_ptr() for n, p in te.named_parameters()} == before
    assert all(p.device.type == "cpu" and file_span(p) is not None for p in te.parameters())
