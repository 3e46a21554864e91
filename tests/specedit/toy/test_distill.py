"""The toy editor's step distillation (specedit.toy.distill) at tiny sizes, its CLI, and the evaluator's use of
the distilled LoRA."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from models import flux, flux_ae
from models.clip import CLIPText
from models.init import randomized_module
from models.lora import fuse_lora, unfuse_lora
from samplers.mixed_res import FullResSampler
from specedit.cli import main
from specedit.method import Baseline
from specedit.presets import methods
from specedit.toy import evaluate as ev
from specedit.toy.distill import INFO_FILE, LORA_FILE, DistillConfig, LoRASet, distill_toy
from specedit.toy.family import TINY_AE, TINY_DIT
from specedit.toy.model import TOY_TEXT, WEIGHTS, ToyEditor, toy_tokenizer

TINY = dict(n_fine=4, n_coarse=2, traj_batch=2, image_size=64, rank=4, batch=2, teacher_steps=8, nfes=(2, 4),
            warmup=1)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A toy editor folder with the toy's architecture shrunk (random weights)."""
    text = replace(TOY_TEXT, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
    editor = ToyEditor(
        randomized_module(lambda: flux.Flux(TINY_DIT), seed=1),
        randomized_module(lambda: flux_ae.AutoEncoder(TINY_AE), seed=2),
        randomized_module(lambda: CLIPText(text), seed=3),
        toy_tokenizer(),
    )
    return editor.save(tmp_path_factory.mktemp("tiny") / "editor", dtype=torch.float32)


def _losses(run):
    import json

    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return [e["loss"] for e in lines if e["stage"] == "student"]


def test_lora_trains_and_its_loss_decreases(tiny_teacher, tmp_path):
    torch.manual_seed(0)
    out = distill_toy(tmp_path / "run", teacher=tiny_teacher, steps=40, lr=1e-2, start_frac=1.0, **TINY)
    assert out["done"] and out["steps_done"] == 40
    losses = _losses(tmp_path / "run")
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8


def test_saved_lora_is_read_by_fuse_lora_and_equals_the_trained_adapters(tiny_teacher, tmp_path):
    out = distill_toy(tmp_path / "run", teacher=tiny_teacher, steps=3, lr=1e-2, **TINY)
    path = tmp_path / "run" / "lora" / LORA_FILE
    assert out["lora"] == str(path) and (path.parent / INFO_FILE).is_file()
    teacher = ToyEditor.load(tiny_teacher)
    lora = LoRASet(teacher.dit, 4)
    sd = load_file(str(path))
    with torch.no_grad():
        for p in lora.paths:
            lora.a[p.replace(".", "-")].copy_(sd[f"diffusion_model.{p}.lora_A.weight"].float())
            lora.b[p.replace(".", "-")].copy_(sd[f"diffusion_model.{p}.lora_B.weight"].float())
    x = torch.randn(1, 64, 32)
    ed = teacher.editor(torch.zeros(1, 3, 64, 64), "make the background red")
    from samplers.layout import Layout

    with torch.no_grad():
        den = ed.denoiser(Layout.full(ed.grid))
        base = den(x, torch.tensor(0.5))
        lora.attach(teacher.dit)
        adapted = den(x, torch.tensor(0.5))
        lora.detach(teacher.dit)
        assert sorted(fuse_lora(teacher.dit, path)) == sorted(lora.paths)
        fused = den(x, torch.tensor(0.5))
        unfuse_lora(teacher.dit)
        again = den(x, torch.tensor(0.5))
    assert not torch.allclose(fused, base, atol=1e-5)
    torch.testing.assert_close(fused, adapted, atol=1e-3, rtol=1e-3)  # fp16 file vs fp32 adapters
    assert torch.equal(again, base)


class Kill(Exception):
    pass


def _kill_at(stage: str, step: int):
    def log(entry):
        if entry["stage"] == stage and entry["step"] == step:
            raise Kill  # like SIGKILL: nothing after the last saved batch or checkpoint survives

    return log


@pytest.mark.parametrize("stage, step", [("teacher-fine", 2), ("student", 3)])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tiny_teacher, tmp_path, stage, step):
    kw = dict(teacher=tiny_teacher, steps=4, ckpt_every=1, **TINY)
    whole = distill_toy(tmp_path / "whole", **kw)
    with pytest.raises(Kill):
        distill_toy(tmp_path / "cut", log=_kill_at(stage, step), **kw)
    resumed = distill_toy(tmp_path / "cut", **kw)
    assert whole["done"] and resumed["done"]
    a, b = (load_file(str(tmp_path / r / "lora" / LORA_FILE)) for r in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_settings_fail_in_one_line(tiny_teacher, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"step count\(s\) \[5\] do not divide the teacher's 24 steps"):
        DistillConfig(nfes=(5,))
    with pytest.raises(ValueError, match="must be positive integers"):
        DistillConfig(nfes=(0, 4))
    distill_toy(tmp_path / "a", teacher=tiny_teacher, steps=1, out=tmp_path / "lora", **TINY)
    with pytest.raises(ValueError, match="already holds distill_lora.safetensors; pass --overwrite"):
        distill_toy(tmp_path / "b", teacher=tiny_teacher, steps=1, out=tmp_path / "lora", **TINY)
    distill_toy(tmp_path / "b", teacher=tiny_teacher, steps=1, out=tmp_path / "lora", overwrite=True, **TINY)
    with pytest.raises(ValueError, match=r"differing: \{'rank': 8\}"):
        distill_toy(tmp_path / "b", teacher=tiny_teacher, steps=1, **{**TINY, "rank": 8})
    for argv, message in (
        (["--distill", "5"], "do not divide the teacher's 24 steps"),
        (["--distill", "4,x"], "--distill takes step counts like 4,6,8, got '4,x'"),
        (["--distill", "--ae-steps", "3"], "--ae-steps belong to the editor's own recipe"),
    ):
        assert main(["train-toy", *argv, "--run", str(tmp_path / "cli")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_evaluator_runs_distilled_methods_with_the_lora_fused(tiny_teacher, tmp_path):
    toy = ToyEditor.load(tiny_teacher)
    lora = LoRASet(toy.dit, 4, seed=1)
    with torch.no_grad():
        for b in lora.b.values():
            b.normal_(0, 0.05)
    path = tmp_path / LORA_FILE
    from safetensors.torch import save_file

    save_file(lora.state(), str(path))
    named = {"baseline-50": Baseline(FullResSampler(3)), "steps-2": Baseline(FullResSampler(2)),
             "distilled-2": Baseline(FullResSampler(2), weights="distilled")}  # fmt: skip
    case = ev.eval_cases(1)[0]
    before = ev.fingerprint(toy)
    with pytest.raises(
        FileNotFoundError, match="distilled-2 runs on the distilled weights: no distilled LoRA"
    ):
        ev.evaluate_case(toy, case, named)
    records, outcomes = ev.evaluate_case(toy, case, named, lora=path)
    assert ev.fingerprint(toy) == before  # the base weights are back
    assert {r["method"]: r["weights"] for r in records} == {"baseline-50": "base", "steps-2": "base",
                                                            "distilled-2": "distilled"}  # fmt: skip
    assert not torch.equal(outcomes["steps-2"].image, outcomes["distilled-2"].image)
    fuse_lora(toy.dit, path)
    fused, _ = ev.run_case(toy, case, {"steps-2": named["steps-2"]})
    unfuse_lora(toy.dit)
    assert torch.equal(fused["steps-2"].image, outcomes["distilled-2"].image)


def test_shipped_lora_fits_the_shipped_editor_and_its_presets_exist():
    path = WEIGHTS / LORA_FILE
    assert path.stat().st_size <= 2 * 2**20
    toy = ToyEditor.load()
    assert len(fuse_lora(toy.dit, path)) == len(LoRASet(toy.dit, 1).paths)
    unfuse_lora(toy.dit)
    table = methods("toy")
    for n in (8, 6, 4):
        assert table[f"distilled-{n}"].weights == table[f"specedit-distill-{n}"].weights == "distilled"
        assert f"steps-{n}" in ev.all_methods()
