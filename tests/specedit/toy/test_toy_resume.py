"""``specedit train-toy`` as long work: settings checked first, every stage resumable (time budget, SIGINT,
SIGTERM, SIGKILL), weight folders written as a checked set."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from specedit.cli import main
from specedit.toy import atomic
from specedit.toy.model import EDITOR_FILES, WEIGHTS, ToyEditor, verify_manifest, write_manifest
from specedit.toy.recipe import train_toy
from specedit.toy.train import (
    Deadline,
    ToyTrainConfig,
    encode_latents,
    generate_examples,
    load_or_encode_dataset,
    load_or_generate_examples,
)

ROOT = Path(__file__).resolve().parents[3]
# every stage does real work, in seconds: AE on 32 px crops, 4x coarser transformer batches
TINY = dict(
    ae_steps=4, ae_batch=2, ae_crop=32, n_train=4, steps=4, batch=2, res_probs=(0.0, 0.0, 1.0), ckpt_every=2
)
TINY_ARGS = ["--ae-steps", "4", "--ae-batch", "2", "--ae-crop", "32", "--n-train", "4", "--steps", "4",
             "--batch", "2", "--res-probs", "0,0,1", "--checkpoint-every", "2"]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread, like the subprocesses below (OMP_NUM_THREADS=1): the same kernels, the same bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny run."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_toy(run, **TINY)["done"]
    finally:
        torch.set_num_threads(before)
    return run


def _same_weights(a: Path, b: Path) -> None:
    for name in EDITOR_FILES:
        assert atomic.sha256(a / "weights" / name) == atomic.sha256(b / "weights" / name), name
    for ckpt in ("ae_ckpt.safetensors", "dit_ckpt.safetensors"):
        assert atomic.sha256(a / ckpt) == atomic.sha256(b / ckpt), ckpt


def _steps(run: Path, stage: str) -> list[int]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if json.loads(line)["stage"] == stage]


# ----------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "override, message",
    [
        ({"steps": -1}, "--steps must be an integer >= 0 (0: fit the schedule to the time budget), got -1"),
        ({"batch": 0}, "--batch must be an integer >= 1, got 0"),
        ({"ae_steps": 0}, "--ae-steps must be an integer >= 1, got 0"),
        ({"n_train": -5}, "--n-train must be an integer >= 1, got -5"),
        ({"ckpt_every": 0}, "--checkpoint-every must be an integer >= 1, got 0"),
        ({"ae_crop": 30}, "--ae-crop must be a multiple of 4"),
        ({"lr": 0.0}, "--lr must be > 0, got 0.0"),
        ({"ema": 1.0}, "--ema must be in [0, 1), got 1.0"),
        ({"res_probs": (0.0, 0.0)}, "--res-probs must be 1 to 4 probabilities"),
        ({"minutes": 0}, "--minutes must be > 0, got 0"),
        ({"steps": 0}, "--steps 0 (fit the schedule to the time budget) needs --minutes"),
        ({"workers": -1}, "--workers must be >= 0, got -1"),
    ],
)
def test_bad_settings_fail_in_one_line_before_any_work(tmp_path, override, message):
    with pytest.raises(ValueError) as e:
        train_toy(tmp_path / "run", **{**TINY, **override})
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_cli_rejects_negative_steps_with_one_line(tmp_path, capsys):
    assert main(["train-toy", "--run", str(tmp_path / "run"), "--steps", "-1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--steps must be an integer >= 0" in err and "got -1" in err
    assert not (tmp_path / "run").exists()
    assert main(["train-toy", "--run", str(tmp_path / "r2"), "--checkpoint-every", "0", "--quiet"]) == 2
    assert "--checkpoint-every must be an integer >= 1, got 0" in capsys.readouterr().err


def test_config_checks_the_defaults_and_the_shipped_settings():
    ToyTrainConfig()
    ToyTrainConfig(res_probs=(0.6, 0.25, 0.15))  # the shipped weights' three-way mix


# ----------------------------------------------------------------------------------------------- output folder
def test_out_holding_another_editor_needs_overwrite(tmp_path, capsys):
    shipped = tmp_path / "shipped"
    shutil.copytree(WEIGHTS, shipped)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"already holds a toy editor; pass --overwrite to replace it"):
        train_toy(run, out=shipped, **TINY)
    assert not run.exists()  # refused before any work
    argv = ["train-toy", "--run", str(run), "--out", str(shipped), "--quiet", *TINY_ARGS]
    assert main(argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--out .*file is a file, not a folder"):
        train_toy(run, out=tmp_path / "file", **TINY)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not empty and holds no toy editor"):
        train_toy(run, out=tmp_path / "notes", overwrite=True, **TINY)

    assert main([*argv, "--overwrite"]) == 0
    manifest = verify_manifest(shipped)
    assert manifest["step"] == TINY["steps"] and set(manifest["files"]) == set(EDITOR_FILES)
    assert (shipped / "MODEL_CARD.md").read_text() == (WEIGHTS / "MODEL_CARD.md").read_text()  # carried over
    assert atomic.sha256(shipped / "ae.safetensors") != atomic.sha256(WEIGHTS / "ae.safetensors")
    # the same run may write its --out again (a resumed run) without --overwrite
    assert train_toy(run, out=shipped, **{**TINY, "steps": 5})["done"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ----------------------------------------------------------------------------------------------- weight folders
def test_manifest_is_checked_on_load(tmp_path):
    assert set(verify_manifest(WEIGHTS)["files"]) == set(EDITOR_FILES)  # the shipped weights have one
    folder = tmp_path / "editor"
    ToyEditor.create(seed=0).save(folder, manifest={"step": 7})
    assert json.loads((folder / "manifest.json").read_text())["step"] == 7
    ToyEditor.load(folder)
    data = bytearray((folder / "ae.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "ae.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"ae.safetensors does not match its sha256 in manifest.json"):
        ToyEditor.load(folder)
    data[-1] ^= 1
    (folder / "ae.safetensors").write_bytes(bytes(data))
    (folder / "text_encoder.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"text_encoder.safetensors is missing \(listed in manifest.json\)"
    ):
        verify_manifest(folder)
    old = tmp_path / "old"  # a folder from before manifests loads unchecked
    ToyEditor.create(seed=0).save(old)
    (old / "manifest.json").unlink()
    ToyEditor.load(old)
    with pytest.raises(FileNotFoundError, match="is missing: no manifest"):
        write_manifest(folder)


def test_average_is_the_mean_of_the_stages(tmp_path):
    a, b = ToyEditor.create(seed=0), ToyEditor.create(seed=0)
    b.dit = ToyEditor.create(seed=1).dit  # another transformer, the same autoencoder
    with torch.no_grad():
        b.text.text_model.final_layer_norm.weight.add_(0.5)
    a.save(tmp_path / "a", dtype=torch.float32)
    b.save(tmp_path / "b", dtype=torch.float32)
    mean = ToyEditor.average([tmp_path / "a", tmp_path / "b"])
    for name in ("dit", "text"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        for k, v in getattr(mean, name).state_dict().items():
            torch.testing.assert_close(v, (sa[k] + sb[k]) / 2, rtol=0, atol=1e-7)
    assert torch.equal(mean.ae.encoder.conv_in.weight, a.ae.encoder.conv_in.weight)
    with pytest.raises(ValueError, match="needs two or more toy editors, got 1"):
        ToyEditor.average([tmp_path / "a"])
    with torch.no_grad():
        b.ae.encoder.conv_in.weight.add_(1.0)
    b.save(tmp_path / "b", dtype=torch.float32)
    with pytest.raises(
        ValueError, match=r"b: another autoencoder than .*a; only editors sharing one average"
    ):
        ToyEditor.average([tmp_path / "a", tmp_path / "b"])


def test_save_replaces_a_folder_as_a_set(tmp_path, monkeypatch):
    from specedit.toy import model

    folder = tmp_path / "editor"
    editor = ToyEditor.create(seed=0)
    editor.save(folder, manifest={"step": 1})
    (folder / "README.md").write_text("card")
    before = {n: atomic.sha256(folder / n) for n in EDITOR_FILES}

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "write_manifest", crash)  # killed mid-save: the old set stays whole
    with torch.no_grad():
        editor.ae.encoder.conv_in.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        editor.save(folder)
    assert {n: atomic.sha256(folder / n) for n in EDITOR_FILES} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["editor"]
    monkeypatch.undo()
    stale = tmp_path / ".editor.tmp-999999999"  # a dead writer's leftovers are cleaned by the next save
    stale.mkdir()
    editor.save(folder, manifest={"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["editor"]
    assert (folder / "README.md").read_text() == "card" and verify_manifest(folder)["step"] == 2
    assert atomic.sha256(folder / "ae.safetensors") != before["ae.safetensors"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no toy editor"):
        editor.save(tmp_path / "other")


# ----------------------------------------------------------------------------------------------- stopping
class Countdown(Deadline):
    """A deadline reached after ``n`` checks (a stage stopped at a known point)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def reached(self) -> bool:
        self.n -= 1
        return self.n < 0


