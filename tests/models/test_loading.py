"""Safetensors loader: single and sharded files, zero-copy views, strict errors, damaged files, hub errors."""

import importlib
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import models.loading as loading
from models.loading import CheckpointError, build_on_meta, load_checkpoint, open_checkpoint, resolve


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Sequential(nn.Linear(4, 3, bias=False), nn.LayerNorm(3))


def _sharded(tmp_path, sd, n_shards=2):
    keys = sorted(sd)
    weight_map = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::n_shards]}
        save_file(part, tmp_path / name)
        weight_map.update(dict.fromkeys(part, name))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return tmp_path


def test_single_and_sharded_load_equal(tmp_path):
    sd = Tiny().state_dict()
    save_file(sd, tmp_path / "one.safetensors")
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    _sharded(shard_dir, sd, 3)
    for src in (tmp_path / "one.safetensors", shard_dir, shard_dir / "model.safetensors.index.json"):
        m = load_checkpoint(build_on_meta(Tiny), open_checkpoint(src))
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), (src, k)
        assert not m.training


def test_native_dtype_is_zero_copy_and_dtype_cast(tmp_path):
    sd = {k: v.bfloat16() for k, v in Tiny().state_dict().items()}
    save_file(sd, tmp_path / "w.safetensors")
    ckpt = open_checkpoint(tmp_path / "w.safetensors")
    m = load_checkpoint(build_on_meta(Tiny), ckpt)
    assert m.a.weight.dtype == torch.bfloat16
    assert m.a.weight.data_ptr() == ckpt["a.weight"].data_ptr()  # a view into the file's mapping
    m32 = load_checkpoint(
        build_on_meta(Tiny), open_checkpoint(tmp_path / "w.safetensors"), dtype=torch.float32
    )
    assert m32.a.weight.dtype == torch.float32 and torch.equal(m32.a.weight, sd["a.weight"].float())
    m32.a.weight.data.add_(1)  # loaded weights are writable (copy-on-write), the file is untouched
    assert torch.equal(open_checkpoint(tmp_path / "w.safetensors")["a.weight"], sd["a.weight"])


def test_strict_errors_list_keys_with_counts(tmp_path):
    sd = Tiny().state_dict()
    sd.pop("b.1.bias")
    sd["extra.weight"] = torch.zeros(2)
    sd["a.weight"] = torch.zeros(4, 9)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(build_on_meta(Tiny), open_checkpoint(tmp_path / "bad.safetensors"))
    msg = str(e.value)
    assert "bad.safetensors" in msg and "1 missing: b.1.bias" in msg and "1 unexpected: extra.weight" in msg
    assert "1 wrong shape: a.weight: checkpoint (4, 9) vs model (4, 8)" in msg


def test_truncated_and_corrupt_files(tmp_path):
    save_file(Tiny().state_dict(), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="cut.safetensors is truncated.*download it again"):
        open_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "head.safetensors").write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        open_checkpoint(tmp_path / "head.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{junk")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        open_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        open_checkpoint(tmp_path / "absent.safetensors")


def test_missing_shard(tmp_path):
    _sharded(tmp_path, Tiny().state_dict(), 2)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="shard model-00002-of-00002.safetensors .* is missing"):
        open_checkpoint(tmp_path)


