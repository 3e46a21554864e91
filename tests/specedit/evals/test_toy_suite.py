"""The toy suite through the shared runner with the scripted judge: images saved, records name them, scores
and tables written, and a rescore served by the judge cache."""

import contextlib
import io
import json

from specedit.cli import main


def run(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(args)) == 0
    return out.getvalue()


def test_toy_suite_judged_end_to_end(tmp_path):
    out = tmp_path / "toy"
    args = ["--n", "2", "--methods", "specedit-9", "--out", str(out), "--quiet", "--threads", "1"]  # fmt: skip
    text = run("eval", "--suite", "toy", *args, "--judge", "scripted")
    assert (out / "score_vs_speedup.png").is_file()  # matplotlib is a test extra
    assert "**toy: judge scripted:demo-script**" in text and "| specedit-9 | all | 2 |" in text
    records = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all((out / r["image"]).is_file() for r in records)
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [(s["method"], s["key"]) for s in scores] == [(r["method"], str(r["seed"])) for r in records]
    assert all(not s["malformed"] and 0 <= s["O"] <= 10 for s in scores)
    rescored = run("score", "--out", str(out), "--judge", "scripted", "--quiet")
    assert rescored.split("**toy")[1] == text.split("**toy")[1]