def test_example_bank_and_encoding_stop_and_continue(tmp_path):
    cfg = ToyTrainConfig(n_train=5)
    assert load_or_generate_examples(cfg, tmp_path, deadline=Countdown(3)) is None
    assert (tmp_path / "examples_5.part.safetensors").is_file()
    examples = load_or_generate_examples(cfg, tmp_path)
    assert not (tmp_path / "examples_5.part.safetensors").exists()
    whole = generate_examples(5, kind_weights=cfg.kind_weights)
    assert all(torch.equal(examples[k], whole[k]) for k in whole)

    editor = ToyEditor.create(seed=0)
    assert load_or_encode_dataset(editor, examples, cfg, tmp_path, batch=2, deadline=Countdown(1)) is None
    assert load_or_encode_dataset(editor, examples, cfg, tmp_path, batch=2, deadline=Countdown(1)) is None
    data = load_or_encode_dataset(editor, examples, cfg, tmp_path, batch=2)
    direct = encode_latents(editor, examples, batch=2)
    assert torch.equal(data["source"], direct["source"]) and torch.equal(data["target"], direct["target"])
    assert data["mask"].shape == (5, 16, 16) and not (tmp_path / "data_5.part.safetensors").exists()


def test_time_budget_covers_the_first_stage(tmp_path):
    t0 = time.monotonic()
    summary = train_toy(tmp_path / "run", minutes=1e-5, **TINY)
    assert time.monotonic() - t0 < 30
    assert not summary["done"] and summary["stopped"].startswith("time budget in the example bank stage")
    assert "weights" not in summary


