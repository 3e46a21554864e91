"""Atomic writers: whole files or none, torn JSON lines dropped, a killed writer's leftovers tidied."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from specedit.toy import atomic


def test_writers_leave_no_temporary_file_and_replace_whole(tmp_path):
    path = tmp_path / "a.json"
    atomic.write_json(path, {"x": 1})
    atomic.write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    atomic.save_tensors({"w": torch.arange(3)}, tmp_path / "w.safetensors")
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["w"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "w.safetensors"]

    def broken(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic._write(path, broken)
    assert json.loads(path.read_text()) == {"x": 2}  # the old version, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "w.safetensors"]


def test_read_lines_drops_a_torn_last_line_and_names_a_bad_one(tmp_path):
    path = tmp_path / "r.jsonl"
    with path.open("a") as f:
        atomic.append_line(f, {"i": 0})
        atomic.append_line(f, {"i": 1})
    with path.open("ab") as f:
        f.write(b'{"i": 2, "na')  # a write cut short by a kill
    assert atomic.read_lines(path) == [{"i": 0}, {"i": 1}]
    assert path.read_text() == '{"i": 0}\n{"i": 1}\n'  # appending goes on after the last whole line
    path.write_text('{"i": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"r.jsonl line 2 is not valid JSON"):
        atomic.read_lines(path)
    assert atomic.read_lines(tmp_path / "missing.jsonl") == []


def test_clean_stale_removes_dead_writers_files_and_restores_an_old_folder(tmp_path):
    dead = 999_999_999  # no such process
    (tmp_path / f".a.json.tmp-{dead}").write_text("half")
    (tmp_path / f".a.json.tmp-{os.getpid()}").write_text("mine, in progress")
    (tmp_path / f".weights.old-{dead}").mkdir()  # killed between the two renames: weights/ is missing
    (tmp_path / f".other.tmp-{dead}").write_text("not ours")
    handled = atomic.clean_stale(tmp_path, lambda name: name in ("a.json", "weights"))
    assert sorted(handled) == [f".a.json.tmp-{dead}", f".weights.old-{dead}"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f".a.json.tmp-{os.getpid()}", f".other.tmp-{dead}", "weights"]


def test_replace_folder_and_check_folder(tmp_path):
    old, new = tmp_path / "set", tmp_path / ".set.tmp-1"
    old.mkdir()
    (old / "f").write_text("old")
    new.mkdir()
    (new / "f").write_text("new")
    atomic.replace_folder(new, old)
    assert (old / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    assert atomic.check_folder(tmp_path / "x" / "y") == tmp_path / "x" / "y"
    with pytest.raises(ValueError, match=r"--out .*set/f is a file, not a folder"):
        atomic.check_folder(old / "f")
    with pytest.raises(ValueError, match=r"--out .*f/sub: .*set/f is a file, not a folder"):
        atomic.check_folder(old / "f" / "sub")
