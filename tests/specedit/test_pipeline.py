"""The one edit API (``specedit.pipeline``): the same ``edit`` on every family, input forms, seeds, methods, the
scheduler config, the offload wrapper on memory-mapped weights, batch stacking, and the toy editor's edit."""

import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from models.loading import load_checkpoint, open_checkpoint
from samplers.mixed_res import FullResSampler
from samplers.schedules import FLUX_SCHEDULE, QWEN_SCHEDULE, ShiftSchedule, read_schedule
from specedit.kontext.pipeline import KontextPipeline
from specedit.method import Baseline, EditResult
from specedit.pipeline import (
    EditOutput,
    EditPipeline,
    OnDemand,
    borrowed,
    resolve_method,
    resolve_seed,
    split_batch,
    stack_editors,
    stack_results,
)
from specedit.qwen.editor import QwenEditor
from specedit.qwen.pipeline import QwenEditPipeline
from verify.verifiers import Verdict


def _image(h=32, w=48, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_every_family_has_the_same_edit():
    """One ``edit`` (EditPipeline's) with the same keywords and defaults on both pipelines."""
    kontext, qwen = inspect.signature(KontextPipeline.edit), inspect.signature(QwenEditPipeline.edit)
    assert kontext == qwen == inspect.signature(EditPipeline.edit)
    assert [n for n, p in kontext.parameters.items() if p.kind == p.KEYWORD_ONLY] == [
        "method", "seed", "generator", "steps", "guidance", "true_cfg_scale", "negative_prompt", "height", "width",
        "batched_cfg", "callback", "progress", "output",
    ]  # fmt: skip
    assert (KontextPipeline.default_steps, QwenEditPipeline.default_steps) == (28, 50)
    assert inspect.signature(KontextPipeline.prepare) == inspect.signature(QwenEditPipeline.prepare)


def test_methods_and_steps():
    assert resolve_method("baseline", "kontext", 7) == Baseline(FullResSampler(7))
    assert resolve_method("specedit-18", "qwen", 50).sampler.steps == (5, 8, 5)
    obj = Baseline(FullResSampler(3))
    assert resolve_method(obj, "toy", 50) is obj
    for steps in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=rf"steps must be >= 1 \(an integer\), got {steps!r}"):
            resolve_method("baseline", "kontext", steps)
    with pytest.raises(ValueError, match=r"steps must be >= 1 \(an integer\), got 0"):
        resolve_method("specedit-18", "kontext", 0)  # checked for presets too: never silently replaced
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        resolve_method("fast", "kontext", 28)
    with pytest.raises(ValueError, match="an object with run"):
        resolve_method(42, "kontext", 28)


def test_seeds_and_generators():
    assert resolve_seed(None, None) == 0 and resolve_seed(9, None) == 9
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    seed = resolve_seed(None, g1)
    assert (
        seed
        == resolve_seed(None, g2)
        == int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(4)))
    )
    assert resolve_seed(None, g1) != seed  # the generator advanced
    with pytest.raises(ValueError, match="give seed or generator, not both"):
        resolve_seed(1, g1)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        resolve_seed(-1, None)
    with pytest.raises(ValueError, match="generator must be a torch.Generator, got int"):
        resolve_seed(None, 3)


def test_batch_forms():
    a, b, c = _image(seed=1), _image(seed=2), _image(seed=3)
    one = split_batch([a, b], "p")  # a string: one edit with two images
    assert len(one) == 1 and len(one[0].images) == 2 and one[0].negative is None
    shared = split_batch(a, ["p", "q"], "n")  # one image shared by two edits, opened once
    assert [s.prompt for s in shared] == ["p", "q"] and shared[0].images[0] is shared[1].images[0]
    per = split_batch([a, [b, c]], ["p", "q"], ["n", "m"])
    assert [len(s.images) for s in per] == [1, 2] and [s.negative for s in per] == ["n", "m"]
    arr = split_batch(np.zeros((8, 8, 3), np.uint8), "p")[0].images[0]
    assert isinstance(arr, Image.Image) and arr.size == (8, 8)
    t = split_batch(torch.zeros(3, 8, 8), "p")[0].images[0]
    assert t.shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="2 prompts need one image \\(shared\\) or 2 image entries, got 1"):
        split_batch([a], ["p", "q"])
    with pytest.raises(ValueError, match="prompts must be a string or a non-empty list of strings"):
        split_batch(a, [])
    with pytest.raises(ValueError, match="edit 1 has no input image"):
        split_batch([a, []], ["p", "q"])
    with pytest.raises(ValueError, match=r"images of edit 0, item 0: an array must be uint8 \(H, W, 3\)"):
        split_batch(np.zeros((8, 8), np.float32), "p")
    with pytest.raises(ValueError, match="images of edit 0, item 1 must be a PIL image, a path"):
        split_batch([a, 5], "p")


