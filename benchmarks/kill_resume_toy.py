"""Kill-and-resume check of ``specedit train-toy``: a tiny run is SIGKILLed at random moments and while files are
being written (a checkpoint, the final weights folder), resumed after each kill, and compared with an
uninterrupted run of the same settings.

    python benchmarks/kill_resume_toy.py [--kills 8] [--seed 0] [--work DIR]

Each process runs with one thread (OMP_NUM_THREADS=1), so both runs execute the same kernels. Prints one line per
kill (when, in which stage, the checkpoints on disk, the temporary files a killed writer left) and the
comparison: the sha256 of each file of the two weights folders and the largest difference over every tensor of
the fp32 checkpoints (model, EMA, optimizer state). Exit status 0 when everything is bit-equal.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specedit.toy import atomic  # noqa: E402
from specedit.toy.model import EDITOR_FILES  # noqa: E402

# the smallest run that makes every stage do real work: 16 examples, 30 AE steps on 32 px crops, 30 transformer
# steps at batch 2 over all four layouts (full, 2x, 4x coarser, mixed), a checkpoint every 4 steps
SETTINGS = ["--n-train", "16", "--ae-steps", "30", "--ae-batch", "2", "--ae-crop", "32", "--steps", "30",
            "--batch", "2", "--res-probs", "0.4,0.3,0.2,0.1", "--checkpoint-every", "4"]  # fmt: skip
CHECKPOINTS = ("ae_ckpt.safetensors", "dit_ckpt.safetensors")


def _start(run: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "specedit.cli", "train-toy", "--run", str(run), "--device", "cpu", "--quiet",
           *SETTINGS]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"train-toy failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
    return json.loads(out)


def _saving(run: Path, pid: int) -> str | None:
    """The temporary file or folder that process ``pid`` is writing in ``run`` (None when none)."""
    for name in os.listdir(run) if run.is_dir() else ():
        m = atomic.STALE.fullmatch(name)
        if m and m["tag"] == "tmp" and int(m["pid"]) == pid:
            return name
    return None


def _logged(run: Path, offset: int) -> tuple[str, int] | None:
    """The (stage, step) of the last line appended to the run's log after byte ``offset`` (None: none yet)."""
    path = run / "log.jsonl"
    if not path.is_file() or path.stat().st_size <= offset:
        return None
    with path.open("rb") as f:
        f.seek(offset)
        lines = [line for line in f.read().splitlines() if line.endswith(b"}")]
    return (json.loads(lines[-1])["stage"], json.loads(lines[-1])["step"]) if lines else None


def _kill(proc: subprocess.Popen, run: Path, when: tuple, rng: random.Random) -> tuple[float, str | None]:
    """SIGKILL ``proc`` at ``when``: ("time", seconds after the start), ("step", stage, k: once this process
    has logged that step, after a random part of a step), ("ckpt", stage: while it writes that stage's
    checkpoint) or ("weights",: while it writes the weights folder). Returns the seconds from the start to the
    kill and the file being written then ("-": none; None when the process finished first)."""
    t0 = time.monotonic()
    log = run / "log.jsonl"
    offset = log.stat().st_size if log.is_file() else 0
    while proc.poll() is None:
        writing = _saving(run, proc.pid)
        if when[0] == "time":
            hit = time.monotonic() - t0 >= when[1]
        elif when[0] == "step":
            last = _logged(run, offset)
            hit = last is not None and last[0] == when[1] and last[1] >= when[2]
            if hit:
                time.sleep(rng.uniform(0.0, 0.3))
        elif when[0] == "ckpt":
            hit = writing is not None and writing.startswith(f".{when[1]}_ckpt")
        else:
            hit = writing is not None and writing.startswith(".weights.")
        if hit:
            writing = _saving(run, proc.pid)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return time.monotonic() - t0, writing or "-"
        time.sleep(0.0005)
    proc.communicate()
    return time.monotonic() - t0, None


