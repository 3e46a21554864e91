"""Step-distilled Qwen-Image-Edit: a Lightning LoRA file, recognised by name, switches the pipeline to its
schedule (fixed shift 3), CFG off and its step count, and the edit equals diffusers' pipeline with the same
LoRA (``load_lora_weights`` + ``fuse_lora``) and Lightning's published scheduler config; the distilled presets
run on it and are refused on base weights; unloading restores the base model exactly."""

import pytest
import torch
from refs import LIGHTNING_CONFIG, max_rel_err
from refs_qwen import random_pil
from refs_qwen_repo import run_diffusers_edit, write_qwen_edit_repo
from safetensors.torch import save_file
from torch import nn

from models.packing import pack
from samplers.field import NoiseField
from samplers.schedules import LIGHTNING_SCHEDULE, QWEN_SCHEDULE, flow_sigmas
from specedit.qwen.pipeline import QwenEditPipeline

pytest.importorskip("peft")  # diffusers' LoRA loading needs it

AREA = 128 * 128
TOL = 1e-5
PROMPT = "make the sky purple"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    base = tmp_path_factory.mktemp("qwen-lightning")
    return {"root": base / "edit", "refs": write_qwen_edit_repo(base / "edit", plus=False, seed=3)}


def _lightning_file(model: nn.Module, folder, name="Qwen-Image-Edit-Lightning-4steps-V1.0-bf16.safetensors"):
    """A random diffusers-format LoRA (rank 2; PEFT files keep alpha in their config, so none here) on every
    linear of the blocks."""
    g = torch.Generator().manual_seed(11)
    sd = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and n.startswith("transformer_blocks."):
            sd[f"transformer.{n}.lora_A.weight"] = 0.2 * torch.randn(2, m.in_features, generator=g)
            sd[f"transformer.{n}.lora_B.weight"] = 0.2 * torch.randn(m.out_features, 2, generator=g)
    path = folder / name
    save_file(sd, path)
    return path


def test_lightning_lora_defaults_match_diffusers(repo, tmp_path):
    pipe = QwenEditPipeline.from_pretrained(repo["root"], area=AREA)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    path = _lightning_file(pipe.transformer, tmp_path)
    assert pipe.load_lora(path) and pipe.distilled_steps == 4 and pipe.schedule is LIGHTNING_SCHEDULE
    image = random_pil(96, 128, seed=3)
    ours = pipe.edit(image, PROMPT, seed=7)  # defaults: 4 steps, CFG off (no negative branch)
    ed = ours.editor
    assert ours.result.nfe == 4 and ed.neg_txt is None
    noise = NoiseField.sample(tuple(ed.source.shape), 7).fine
    ref = run_diffusers_edit(repo["refs"], repo["root"], image, PROMPT, " ", pack(noise), plus=False, area=AREA,
                             scale=1.0, scheduler=LIGHTNING_CONFIG, lora=path)  # fmt: skip
    assert len(ref["calls"]) == 4  # diffusers ran no CFG branch either
    assert torch.equal(flow_sigmas(4, ed.grid[0] * ed.grid[1], pipe.schedule), ref["sigmas"])
    err = max_rel_err(ours.pixels, ref["image"])
    print(f"Lightning edit vs diffusers: rel err {err:.2e}")
    assert err <= TOL
    # the distilled presets run on the fused weights; SpecEdit's stages visit the same 4 sigmas
    out = pipe.edit(image, PROMPT, method="specedit-distill-4", seed=7)
    assert out.result.nfe == 4 and out.mask is not None
    assert pipe.edit(image, PROMPT, method="distilled-4", seed=7).result.nfe == 4
    assert pipe.unload_loras() and pipe.schedule == QWEN_SCHEDULE and pipe.distilled_steps is None
    assert all(torch.equal(v, base[k]) for k, v in pipe.transformer.state_dict().items())
    with pytest.raises(
        ValueError, match=r"^method 'distilled-4' expects step-distilled weights: fuse them first"
    ):
        pipe.edit(image, PROMPT, method="distilled-4")


def test_unrecognised_file_and_overrides(repo, tmp_path):
    pipe = QwenEditPipeline.from_pretrained(repo["root"], area=AREA)
    plain = _lightning_file(pipe.transformer, tmp_path, "style.safetensors")
    pipe.load_lora(plain, 0.5)
    assert (
        pipe.distilled_steps is None
        and pipe.schedule == QWEN_SCHEDULE
        and pipe.loras == (("style.safetensors", 0.5),)
    )
    pipe.load_lora(plain, -0.5, distilled=8)  # the caller says these are 8-step distilled weights
    assert pipe.distilled_steps == 8 and pipe.schedule is LIGHTNING_SCHEDULE
    pipe.unload_loras()
    with pytest.raises(ValueError, match=r"LoRA .*style\.bin: only \.safetensors files are read"):
        pipe.load_lora(tmp_path / "style.bin")
    with pytest.raises(ValueError, match=r"LoRA .*missing\.safetensors: no such file"):
        pipe.load_lora(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="LoRA scale must be finite, got nan"):
        pipe.load_lora(plain, float("nan"))
    assert pipe.loras == ()
