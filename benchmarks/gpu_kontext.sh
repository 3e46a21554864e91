#!/usr/bin/env bash
# One-shot GPU check for the SpecEdit core: full-size FLUX.1-Kontext-dev with random bf16 weights at 1024^2,
# the 50-step baseline against SpecEdit-18 and SpecEdit-9 at a 25 % expanded fraction. Runs from the repo
# root with whatever torch the machine has (no install): PYTHONPATH=. is enough.
set -euo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/specedit-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
python3 -m specedit.cli bench --model flux-kontext-dev --config full --random-weights --device cuda --dtype bf16 \
    --height 1024 --width 1024 --methods baseline-50,specedit-18,specedit-9 --expand-fraction 0.25 \
    --warmup 1 --repeats 3 --json | tee "$OUT/kontext_bench.jsonl"
python3 - "$OUT/kontext_bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:
    print(f"{r['method']:14s} nfe={r['nfe']:3d} latency={r['latency_s']:7.2f}s x{r['latency_speedup']:.2f} "
          f"tflops={r['tflops']:8.1f} x{r['flops_speedup']:.2f} fwd={r['forward_s']:.2f}s vae={r['vae_s']:.2f}s "
          f"other={r['overhead_pct']:.1f}% mfu={r.get('mfu', float('nan')):.3f}")
PY
