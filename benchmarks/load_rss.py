"""Loading benchmark: write a ~2 GB synthetic FLUX checkpoint in the official BFL layout, load it with
``models.flux.load_flux``, touch every weight, and report peak RSS against the file size.

    python benchmarks/load_rss.py [--gb 2.0] [--dir /tmp/specedit-bench] [--dtype bf16]

The load runs in a child process whose peak-RSS counter (VmHWM) is reset just before loading, so the figure
is the memory the load itself adds. Target: <= 1.15 x the file size for a native-dtype load.
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
import json, sys, time, torch
from models.flux import FluxConfig, load_flux

def status(field):  # kB
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])

path, spec = sys.argv[1], json.loads(sys.argv[2])
cfg = FluxConfig(**{**spec, "axes_dim": tuple(spec["axes_dim"])})
dtype = {"native": None, "fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[3]]
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
base = status("VmRSS")
t0 = time.perf_counter()
model = load_flux(path, config=cfg, dtype=dtype)
t_load = time.perf_counter() - t0
after_load = status("VmRSS")
with torch.no_grad():
    checksum = sum(float(p.float().sum()) for p in model.parameters())  # touch every page
print(json.dumps({"load_s": t_load, "rss_added_after_load_mb": (after_load - base) / 1024,
                  "peak_rss_added_mb": (status("VmHWM") - base) / 1024, "checksum": checksum}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0, help="approximate checkpoint size")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--dtype", default="native", choices=["native", "fp32", "bf16"], help="load dtype")
    a = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    from models.flux import FLUX_KONTEXT_DEV, Flux

    # FLUX.1-Kontext-dev widths, fewer blocks: ~189 M bf16 parameters per double+2 single blocks
    per_block = 12 * 3072**2 * 2  # params of one double block, roughly
    n = max(1, round(a.gb * 1e9 / 2 / per_block / 2))
    cfg = replace(FLUX_KONTEXT_DEV, depth=n, depth_single_blocks=2 * n)
    tmp = Path(a.dir or tempfile.mkdtemp(prefix="specedit-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "flux1-synthetic.safetensors"
    t0 = time.perf_counter()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Flux(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    save_file({k: (torch.randn(s, generator=g) * 0.02).bfloat16() for k, s in shapes.items()}, path)
    t_write = time.perf_counter() - t0
    size_mb = path.stat().st_size / 2**20

    cfg_json = json.dumps({**cfg.__dict__, "axes_dim": list(cfg.axes_dim)})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), cfg_json, a.dtype],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    r = json.loads(out.stdout)
    r.update(
        file_mb=size_mb,
        write_s=t_write,
        dtype=a.dtype,
        blocks=f"{cfg.depth}+{cfg.depth_single_blocks}",
        peak_over_file=r["peak_rss_added_mb"] / size_mb,
    )
    print(json.dumps(r, indent=1))
    if not a.dir:
        path.unlink()
        tmp.rmdir()


if __name__ == "__main__":
    main()
