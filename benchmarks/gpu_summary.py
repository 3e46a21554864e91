"""Print one line per method of a ``specedit bench --json`` file: latency and FLOPs speedups, their ratio, MFU,
peak memory and the modes that ran (used by benchmarks/gpu_fast_lean.sh)."""

import json
import sys


def main(path: str) -> None:
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        print(f"{path}: no results")
        return
    for r in rows:
        ratio = r["latency_speedup"] / r["flops_speedup"] if r.get("latency_speedup") else float("nan")
        print(f"{r['method']:24s} nfe={r['nfe']:3d} latency={r['latency_s']:7.2f}s x{r['latency_speedup']:.2f} "
              f"flops x{r['flops_speedup']:.2f} (ratio {ratio:.2f}) mfu={r.get('mfu') or float('nan'):.3f} "
              f"peak={r.get('peak_gib') or float('nan'):.1f}GiB compile={r.get('compile')} "
              f"attention={r.get('attention')} recompiles={r.get('recompiles')} fp8={r.get('fp8')} "
              f"offload={r.get('transformer_offload')}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