def _plan(kills: int, rng: random.Random) -> list[tuple]:
    """Kill points spread over the stages: early (example bank, start of the AE), AE steps, an AE checkpoint
    write, transformer steps, a transformer checkpoint write, the final weights write; then random steps."""
    plan = [("time", round(rng.uniform(1.0, 8.0), 2)), ("step", "ae", rng.randint(2, 12)), ("ckpt", "ae"),
            ("step", "ae", rng.randint(14, 28)), ("step", "dit", rng.randint(2, 10)), ("ckpt", "dit"),
            ("step", "dit", rng.randint(12, 28)), ("weights",)]  # fmt: skip
    while len(plan) < kills:
        plan.insert(-1, ("step", "dit", rng.randint(2, 29)))
    return plan[:kills] if kills < len(plan) else plan


def _steps(run: Path) -> str:
    parts = []
    for name in CHECKPOINTS:
        if (run / name).is_file():
            with safe_open(str(run / name), "pt") as f:
                parts.append(f"{name.split('_')[0]} {int(f.get_tensor('step')[0])}")
    return ", ".join(parts) or "none"


def _last_log(run: Path) -> str:
    lines = (run / "log.jsonl").read_text().splitlines() if (run / "log.jsonl").is_file() else []
    if not lines:
        return "no step logged"
    entry = json.loads(lines[-1])
    return f"{entry['stage']} step {entry['step']}"


def compare(reference: Path, resumed: Path) -> bool:
    """Print the comparison of two runs; True when weights and checkpoints are bit-equal."""
    equal = True
    for name in EDITOR_FILES:
        same = atomic.sha256(reference / "weights" / name) == atomic.sha256(resumed / "weights" / name)
        equal &= same
        print(f"  weights/{name:26s} sha256 {'equal' if same else 'DIFFERENT'}")
    steps = [json.loads((r / "weights" / "manifest.json").read_text())["step"] for r in (reference, resumed)]
    print(f"  manifest steps: uninterrupted {steps[0]}, resumed {steps[1]}")
    equal &= steps[0] == steps[1]
    for name in CHECKPOINTS:
        a, b = load_file(str(reference / name)), load_file(str(resumed / name))
        diff = (
            max((a[k].double() - b[k].double()).abs().max().item() for k in a)
            if a.keys() == b.keys()
            else None
        )
        n_equal = sum(torch.equal(a[k], b[k]) for k in a if k in b)
        equal &= diff == 0
        print(f"  {name:28s} {n_equal}/{len(a)} tensors bit-equal, max |diff| {diff}")
    return equal


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=8, help="SIGKILLs (the first 8 spread over the stages)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    ap.add_argument(
        "--work", default=None, help="folder for the two runs (default: a temporary one, deleted)"
    )
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="kill-resume-"))
    rng = random.Random(a.seed)
    reference, resumed = work / "uninterrupted", work / "resumed"
    for run in (reference, resumed):
        shutil.rmtree(run, ignore_errors=True)
    t0 = time.monotonic()
    summary = _finish(_start(reference))
    wall = time.monotonic() - t0
    print(f"uninterrupted: {wall:.1f} s, AE {summary['ae']['ae_steps']} + transformer "
          f"{summary['dit']['dit_steps']} steps")  # fmt: skip
    kills = 0
    for i, when in enumerate(_plan(a.kills, rng), 1):
        seconds, writing = _kill(_start(resumed), resumed, when, rng)
        what = " ".join(str(w) for w in when)
        if writing is None:
            print(f"kill {i} ({what}): the run finished first ({seconds:.1f} s)")
            continue
        kills += 1
        left = [n for n in os.listdir(resumed) if atomic.STALE.fullmatch(n)]
        print(f"kill {i} ({what}): SIGKILL {seconds:.2f} s after the start, writing {writing}; last logged "
              f"{_last_log(resumed)}; checkpoints on disk: {_steps(resumed)}; temporary files: "
              f"{left or 'none'}")  # fmt: skip
    t0 = time.monotonic()
    final = _finish(_start(resumed))
    left = [n for n in os.listdir(resumed) if atomic.STALE.fullmatch(n)]
    print(
        f"final resume: {time.monotonic() - t0:.1f} s, done {final['done']}, temporary files left: {left or 'none'}"
    )
    print(f"{kills} SIGKILLs; comparison with the uninterrupted run:")
    equal = compare(reference, resumed)
    print("RESULT:", "bit-equal" if equal else "DIFFERENT")
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