def test_signals_stop_each_stage_resumably(tmp_path, reference):
    """SIGINT in the AE stage, SIGTERM in the transformer stage: each checkpoints at the next step boundary;
    the resumed run ends bit-equal to the uninterrupted one."""
    run = tmp_path / "run"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def send(stage, step, sig):
        return lambda e: (e["stage"], e["step"]) == (stage, step) and os.kill(os.getpid(), sig)

    first = train_toy(run, log=send("ae", 1, signal.SIGINT), **TINY)
    assert not first["done"] and first["stopped"].startswith("SIGINT in the autoencoder (step 1 of 4) stage")
    assert not (run / "ae_stats.json").exists()  # not marked done
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # restored
    second = train_toy(run, log=send("dit", 3, signal.SIGTERM), **TINY)
    assert second["ae"]["done"] and second["stopped"].startswith("SIGTERM in the transformer (step 3) stage")
    assert ToyEditor.load(run / "weights")  # a stopped run still leaves loadable (EMA) weights
    assert train_toy(run, **TINY)["done"]
    assert _steps(run, "ae") == [1, 2, 3, 4] and _steps(run, "dit") == [1, 2, 3, 4]  # AE resumed at step 1
    _same_weights(reference, run)


def test_sigkill_during_a_checkpoint_write_then_resume(tmp_path, reference):
    """A subprocess killed while it writes its first transformer checkpoint; the resumed run ends bit-equal to
    the uninterrupted one and the killed writer's temporary file is gone."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "specedit.cli", "train-toy", "--run", str(run), "--device", "cpu", "--quiet",
           *TINY_ARGS]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = f".dit_ckpt.safetensors.tmp-{proc.pid}"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if (run / partial).exists() or (run / "dit_ckpt.safetensors").exists():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.0005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    assert (run / "ae_stats.json").is_file() and not (run / "weights").exists()
    assert train_toy(run, **TINY)["done"]
    assert not any(atomic.STALE.fullmatch(p.name) for p in run.iterdir())
    _same_weights(reference, run)
