#!/usr/bin/env bash
# One GPU session's checks for speed and memory (random bf16 weights, full size, 1024^2 + 1024^2 reference,
# median of 3): FLUX.1-Kontext-dev and Qwen-Image-Edit, baseline and SpecEdit-18/-9 eager and compiled, the
# distilled and caching presets, and the memory modes (fp8, block offload) with their peak memory. Every
# section writes JSON lines to $OUT (default benchmarks/results/gpu-<date>) and is capped by `timeout`, so a
# slow section cannot eat the others' time. Runs from the repo root with the machine's torch: PYTHONPATH=.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"

bench() {  # name, seconds, then the bench arguments
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" python3 -m specedit.cli bench --random-weights --device cuda --dtype bf16 --height 1024 \
        --width 1024 --expand-fraction 0.25 --warmup 1 --repeats 3 --json "$@" >"$OUT/$name.jsonl" \
        || echo "$name: exit $? (timeout or error)" | tee -a "$OUT/failures.txt"
    python3 benchmarks/gpu_summary.py "$OUT/$name.jsonl"
}

K="--model flux-kontext-dev --config full"
Q="--model qwen-image-edit --config full"
bench kontext_eager 150 $K --methods baseline-50,specedit-18,specedit-9,specedit-9-static
bench kontext_compiled 240 $K --methods baseline-50,specedit-18-static,specedit-9-static --compile max-autotune-no-cudagraphs
bench kontext_distill_cache 150 $K --methods distilled-8,distilled-6,specedit-distill-8,specedit-distill-6,taylorseer-6,specedit-30-taylorseer
bench qwen_eager 200 $Q --methods baseline-50,specedit-18,specedit-9,distilled-8,specedit-distill-8,taylorseer-6
bench kontext_fp8 90 $K --methods baseline-50,specedit-18 --fp8
bench kontext_offload2 120 $K --methods baseline-50,specedit-18 --transformer-offload 2
bench qwen_offload2 150 $Q --methods baseline-50,specedit-18 --transformer-offload 2 --fp8
ls -l "$OUT"
