#!/usr/bin/env bash
# One-shot GPU run of the whole toy-editor recipe: examples (14 worker processes), the autoencoder on whole
# images, then the transformer + text encoder with a schedule sized to the remaining time budget.
# Writes the EMA weights (fp16), the summary and the training log under $OUT.
# The data follow the recipe's kind weights (add / resize / move and the stochastic edits drawn more often);
# EXTRA passes more train-toy options, e.g. EXTRA="--init-from specedit/toy/weights --ae-from specedit/toy/weights"
# to fine-tune the shipped editor instead of training from scratch.
set -euo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/specedit-gpu-toy}
MINUTES=${MINUTES:-5.3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m specedit.cli train-toy --run /tmp/toy-gpu --device cuda --workers 14 --n-train 40000 \
    --ae-steps 4000 --ae-batch 32 --ae-crop 128 --batch 64 --steps 0 --lr 5e-4 --ema 0.999 --edit-weight 6 \
    ${EXTRA:-} --minutes "$MINUTES" --out "$OUT/weights" --quiet > "$OUT/summary.json" || { cat "$OUT/summary.json"; exit 1; }
cat "$OUT/summary.json"
gzip -c /tmp/toy-gpu/log.jsonl > "$OUT/log.jsonl.gz"
python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("/tmp/toy-gpu/log.jsonl")]
for stage in ("ae", "dit"):
    r = [x for x in rows if x["stage"] == stage]
    if r:
        k = max(1, len(r) // 10)
        print(stage, len(r), "steps; loss every", k, ":", [round(sum(x["loss"] for x in r[i:i + k]) / k, 4) for i in range(0, len(r), k)])
PY
ls -la "$OUT" "$OUT/weights"
