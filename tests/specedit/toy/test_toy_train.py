"""The toy recipe end to end at a tiny budget: stages, resume, saved weights that load and edit."""

import json
from dataclasses import replace

import pytest
import torch

from specedit.presets import methods
from specedit.toy.data import make_example
from specedit.toy.model import ToyEditor
from specedit.toy.recipe import train_toy


def test_train_resume_save_load_edit(tmp_path):
    kw = dict(ae_steps=3, n_train=16, steps=3, batch=4, ckpt_every=2)
    first = train_toy(tmp_path / "run", **kw)
    assert first["done"] and first["dit"]["dit_steps"] == 3
    again = train_toy(tmp_path / "run", **{**kw, "steps": 5})  # resumes at step 3, skips the AE and the data
    assert again["dit"]["dit_steps"] == 5 and "ae" not in again
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
             if json.loads(line)["stage"] == "dit"]  # fmt: skip
    assert steps == [1, 2, 3, 4, 5]
    editor = ToyEditor.load(tmp_path / "run" / "weights")
    ex = make_example(7)
    out = editor.edit(ex.source, ex.instruction, method=methods("toy")["specedit-9"])
    assert out.pixels.shape == (1, 3, 128, 128) and out.result.nfe == 9 and torch.isfinite(out.pixels).all()


def test_changed_settings_need_a_new_run(tmp_path):
    train_toy(tmp_path, ae_steps=1, n_train=8, steps=1, batch=2)
    with pytest.raises(ValueError, match="differing: {'batch': 4}"):
        train_toy(tmp_path, ae_steps=1, n_train=8, steps=1, batch=4)


def test_images_to_tensor_takes_uint8_batches_like_arrays():
    import numpy as np

    from specedit.toy.model import images_to_tensor

    arrays = np.stack([make_example(s).source for s in (1, 2)])
    out = images_to_tensor(torch.from_numpy(arrays))
    assert torch.equal(out, images_to_tensor(arrays)) and out.shape == (2, 3, 128, 128)
    assert out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize("factor", [1, 2, "mixed"])
def test_dit_loss_trains_every_layout(factor):
    from specedit.toy.train import dit_loss, encode_examples, generate_examples

    editor = ToyEditor.create(seed=0)
    data = encode_examples(editor, generate_examples(4))
    loss = dit_loss(editor, data, torch.arange(2), factor, torch.Generator().manual_seed(0), 4.0, "cpu")
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    grads = [p.grad for p in editor.dit.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    assert any(p.grad is not None for p in editor.text.parameters())  # the text tower trains jointly


def test_kind_weights_are_checked_and_drawn(tmp_path, capsys):
    from specedit.cli import main
    from specedit.toy.data import ALL_EDITS
    from specedit.toy.train import KINDS, ToyTrainConfig, generate_examples

    with pytest.raises(ValueError, match=r"--kind-weights must be 11 weights >= 0 .* got \(1.0, 2.0\)"):
        ToyTrainConfig(kind_weights=(1.0, 2.0))
    only = tuple(1.0 if k == "scatter" else 0.0 for k in ALL_EDITS)
    bank = generate_examples(4, kind_weights=only)
    assert {KINDS[int(k)] for k in bank["kind"]} == {"scatter"}
    assert main(["train-toy", "--run", str(tmp_path / "r"), "--kind-weights", "add=2,turn=1"]) == 2
    assert "unknown edit kind 'turn'; choose from recolor" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before any work


def test_init_from_an_editor_with_the_smaller_first_vocabulary(tmp_path):
    """Fine-tuning the first editor (51 token ids): its words keep their embeddings, <eos> moves to the end."""
    old = ToyEditor.create(seed=1)
    from models.clip import CLIPText

    old.text = CLIPText(replace(old.text.config, vocab_size=51))
    old.save(tmp_path / "old")
    first = ToyEditor.load(tmp_path / "old")
    assert first.text.config.vocab_size == 51 and first.tokenizer("remove the red star").max() == 50
    grown = ToyEditor.create().take_weights(first)
    a, b = first.encode_prompt("remove the red star"), grown.encode_prompt("remove the red star")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert grown.tokenizer("scatter three red dots").min() > 0  # the new words have ids of their own
