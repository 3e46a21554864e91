"""`specedit edit` on a tiny checkpoint folder in the official layout: baseline and a SpecEdit preset."""

import json

import numpy as np
import pytest
from PIL import Image
from refs_kontext import write_tiny_kontext_repo

from specedit.cli import main


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("kontext")
    return write_tiny_kontext_repo(root / "FLUX.1-Kontext-dev")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (120, 140, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("method", ["baseline", "specedit-18"])
def test_edit_cli(repo, image, tmp_path, capsys, method):
    out, mask = tmp_path / "out.png", tmp_path / "mask.png"
    args = ["edit", "--weights", str(repo), "--image", str(image), "--prompt", "make the sky green", "--out",
            str(out), "--method", method, "--steps", "4", "--height", "128", "--width", "128", "--dtype", "fp32",
            "--device", "cpu", "--quiet"]  # fmt: skip
    if method != "baseline":
        args += ["--save-mask", str(mask)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert Image.open(out).size == (128, 128)
    assert summary["nfe"] == (4 if method == "baseline" else 18) and summary["tflops"]["total"] > 0
    if method != "baseline":
        assert Image.open(mask).size == (128, 128) and 0 < summary["expanded_fraction"] <= 1


def test_edit_cli_errors(repo, image, tmp_path, capsys):
    base = [
        "edit",
        "--weights",
        str(repo),
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "o.png"),
        "--device",
        "cpu",
    ]
    assert main([*base, "--image", str(tmp_path / "missing.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main([*base, "--image", str(image), "--method", "specedit-99"]) == 2
    assert "unknown method" in capsys.readouterr().err


@pytest.fixture(scope="module", params=["qwen-image-edit", "qwen-image-edit-2509"])
def qwen_repo(request, tmp_path_factory):
    from refs_qwen_repo import write_qwen_edit_repo

    plus = request.param.endswith("2509")
    root = tmp_path_factory.mktemp("qwen") / request.param
    write_qwen_edit_repo(root, plus=plus)
    return request.param, root


@pytest.mark.parametrize("method", ["baseline", "specedit-18"])
def test_edit_cli_qwen(qwen_repo, image, tmp_path, capsys, method):
    model, root = qwen_repo
    out = tmp_path / "out.png"
    images = ["--image", str(image)] * (2 if model.endswith("2509") else 1)
    args = ["edit", "--model", model, "--weights", str(root), *images, "--prompt", "make the sky green", "--out",
            str(out), "--method", method, "--steps", "3", "--height", "128", "--width", "128", "--area",
            str(128 * 128), "--dtype", "fp32", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert Image.open(out).size == (128, 128)
    assert summary["nfe"] == (3 if method == "baseline" else 18)
    assert (method == "baseline") == ("expanded_fraction" not in summary)


def test_edit_cli_with_a_distilled_lora(repo, image, tmp_path, capsys):
    """--lora PATH:SCALE (BFL layout) with --distilled runs a distilled preset; --schedule overrides the schedule;
    the summary names the fused LoRAs."""
    import torch
    from safetensors.torch import save_file

    from specedit.kontext.pipeline import KontextPipeline

    g = torch.Generator().manual_seed(0)
    lora = {}
    for n, m in KontextPipeline.from_pretrained(repo).model.named_modules():
        if isinstance(m, torch.nn.Linear) and "blocks" in n:
            lora[f"diffusion_model.{n}.lora_A.weight"] = 0.3 * torch.randn(2, m.in_features, generator=g)
            lora[f"diffusion_model.{n}.lora_B.weight"] = 0.3 * torch.randn(m.out_features, 2, generator=g)
    save_file(lora, tmp_path / "fast.safetensors")
    out = tmp_path / "out.png"
    args = ["edit", "--weights", str(repo), "--image", str(image), "--prompt", "make the sky green", "--out",
            str(out), "--method", "specedit-distill-8", "--height", "128", "--width", "128", "--dtype", "fp32",
            "--device", "cpu", "--quiet", "--schedule", "flux", "--lora", f"{tmp_path / 'fast.safetensors'}:0.7",
            "--distilled"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["nfe"] == 8 and summary["loras"] == [["fast.safetensors", 0.7]]
    assert Image.open(out).size == (128, 128)
