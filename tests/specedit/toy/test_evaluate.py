"""``specedit demo`` / ``specedit eval`` on a throwaway toy editor (trained 3 steps), and their pieces."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from specedit import viz_plots
from specedit.cli import main
from specedit.toy import evaluate as ev
from specedit.toy.data import GLOBAL_EDITS, LOCAL_EDITS
from specedit.toy.recipe import train_toy

EVAL_ARGS = ["--n", "2", "--methods", "steps-9,specedit-9", "--reference", "steps-10", "--quiet"]


@contextlib.contextmanager
def threads(n: int | None):
    """Run with ``n`` torch threads (the CLI sets 1 on the CPU), then restore the previous count."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _restore_threads():
    with threads(None):
        yield


@pytest.fixture(scope="session")
def toy_weights(tmp_path_factory):
    """A throwaway toy editor trained for a few steps, shared by the tests that need one."""
    run = tmp_path_factory.getbasetemp() / "toy-throwaway"
    if not (run / "weights" / "config.json").is_file():
        with threads(1):
            train_toy(run, ae_steps=3, n_train=16, steps=3, batch=4)
    return run / "weights"


@pytest.fixture(scope="module")
def single_eval(toy_weights, tmp_path_factory):
    """One single-process ``specedit eval`` (1 thread, like each torchrun rank): its folder and its stdout."""
    out = tmp_path_factory.mktemp("eval-single")
    stdout = io.StringIO()
    with threads(None), contextlib.redirect_stdout(stdout):
        rc = main(["eval", "--weights", str(toy_weights), "--out", str(out), "--threads", "1", *EVAL_ARGS])
    assert rc == 0
    return out, stdout.getvalue()


# ----------------------------------------------------------------------------------------------- no model
def test_cases_are_held_out_and_mix_local_and_global():
    cases = ev.demo_cases(4)
    assert all(c.seed >= 5_000_000 for c in cases)
    assert {c.scope for c in cases} == {"local", "global"}
    suite = ev.eval_cases(4, 10)
    assert [c.seed for c in suite] == [6_000_010, 6_000_011, 6_000_012, 6_000_013]
    assert [c.example.kind in LOCAL_EDITS for c in suite] == [True, False, True, False]
    assert all(c.example.kind in GLOBAL_EDITS for c in suite if c.scope == "global")
    assert [c.index for c in ev.eval_cases(5, indices=ev.Dist(1, 2).shard(5))] == [1, 3]
    with pytest.raises(ValueError, match="n must be"):
        ev.demo_cases(99)


