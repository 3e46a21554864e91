"""Kill-and-resume check of ``specedit eval``: a run is SIGKILLed after each of its first examples is written,
resumed each time, and its records are compared with an uninterrupted run's (timing fields excluded).

    python benchmarks/kill_resume_eval.py [--n 4] [--methods specedit-18,steps-9] [--work DIR]

Prints one line per kill (when, how many records were on disk) and the comparison; exit status 0 when every
record of the resumed run equals the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMING = ("latency_s", "latency_speedup")


def command(out: Path, a: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "specedit.cli", "eval", "--suite", "toy", "--n", str(a.n), "--methods", a.methods,
            "--out", str(out), "--quiet", "--no-plot"]  # fmt: skip


def records(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["method"], r["seed"]): {k: v for k, v in r.items() if k not in TIMING} for r in rows}


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def killed_run(out: Path, a: argparse.Namespace, env: dict) -> None:
    """Kill the run each time one more example's records land on disk, then let the last attempt finish."""
    per_example = len(a.methods.split(",")) + 1  # the reference is added
    for k in range(1, a.n):
        proc = subprocess.Popen(command(out, a), env=env)
        t0 = time.time()
        while lines(out / "examples.jsonl") < k * per_example and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        print(
            f"kill {k}: after {time.time() - t0:.1f} s, {lines(out / 'examples.jsonl')} records on disk",
            flush=True,
        )
    subprocess.run(command(out, a), env=env, check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--methods", default="specedit-18,steps-9")
    p.add_argument("--work", default=None)
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="kill-eval-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(work / "straight", a), env=env, check=True)
    killed_run(work / "killed", a, env)
    want, got = records(work / "straight" / "examples.jsonl"), records(work / "killed" / "examples.jsonl")
    same = want == got
    print(
        f"records: uninterrupted {len(want)}, killed and resumed {len(got)}; equal apart from timing: {same}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
