"""LoRA fusing memory benchmark: write a mid-size synthetic FLUX checkpoint (BFL keys, bf16) and a rank-16
LoRA on every linear layer, then, in a fresh child process, load the model memory-mapped with
``models.flux.load_flux``, ``fuse_lora`` the LoRA and ``unfuse_lora`` it, reporting resident memory against
the size of the weights.

    python benchmarks/lora_rss.py [--mb 400] [--rank 16] [--dir /tmp/specedit-bench]

Two children run: "file" (the library as is: weights that are views of the checkpoint's private memory map
are restored from the file, so fusing keeps no second copy) and "copy" (the same with
``models.lora.file_span`` patched to find nothing, i.e. every touched weight copied first, as before). Each
child resets its peak-RSS counter (VmHWM) just before loading, so ``peak_over_weights`` is
(VmHWM - RSS before loading) / weight bytes; ``ru_maxrss`` (``resource.getrusage``) is printed as well
(Linux resets it with VmHWM). ``restored`` checks that every weight equals the file's bytes after unfuse.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

CHILD = r"""
import hashlib, json, resource, sys, time, torch
import models.lora
from models.flux import FluxConfig, load_flux
from models.lora import fuse_lora, unfuse_lora

def rss(field="VmRSS"):  # MiB
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) / 1024

path, lora, spec, mode = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
if mode == "copy":
    models.lora.file_span = lambda t: None
cfg = FluxConfig(**{**spec, "axes_dim": tuple(spec["axes_dim"])})
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
base = rss()
model = load_flux(path, config=cfg)
weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
def digest():  # reads every page, as inference does
    return [hashlib.sha1(p.detach().reshape(-1).view(torch.uint8).numpy()).digest() for p in model.parameters()]

before = digest()
loaded = rss()
t0 = time.perf_counter()
fuse_lora(model, lora, scale=0.7)
t_fuse = time.perf_counter() - t0
fused, peak_fuse = rss(), rss("VmHWM")
t0 = time.perf_counter()
unfuse_lora(model)
t_unfuse = time.perf_counter() - t0
unfused = rss()
after = digest()
print(json.dumps(dict(
    mode=mode, weights_mb=weights_mb, fuse_s=t_fuse, unfuse_s=t_unfuse,
    rss_added_after_load_and_touch_mb=loaded - base, rss_added_after_fuse_mb=fused - base,
    rss_added_after_unfuse_mb=unfused - base, peak_added_mb=rss("VmHWM") - base,
    peak_over_weights=(rss("VmHWM") - base) / weights_mb, peak_during_fuse_over_weights=(peak_fuse - base) / weights_mb,
    ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_before_load_mb=base,
    restored=before == after,
)))
"""


def write_files(mb: float, rank: int, folder: Path) -> tuple[Path, Path, dict]:
    """A synthetic bf16 FLUX (Kontext widths scaled down) of about ``mb`` MiB and a LoRA on every linear."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from models.flux import FLUX_KONTEXT_DEV, Flux

    d = 1024
    per_pair = (36 + 2 * 15) * d * d * 2  # bytes of one double block + two single blocks
    n = max(1, round(mb * 2**20 / per_pair))
    cfg = replace(FLUX_KONTEXT_DEV, hidden_size=d, num_heads=8, depth=n, depth_single_blocks=2 * n)
    with torch.device("meta"):
        model = Flux(cfg)
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=g) * 0.02).bfloat16() for k, v in model.state_dict().items()}
    save_file(state, folder / "flux1-synthetic.safetensors")
    lora = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            key = f"diffusion_model.{name}"
            lora[f"{key}.lora_down.weight"] = (
                torch.randn(rank, mod.in_features, generator=g) * 0.01
            ).bfloat16()
            lora[f"{key}.lora_up.weight"] = (
                torch.randn(mod.out_features, rank, generator=g) * 0.01
            ).bfloat16()
            lora[f"{key}.alpha"] = torch.tensor(rank / 2)
    save_file(lora, folder / "lora.safetensors")
    spec = {**cfg.__dict__, "axes_dim": list(cfg.axes_dim)}
    return folder / "flux1-synthetic.safetensors", folder / "lora.safetensors", spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=400, help="approximate checkpoint size in MiB")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temp dir, removed)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="specedit-lora-") as tmp:
        folder = Path(a.dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        path, lora, spec = write_files(a.mb, a.rank, folder)
        print(
            f"wrote {path.stat().st_size / 2**20:.0f} MiB checkpoint + {lora.stat().st_size / 2**20:.1f} MiB "
            f"LoRA (rank {a.rank}, {spec['depth']}+{spec['depth_single_blocks']} blocks, width "
            f"{spec['hidden_size']}) in {time.perf_counter() - t0:.1f} s"
        )
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        for mode in ("file", "copy"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(path), str(lora), json.dumps(spec), mode],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            print(json.dumps(json.loads(out.stdout), indent=1))


if __name__ == "__main__":
    main()
