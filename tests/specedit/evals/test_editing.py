"""The benchmark runner end to end on a synthetic GEdit-Bench (official parquet format) with the shipped toy
editor: records, official layout, resume after SIGKILL, torchrun sharding, setup checks, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pyarrow")

from minidata import write_gedit, write_imgedit  # noqa: E402

from specedit.evals import editing, fidelity  # noqa: E402
from specedit.evals.gedit import read_gedit  # noqa: E402
from specedit.evals.items import BenchData, EditItem  # noqa: E402
from specedit.presets import methods  # noqa: E402
from specedit.toy.evaluate import load_toy  # noqa: E402

TIMING = ("latency_s", "sample_s")
RUN = ["--suite", "gedit", "--model", "toy", "--methods", "specedit-9", "--reference", "steps-9",
       "--height", "128", "--width", "128", "--limit", "3", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_gedit(tmp_path_factory.mktemp("gedit"), n_per_lang=2)


def cli(*args: str, env: dict | None = None, torchrun: int = 0, check: bool = True):
    head = [sys.executable, "-m", "specedit.cli"]
    if torchrun:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", "-m",
                "specedit.cli"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([*head, *args], capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / editing.RECORDS).read_text().splitlines() if line.strip()]
    return sorted(({k: v for k, v in r.items() if k not in TIMING} for r in rows),
                  key=lambda r: (r["method"], r["key"]))  # fmt: skip


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    cli("eval", *RUN, "--data", str(data), "--out", str(out))
    return out


def test_records_and_official_layout(single):
    recs = read(single)
    assert [(r["method"], r["key"]) for r in recs] == [
        (m, k) for m in ("specedit-9", "steps-9") for k in ("cn/000000a0", "en/000000a0", "en/000000a1")
    ]
    for r in recs:
        assert (single / r["image"]).is_file()
        lang, key = r["key"].split("/")
        assert r["image"] == f"{r['method']}/fullset/{r['category']}/{lang}/{key}.png"
        assert (single / r["image"].replace(".png", "_SRCIMG.png")).is_file()  # GEdit's scorer needs it
        assert r["seed"] == 0 and r["nfe"] == 9 and r["tflops"] > 0
    spec = [r for r in recs if r["method"] == "specedit-9"]
    assert all(0 < r["expanded_fraction"] <= 1 and r["psnr"] > 20 for r in spec)
    assert all(r["expanded_fraction"] is None for r in recs if r["method"] == "steps-9")
    setup = json.loads((single / editing.SETUP).read_text())
    assert setup["suite"] == "gedit" and setup["reference"] == "steps-9" and setup["seed"] == 0


def test_sigkill_then_rerun_gives_the_uninterrupted_records(data, single, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "specedit.cli", "eval", *RUN, "--data", str(data), "--out", str(out)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.DEVNULL)
    records = out / editing.RECORDS
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if records.is_file() and len(records.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= len(records.read_text().splitlines()) < 6  # killed midway
    cli("eval", *RUN, "--data", str(data), "--out", str(out))
    assert read(out) == read(single)


def test_torchrun_two_ranks_equal_one_process(data, single, tmp_path):
    out = tmp_path / "run"
    cli("eval", *RUN, "--data", str(data), "--out", str(out), torchrun=2)
    assert read(out) == read(single)


def test_a_rerun_adds_nothing_and_another_setup_is_refused(data, single):
    before = (single / editing.RECORDS).read_bytes()
    cli("eval", *RUN, "--data", str(data), "--out", str(single))
    assert (single / editing.RECORDS).read_bytes() == before
    proc = cli("eval", *RUN, "--data", str(data), "--out", str(single), "--seed", "1", check=False)
    assert proc.returncode == 2
    assert "holds records of another setup (differing: seed 0 (now 1))" in proc.stderr


def test_bad_inputs_fail_in_one_line(data, tmp_path):
    proc = cli("eval", "--suite", "gedit", "--model", "toy", "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "needs --data (a folder or hub id), --model and --methods" in proc.stderr
    proc = cli("eval", *RUN, "--data", str(tmp_path), "--out", str(tmp_path / "o"), check=False)
    assert (
        proc.returncode == 2 and str(tmp_path) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    )
    items = [EditItem("a", "x", "c", load=lambda: Image.new("RGB", (8, 8)))] * 2
    with pytest.raises(ValueError, match="item key 'a' appears twice"):
        editing.check_keys(BenchData("gedit", items, lambda it: f"{it.key}.png"))
    with pytest.raises(ValueError, match=r"unknown methods \['nope'\]"):
        editing.check_methods(["nope"], methods("toy"), reference="baseline-50")


def test_run_suite_in_process_matches_the_cli(data, single, tmp_path):
    torch.set_num_threads(1)
    bench = read_gedit(str(data))
    bench = BenchData(bench.name, bench.items[:1], bench.layout, bench.source, bench.source_layout)
    size = {"height": 128, "width": 128}
    recs = editing.run_suite(load_toy(), bench, ["specedit-9"], tmp_path, identity={"model": "toy"},
                             reference="steps-9", options=size, known=methods("toy"))  # fmt: skip
    ours = {(r["method"], r["key"]): r for r in recs}
    for r in read(single):
        if (r["method"], r["key"]) in ours:
            mine = ours[(r["method"], r["key"])]
            assert mine["psnr"] == r["psnr"] and mine["expanded_fraction"] == r["expanded_fraction"]


def test_changed_region_rule():
    src = np.zeros((32, 32, 3), np.uint8)
    ref = src.copy()
    ref[8:16, 8:16] = 200  # an edited square
    ref[30, 30] = 255  # one noisy pixel: averaged away by the 5 x 5 box
    region = fidelity.changed_region(ref, src)
    assert region[10, 10] and region[12, 12] and not region[30, 30] and not region[0, 0]
    cells = fidelity.region_cells(region, (4, 4))
    assert cells[1, 1] and not cells[3, 3]
    agree = fidelity.mask_agreement(cells.clone(), region)
    assert agree["mask_iou"] == 1.0
    f = fidelity.fidelity(ref, ref, region)
    assert f["psnr"] is None and f["ssim"] == pytest.approx(1.0)  # identical: infinite PSNR is undefined
    with pytest.raises(ValueError, match="differ in size"):
        fidelity.changed_region(ref, src[:16])


def test_score_a_gedit_run_then_rescore_from_the_cache(single, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(single, out)
    first = cli("score", "--out", str(out), "--judge", "scripted", "--no-plot", "--quiet")
    assert "| specedit-9 | cn | 1 |" in first.stdout and "| steps-9 | en | 2 |" in first.stdout
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 6 and not any(s["malformed"] for s in scores)
    assert {s["judge"] for s in scores} == {"scripted:demo-script"}
    cache = sorted((out / "judge_cache").iterdir())
    assert 6 <= len(cache) <= 12  # SC and PQ per image; identical questions (en and cn share images) once
    stamps = [p.stat().st_mtime_ns for p in cache]
    again = cli("score", "--out", str(out), "--judge", "scripted", "--no-plot", "--quiet")
    assert again.stdout == first.stdout and [p.stat().st_mtime_ns for p in cache] == stamps
    proc = cli("score", "--out", str(tmp_path / "nothing"), "--judge", "scripted", check=False)
    assert proc.returncode == 2 and "holds no eval run" in proc.stderr


def test_imgedit_run_with_the_scripted_judge(tmp_path):
    data = write_imgedit(tmp_path / "data", n_per_type=1)
    out = tmp_path / "run"
    proc = cli("eval", *RUN[2:], "--suite", "imgedit", "--data", str(data), "--out", str(out), "--limit", "2",
               "--judge", "scripted", "--no-plot")  # fmt: skip
    recs = read(out)
    assert len(recs) == 4 and all(r["image"] == f"{r['method']}/{r['key']}.png" for r in recs)
    assert "overall (weighted)" in proc.stdout and "| specedit-9 | all |" in proc.stdout