_CHILD = """
import sys, torch
from torch import nn
from models.loading import build_on_meta, load_checkpoint, open_checkpoint

class Big(nn.Module):
    def __init__(self):
        super().__init__()
        for i in range(16):
            self.register_parameter(f"w{i}", nn.Parameter(torch.empty(1024, 1024)))

def status(field):  # kB
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])

open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
m = load_checkpoint(build_on_meta(Big), open_checkpoint(sys.argv[1]))
with torch.no_grad():
    total = sum(float(p.sum()) for p in m.parameters())  # touch every page
print((status("VmHWM") - before) / 1024)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset VmHWM")
def test_peak_memory_one_copy(tmp_path):
    """Loading a 64 MB file and touching every weight grows peak RSS by about one file size, not two."""
    save_file({f"w{i}": torch.randn(1024, 1024) for i in range(16)}, tmp_path / "big.safetensors")
    cmd = [sys.executable, "-c", _CHILD, str(tmp_path / "big.safetensors")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    grown_mb = float(out.stdout.strip())
    assert 0.8 * 64 < grown_mb < 1.15 * 64, grown_mb


def test_hub_errors_are_actionable(monkeypatch):
    import huggingface_hub

    class GatedRepoError(Exception):
        pass

    def gated(*a, **k):
        raise GatedRepoError("401")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(
        PermissionError, match=r"(?s)org/gated is gated.*HF_TOKEN is not set.*export HF_TOKEN"
    ):
        loading.download("org/gated", ["transformer/*"])
    calls = []
    monkeypatch.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda repo, allow_patterns: calls.append(allow_patterns) or "/x",
    )
    assert str(resolve("org/model", ["vae/*.json"])) == "/x" and calls == [["vae/*.json"]]
    with pytest.raises(FileNotFoundError, match="neither an existing path nor"):
        resolve("/definitely/not/here", ["*"])


# ----------------------------------------------------------------------------------------------- damaged headers
def _write_raw(path, header: dict, data: bytes):
    """A safetensors file written by hand: 8-byte little-endian header length, JSON header, data buffer."""
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


def test_hand_written_file_matches_the_official_reader(tmp_path):
    data = struct.pack("<3f", 1.0, 2.0, 3.0) + struct.pack("<2i", 7, 8)
    header = {
        "__metadata__": {"format": "pt"},
        "x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
        "n": {"dtype": "I32", "shape": [1, 2], "data_offsets": [12, 20]},
    }
    path = _write_raw(tmp_path / "ok.safetensors", header, data)
    ckpt = open_checkpoint(path)
    with safe_open(path, "pt") as f:
        for k in ("x", "n"):
            assert torch.equal(ckpt[k], f.get_tensor(k))


@pytest.mark.parametrize(
    "entries, size, message",
    [
        (
            {"a": ("F32", [2], [0, 8]), "b": ("F32", [2], [4, 12])},
            12,
            r"bad.safetensors: tensors 'a' and 'b' overlap \(data_offsets \[0, 8\] and \[4, 12\]\)",
        ),
        (
            {"a": ("F32", [2], [-4, 4])},
            8,
            r"bad.safetensors: tensor 'a' has out-of-range data_offsets \[-4, 4\]",
        ),
        (
            {"a": ("F32", [2], [0, 8])},
            4,
            r"bad.safetensors is truncated or corrupt: tensor 'a' needs bytes up to",
        ),
        ({"a": ("F32", [2], [8, 0])}, 8, r"bad.safetensors: tensor 'a' has reversed data_offsets \[8, 0\]"),
        (
            {"a": ("F32", [3], [0, 8])},
            8,
            r"bad.safetensors: tensor 'a' spans 8 bytes \(data_offsets \[0, 8\]\) but shape \[3\] of F32 needs 12",
        ),
        ({"a": ("F16", [2, -1], [0, 0])}, 0, r"bad.safetensors: tensor 'a' has an invalid shape \[2, -1\]"),
        ({"a": ("F16", [2], [0])}, 4, r"bad.safetensors: tensor 'a' has invalid data_offsets \[0\]"),
        ({"a": ("C64", [1], [0, 8])}, 8, r"bad.safetensors: tensor 'a' has unsupported dtype 'C64'"),
    ],
)
def test_damaged_header_entries_fail_at_open(tmp_path, entries, size, message):
    header = {k: {"dtype": d, "shape": s, "data_offsets": o} for k, (d, s, o) in entries.items()}
    path = _write_raw(tmp_path / "bad.safetensors", header, bytes(size))
    with pytest.raises(CheckpointError, match=message) as e:
        open_checkpoint(path)
    assert "\n" not in str(e.value)


def test_overlap_is_refused_by_the_official_library_too(tmp_path):
    header = {
        k: {"dtype": "F32", "shape": [2], "data_offsets": o} for k, o in (("a", [0, 8]), ("b", [4, 12]))
    }
    path = _write_raw(tmp_path / "alias.safetensors", header, bytes(12))
    with pytest.raises(Exception), safe_open(path, "pt") as f:  # noqa: B017 (its error type varies by version)
        f.get_tensor("b")
    with pytest.raises(CheckpointError, match="overlap"):
        open_checkpoint(path)


def test_header_that_is_not_an_object(tmp_path):
    (tmp_path / "list.safetensors").write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(CheckpointError, match=r"list.safetensors has a corrupt safetensors header \(a list"):
        open_checkpoint(tmp_path / "list.safetensors")
    _write_raw(tmp_path / "entry.safetensors", {"a": [1, 2]}, b"")
    with pytest.raises(CheckpointError, match=r"entry.safetensors: tensor 'a' has a malformed header entry"):
        open_checkpoint(tmp_path / "entry.safetensors")


def test_empty_tensors_may_share_an_offset(tmp_path):
    header = {
        "e": {"dtype": "F32", "shape": [0, 4], "data_offsets": [4, 4]},
        "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    ckpt = open_checkpoint(_write_raw(tmp_path / "empty.safetensors", header, bytes(8)))
    assert ckpt["e"].shape == (0, 4) and torch.equal(ckpt["x"], torch.zeros(2))


# ----------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("bad", [torch.int32, torch.bool, torch.uint8])
def test_wrong_dtype_kind_names_key_file_and_dtypes(tmp_path, monkeypatch, bad):
    sd = Tiny().state_dict()
    sd["a.weight"] = torch.ones(4, 8, dtype=bad)
    save_file(sd, tmp_path / "ints.safetensors")
    ckpt = open_checkpoint(tmp_path / "ints.safetensors")
    monkeypatch.setattr(loading.SafetensorsFile, "tensor", lambda *a: pytest.fail("a tensor was read"))
    message = (
        rf"ints.safetensors: tensor 'a.weight' is {bad}, which cannot be loaded into Tiny's torch.float32"
    )
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(build_on_meta(Tiny), ckpt, dtype=torch.bfloat16)
    assert "\n" not in str(e.value)


def test_wrong_dtype_through_a_shard_and_a_remap(tmp_path):
    sd = Tiny().state_dict()
    sd["b.1.weight"] = torch.ones(3, dtype=torch.int64)
    sd = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    _sharded(tmp_path, sd, 2)
    ckpt = loading.strip_prefix(open_checkpoint(tmp_path), "model.diffusion_model.")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    # the error names the shard holding the tensor, not the index
    shard = index["weight_map"]["model.diffusion_model.b.1.weight"]
    with pytest.raises(
        CheckpointError, match=rf"{shard}: tensor 'b.1.weight' is torch.int64.*\(integer data"
    ):
        load_checkpoint(build_on_meta(Tiny), ckpt)


# ----------------------------------------------------------------------------------------------- config.json
def test_read_config_names_file_line_and_column(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "a": 1,\n  "b": ,\n}\n')
    with pytest.raises(
        ValueError, match=r"config.json is not valid JSON: Expecting value at line 3, column 8$"
    ):
        loading.read_config(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json must hold a JSON object .* but it holds an array"):
        loading.read_config(path)
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match=r"config.json is not UTF-8 text \(bad byte at offset 7\)"):
        loading.read_config(path)
    path.write_text('{"a": 1}')
    assert loading.read_config(path) == {"a": 1}


@pytest.mark.parametrize(
    "loader",
    [
        "clip.load_clip",
        "t5.load_t5",
        "flux.load_flux",
        "flux_ae.load_flux_ae",
        "qwen_image.load_qwen_image",
        "qwen_image_vae.load_qwen_image_vae",
        "qwen2_5_vl.load_qwen2_5_vl",
    ],
)
def test_model_loaders_report_a_broken_config(tmp_path, loader):
    module, name = loader.split(".")
    load = getattr(importlib.import_module(f"models.{module}"), name)
    (tmp_path / "config.json").write_text('{"hidden_size": 8,}')
    _write_raw(tmp_path / "model.safetensors", {}, b"")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON: .* at line 1, column 19$"):
        load(tmp_path)
