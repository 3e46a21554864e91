"""Judge a finished run: every saved image of a run folder scored by a judge, then the paper-style tables.

``score_records`` asks the judge about each record's image (GEdit: VIEScore SC / PQ / O; ImgEdit: the edit
type's 1-5 rubric; the toy suite is judged like GEdit). Answers come through the judge's on-disk cache, so a
rerun (after a kill, or to rebuild the tables) asks only what was never answered. ``write_scores`` writes
``scores.jsonl`` (one line per record: the scores, the judge's identity, malformed-answer flags),
``tables.md``, ``tables.json`` and, when matplotlib is importable, ``score_vs_speedup.png``, each atomically.

As GEdit-Bench's scorer does, the edited image is resized (LANCZOS) to the source image's size before it is
judged; the GEdit source is the dataset's ``input_image`` (the ``<key>_SRCIMG.png`` copy).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from specedit.evals import judges, tables
from specedit.evals.runner import Log, clean
from specedit.toy import atomic

SCORES = "scores.jsonl"
METRICS = {"gedit": tables.GEDIT_METRICS, "imgedit": tables.IMGEDIT_METRICS, "toy": tables.GEDIT_METRICS}
BY_LANGUAGE = {"gedit": True, "imgedit": False, "toy": False}


def _judged(edited: Image.Image, source: Image.Image) -> Image.Image:
    edited = edited.convert("RGB")
    return edited if edited.size == source.size else edited.resize(source.size, Image.LANCZOS)


def score_record(judge, suite: str, record: Mapping, source: Image.Image, edited: Image.Image,
                 instruction: str) -> dict:  # fmt: skip
    """One record's scores: its identity (method, key, category, language), the suite's metrics, the
    judge's identity and whether any answer was malformed (with the reason)."""
    source = source.convert("RGB")
    edited = _judged(edited, source)
    if suite == "imgedit":
        s = judges.imgedit_score(judge, source, edited, instruction, record["category"])
    else:
        s = judges.gedit_score(judge, source, edited, instruction)
    keep = ("method", "key", "category", "language", "intersection")
    return {**{k: record[k] for k in keep if k in record}, "judge": judge.identity, **s}


def score_records(records: Sequence[Mapping], judge, *, suite: str, source: Callable[[Mapping], Image.Image],
                  instruction: Callable[[Mapping], str], out: str | os.PathLike, log: Log = None,
                  progress: bool = False) -> list[dict]:  # fmt: skip
    """Scores of every record (its image is ``out / record["image"]``), in record order."""
    if suite not in METRICS:
        raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(METRICS)}")
    out = Path(out)
    missing = [r["image"] for r in records if not (out / r["image"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {out} are missing (e.g. {out / missing[0]}): rerun the "
                                "eval into this folder first")  # fmt: skip
    scores = []
    for r in tqdm(records, desc=f"judging ({judge.identity})", disable=not progress):
        with Image.open(out / r["image"]) as edited:
            scores.append(score_record(judge, suite, r, source(r), edited, instruction(r)))
        if log and scores[-1].get("malformed"):
            log(f"{r['method']} {r['key']}: malformed judge answer ({scores[-1].get('reason')})")
    return scores


def write_scores(scores: Sequence[Mapping], records: Sequence[Mapping], out: str | os.PathLike, *, suite: str,
                 reference: str, plot: bool = True) -> dict:  # fmt: skip
    """scores.jsonl, tables.md, tables.json and the score-versus-speedup plot in ``out``; returns the rows,
    the markdown and the paths written."""
    out = Path(out)
    metrics = METRICS[suite]
    rows = tables.score_rows(
        scores, records, metrics=metrics, reference=reference, by_language=BY_LANGUAGE[suite]
    )
    identity = sorted({s["judge"] for s in scores})
    text = tables.markdown(rows, metrics, title=f"{suite}: judge {', '.join(identity)}")
    if suite == "imgedit":
        text += "\n\n" + tables.category_markdown(rows, "score")
    paths = {
        "scores": atomic.write_jsonl(out / SCORES, [clean(dict(s)) for s in scores]),
        "tables": atomic.write_text(out / "tables.md", text + "\n"),
        "rows": atomic.write_json(out / "tables.json", clean({"judge": identity, "rows": rows})),
    }
    if plot:
        from specedit import viz_plots

        if viz_plots.available():
            import matplotlib.pyplot as plt

            ax = tables.plot(rows, metrics[-1])
            paths["plot"] = atomic.save_figure(ax.figure, out / "score_vs_speedup.png", dpi=130)
            plt.close(ax.figure)
    return {"rows": rows, "markdown": text, "paths": {k: str(v) for k, v in paths.items()}}