def test_dist_from_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert ev.Dist.from_env() == ev.Dist(0, 1, 0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ev.Dist.from_env() == ev.Dist(1, 2, 1)
    assert ev.Dist(1, 2, 1).device("cpu") == torch.device("cpu")


def test_aggregate_means_speedups_and_local_global_split():
    def rec(method, index, scope, tflops, latency, psnr, **verdict):
        return {"method": method, "index": index, "scope": scope, "nfe": 1, "tflops": tflops,
                "latency_s": latency, **{k: psnr for k in ev.FIDELITY}, **verdict}  # fmt: skip

    v = lambda iou, exp: {"iou": iou, "precision": iou, "recall": 1.0, "expanded_fraction": exp}
    records = [
        rec("baseline-50", 0, "local", 4.0, 2.0, math.inf),
        rec("baseline-50", 1, "global", 4.0, 2.0, math.inf),
        rec("specedit-18", 0, "local", 1.0, 0.5, 30.0, **v(0.5, 0.25)),
        rec("specedit-18", 1, "global", 1.0, 0.5, 20.0, **v(math.nan, 0.75)),
    ]
    base, spec = ev.aggregate(records)
    assert base["psnr_ref"] is None and base["flops_speedup"] == 1.0 and "iou_local" not in base
    assert spec["flops_speedup"] == 4.0 and spec["latency_speedup"] == 4.0 and spec["psnr_ref"] == 25.0
    assert spec["iou_local"] == 0.5 and spec["expanded_fraction_global"] == 0.75 and spec["n_global"] == 1
    assert ev.clean({"a": [math.nan, math.inf, 1.5]}) == {"a": [None, None, 1.5]}
    with pytest.raises(ValueError, match="no 'steps-10'"):
        ev.aggregate(records, reference="steps-10")


def test_unknown_methods_and_missing_weights(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown methods"):
        ev.parse_methods("specedit-18,nope")
    assert main(["demo", "--weights", str(tmp_path / "none")]) == 2
    assert "no toy editor weights" in capsys.readouterr().err
    assert main(["eval", "--methods", "nope"]) == 2


# ----------------------------------------------------------------------------------------------- with a model
def test_out_that_is_a_file_fails_before_any_work(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("x")
    missing = str(tmp_path / "no-weights")  # would fail later: --out is checked first
    for command in ("demo", "eval"):
        assert main([command, "--out", str(taken), "--weights", missing]) == 2
        err = capsys.readouterr().err
        assert err == f"specedit {command}: error: --out {taken} is a file, not a folder\n"
        assert main([command, "--out", str(taken / "sub"), "--weights", missing]) == 2
        assert f"--out {taken / 'sub'}: {taken} is a file, not a folder" in capsys.readouterr().err
    assert taken.read_text() == "x"


def test_demo_writes_panels_report_and_table(toy_weights, tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    for name in ("notes.txt", "panel_old.png", "panel_5_move.png"):  # a stranger's files and a stale panel
        (out / name).write_text(name)
    argv = ["demo", "--weights", str(toy_weights), "--out", str(out), "--n", "2", "--methods", "specedit-9"]
    assert main([*argv, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "baseline-50" in printed and "specedit-9" in printed and "x FLOPs" in printed
    report = json.loads((out / "report.json").read_text())
    assert {"methods", "examples", "records", "reference", "device", "threads", "seconds"} <= set(report)
    assert [r["method"] for r in report["methods"]] == ["baseline-50", "specedit-9"]
    spec = report["methods"][1]
    keys = {
        "tflops",
        "latency_s",
        "latency_speedup",
        "flops_speedup",
        "psnr_ref",
        "psnr_ref_edit",
        "psnr_ref_keep",
        "ssim_ref",
        "ssim_ref_edit",
        "ssim_ref_keep",
        "psnr_gt",
        "iou",
        "expanded_fraction",
    }
    assert keys <= set(spec)
    assert spec["flops_speedup"] > 1 and 0 <= spec["expanded_fraction"] <= 1
    assert {e["scope"] for e in report["examples"]} == {"local", "global"}
    for e in report["examples"]:
        assert os.path.isfile(e["panel"]) and e["seed"] >= 5_000_000
    panels = sorted(p.name for p in out.glob("panel_*_*.png"))
    assert panels == sorted(os.path.basename(e["panel"]) for e in report["examples"])  # the stale one is gone
    assert (out / "notes.txt").read_text() == "notes.txt" and (out / "panel_old.png").is_file()
    assert main([*argv[:-4], "--n", "1", "--methods", "specedit-9", "--quiet"]) == 0  # fewer examples
    report = json.loads((out / "report.json").read_text())
    panel = os.path.basename(report["examples"][0]["panel"])
    assert len(report["examples"]) == 1 and [p.name for p in out.glob("panel_*_*.png")] == [panel]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["notes.txt", "panel_old.png", "report.json", panel]
    )


def test_eval_writes_json_lines_table_and_plot(single_eval):
    out, printed = single_eval
    rows = ev.read_jsonl(out / "metrics.jsonl")
    assert [r["method"] for r in rows] == ["steps-10", "steps-9", "specedit-9"]
    spec = rows[2]
    keys = {
        "psnr_ref",
        "psnr_ref_edit",
        "psnr_ref_keep",
        "ssim_ref",
        "psnr_gt",
        "psnr_gt_edit",
        "iou_local",
        "precision_local",
        "recall_local",
        "expanded_fraction_global",
        "tflops",
        "latency_s",
    }
    assert keys <= set(spec)
    assert "iou_local" not in rows[1]  # no verifier
    assert len(ev.read_jsonl(out / "examples.jsonl")) == 6
    assert "specedit-9" in printed and "IoU L" in printed
    assert (out / "speed_quality.png").is_file() == viz_plots.available()


def _same_records(got: list[dict], want: list[dict]) -> None:
    """Equal records but for the timing field (latency)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k != "latency_s"} == {
            k: v for k, v in w.items() if k != "latency_s"
        }


def test_eval_resumes_a_killed_run_and_never_shrinks(single_eval, toy_weights, tmp_path, capsys):
    out = tmp_path / "eval"
    toy = ev.load_toy(toy_weights)
    names = ev.parse_methods("steps-9,specedit-9", reference="steps-10")

    def killed_in_example_1(msg: str) -> None:
        if msg.startswith("example 1 "):
            raise KeyboardInterrupt

    with threads(1), pytest.raises(KeyboardInterrupt):
        ev.evaluate_suite(toy, names, n=2, reference="steps-10", out=out, log=killed_in_example_1)
    first = ev.read_jsonl(out / "examples.jsonl")
    assert [(r["method"], r["index"]) for r in first] == [("steps-10", 0), ("steps-9", 0), ("specedit-9", 0)]
    with (out / "examples.jsonl").open("ab") as f:
        f.write(b'{"method": "steps-9", "ind')  # a line cut short by the kill
    argv = ["eval", "--weights", str(toy_weights), "--out", str(out), "--threads", "1", "--no-plot"]
    assert main([*argv, *EVAL_ARGS]) == 0
    capsys.readouterr()
    resumed = ev.read_jsonl(out / "examples.jsonl")
    _same_records(resumed, ev.read_jsonl(single_eval[0] / "examples.jsonl"))
    timing = ("latency_s", "latency_speedup")
    rows = [{k: v for k, v in r.items() if k not in timing} for r in ev.read_jsonl(out / "metrics.jsonl")]
    assert rows == [
        {k: v for k, v in r.items() if k not in timing}
        for r in ev.read_jsonl(single_eval[0] / "metrics.jsonl")
    ]
    ran_once = {(r["method"], r["seed"]): r["latency_s"] for r in first}
    assert all(r["latency_s"] == ran_once[(r["method"], r["seed"])] for r in resumed if r["index"] == 0)

    smaller = [a if a != "2" else "1" for a in EVAL_ARGS]  # --n 1: the 2-example records must stay
    assert main([*argv, *smaller]) == 2
    assert "holds 3 records outside this suite (e.g. steps-10 on seed 6000001)" in capsys.readouterr().err
    other = [a if a != "steps-10" else "steps-9" for a in EVAL_ARGS]
    assert main([*argv, *other]) == 2
    assert (
        "holds records of another setup (differing: reference 'steps-10' (now 'steps-9'))"
        in capsys.readouterr().err
    )
    with pytest.raises(ValueError, match="holds 3 records that are not among the 3 to write"):
        ev.write_suite(first, out, reference="steps-10", plot=False)
    assert ev.read_jsonl(out / "examples.jsonl") == resumed


def test_torchrun_shards_and_merges_like_a_single_process(single_eval, toy_weights, tmp_path):
    out = tmp_path / "eval-dist"
    args = [arg if arg != "--n" else "--num-examples" for arg in EVAL_ARGS]  # torchrun claims --n itself
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "specedit.cli", "eval", "--weights", str(toy_weights), "--out", str(out), "--no-plot", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    merged = ev.read_jsonl(out / "examples.jsonl")
    single = ev.read_jsonl(single_eval[0] / "examples.jsonl")
    assert len(merged) == len(single) == 6
    for m, s in zip(merged, single):
        assert m.keys() == s.keys()
        for k in m:
            if k == "latency_s":
                continue
            if isinstance(s[k], float):
                assert m[k] == pytest.approx(s[k], rel=1e-5, abs=1e-7), (s["method"], s["index"], k)
            else:
                assert m[k] == s[k], (s["method"], s["index"], k)


# ----------------------------------------------------------------------------------------------- toy-stochastic
def test_stochastic_suite_cycles_its_kinds_on_its_own_seeds():
    cases = ev.eval_cases(4, 1, suite="toy-stochastic")
    assert [c.seed for c in cases] == [8_000_001, 8_000_002, 8_000_003, 8_000_004]
    assert [c.example.kind for c in cases] == ["pattern", "scatter", "add-somewhere", "pattern"]
    assert {c.scope for c in cases} == {"stochastic"}
    with pytest.raises(ValueError, match="unknown toy suite 'toy-curved'; choose from toy, toy-stochastic"):
        ev.eval_cases(1, suite="toy-curved")


def test_curvature_is_zero_on_a_straight_path_and_grows_as_it_turns():
    sig = torch.linspace(1, 0, 6)
    straight = [{"sigma": sig[i], "sigma_next": sig[i + 1], "v": torch.ones(1, 4, 2)} for i in range(5)]
    assert ev.curvature(straight) == pytest.approx(0.0, abs=1e-12)
    turning = [dict(s, v=torch.ones(1, 4, 2) * (1 + (i % 2))) for i, s in enumerate(straight)]
    assert ev.curvature(turning) > 0.05
    staged = [dict(s, stage="draft" if i < 2 else "full") for i, s in enumerate(straight)]
    assert ev.curvature(staged) is None and ev.curvature([]) is None


def test_stochastic_eval_records_validity_and_curvature(toy_weights, tmp_path):
    out = tmp_path / "stochastic"
    with threads(None), contextlib.redirect_stdout(io.StringIO()) as printed:
        rc = main(["eval", "--suite", "toy-stochastic", "--weights", str(toy_weights), "--out", str(out),
                   "--threads", "1", "--n", "3", "--methods", "steps-4,specedit-9", "--reference", "steps-10",
                   "--quiet"])  # fmt: skip
    assert rc == 0 and "toy-stochastic suite" in printed.getvalue() and "valid" in printed.getvalue()
    records = ev.read_jsonl(out / "examples.jsonl")
    assert {r["kind"] for r in records} == {"add-somewhere", "pattern", "scatter"}
    assert all(r["valid"] in (0.0, 1.0) and r["seed"] >= 8_000_000 for r in records)
    assert all(("curvature" in r) == r["method"].startswith("steps") for r in records)
    rows = {r["method"]: r for r in ev.read_jsonl(out / "metrics.jsonl")}
    assert rows["steps-4"]["curvature"] >= 0 and 0 <= rows["specedit-9"]["valid"] <= 1
    assert json.loads((out / "suite.json").read_text())["suite"] == "toy-stochastic"
