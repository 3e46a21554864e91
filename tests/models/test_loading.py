"""Safetensors loader: single and sharded files, zero-copy views, strict errors, damaged files, hub errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
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