def test_scheduler_config(tmp_path):
    path = tmp_path / "scheduler_config.json"
    assert read_schedule(path, FLUX_SCHEDULE) is FLUX_SCHEDULE  # no file: the family's default
    path.write_text(json.dumps({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9,
                                "shift_terminal": 0.02}))  # fmt: skip
    assert read_schedule(path, QWEN_SCHEDULE) == ShiftSchedule(256, 4096, 0.5, 0.9, 0.02)
    path.write_text('{"use_dynamic_shifting": true,\n "max_shift": 1.15,,}')
    with pytest.raises(ValueError, match=r"scheduler_config.json is not valid JSON: .* at line 2, column"):
        read_schedule(path, FLUX_SCHEDULE)
    path.write_text(json.dumps({"use_dynamic_shifting": False, "shift": 3.0}))  # a fixed shift
    assert read_schedule(path, FLUX_SCHEDULE).shift(4096) == 3.0
    path.write_text(json.dumps({"use_dynamic_shifting": True, "use_karras_sigmas": True}))
    with pytest.raises(ValueError, match="scheduler_config.json sets use_karras_sigmas=true"):
        read_schedule(path, FLUX_SCHEDULE)


@pytest.fixture
def mapped_linear(tmp_path):
    """A Linear whose weights are zero-copy views of a memory-mapped safetensors file."""
    torch.manual_seed(0)
    src = torch.nn.Linear(8, 4)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "lin.safetensors")
    with torch.device("meta"):
        lin = torch.nn.Linear(8, 4)
    return load_checkpoint(lin, open_checkpoint(tmp_path / "lin.safetensors")), src


def test_offload_wrapper_keeps_the_memory_map(mapped_linear):
    """Borrowing swaps copies in and the mapped home tensors back: same storage, same values; OnDemand computes
    what the resident module computes."""
    lin, src = mapped_linear
    ptrs = [p.data_ptr() for p in lin.parameters()]
    with borrowed(lin, "meta") as m:
        assert m is lin and {p.device.type for p in lin.parameters()} == {"meta"}
    assert [p.data_ptr() for p in lin.parameters()] == ptrs and isinstance(lin.weight, torch.nn.Parameter)
    x = torch.randn(3, 8, dtype=torch.float64)
    wrapped = OnDemand(lin, "cpu")
    assert wrapped.dtype == torch.float32 and wrapped.out_features == 4  # attributes pass through
    assert torch.equal(wrapped(x), src(x.float())) and [p.data_ptr() for p in lin.parameters()] == ptrs


@pytest.mark.gpu
def test_offload_wrapper_on_cuda_keeps_the_memory_map(mapped_linear):
    """On CUDA: the call runs on the input's device on copies; the mapped CPU weights are untouched."""
    lin, src = mapped_linear
    ptrs = [p.data_ptr() for p in lin.parameters()]
    x = torch.randn(3, 8)
    out = OnDemand(lin, "cpu")(x.cuda())
    assert out.device.type == "cuda" and torch.allclose(out.cpu(), src(x), atol=1e-6)
    assert [p.data_ptr() for p in lin.parameters()] == ptrs and {p.device.type for p in lin.parameters()} == {
        "cpu"
    }


def test_stack_results_and_editors():
    """Per-sample results stack into one (tensors concatenated, events joined, seconds summed); batch-1 editors
    stack with their prompts padded to a common length and masked."""
    v = lambda m: Verdict(mask=torch.full((1, 2, 2), m), score=torch.zeros(1, 2, 2), events=["vae"])
    runs = [EditResult(torch.zeros(1, 4, 8, 8), v(i == 1), None, ["f", "f"], {"full": 1.0}) for i in range(2)]
    out = stack_results(runs)
    assert out.latent.shape == (2, 4, 8, 8) and out.verdict.mask.shape == (2, 2, 2)
    assert (
        out.verdict.mask[1].all() and not out.verdict.mask[0].any() and out.verdict.events == ["vae", "vae"]
    )
    assert out.events == ["f"] * 4 and out.seconds == {"full": 2.0} and out.draft is None and out.nfe == 0

    class Model(torch.nn.Module):  # just enough of a Qwen-Image DiT and VAE for QwenEditor's checks
        config = type("C", (), {"in_channels": 16, "joint_attention_dim": 6})()

    vae = type("V", (), {"config": type("C", (), {"z_dim": 4})()})()
    eds = [QwenEditor(Model(), vae, torch.randn(1, n, 6), torch.randn(1, 4, 8, 8), refs=(torch.randn(1, 4, 4, 4),))
           for n in (3, 5)]  # fmt: skip
    ed = stack_editors(eds, text=(("txt", "txt_mask"), ("neg_txt", "neg_mask")))
    assert ed.txt.shape == (2, 5, 6) and ed.txt_mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert ed.source.shape == (2, 4, 8, 8) and ed.refs[0].shape == (2, 4, 4, 4) and ed.neg_txt is None
    assert torch.equal(ed.txt[0, :3], eds[0].txt[0]) and ed._refs == {} and ed._refs is not eds[0]._refs


def test_toy_editor_edit_returns_the_same_output():
    """ToyEditor.edit is the same API: an EditOutput, any output form, batches."""
    from specedit.toy.model import ToyEditor

    toy = ToyEditor.create(seed=0)
    img = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    out = toy.edit(img, "make the circle red", steps=2, seed=1)
    assert isinstance(out, EditOutput) and out.image.size == (96, 64) and out.result.nfe == 2
    both = toy.edit(img, ["make the circle red", "move the square left"], steps=2, seed=1, output="np")
    assert both.images.shape == (2, 64, 96, 3)
    assert np.allclose(both.images[0], out.pixels[0].permute(1, 2, 0).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="the toy editor has no guidance embedding"):
        toy.edit(img, "x", guidance=2.5)
    with pytest.raises(ValueError, match="the toy editor needs image sides in multiples of 32 px, got 50x40"):
        toy.edit(img[:40, :50], "x")
