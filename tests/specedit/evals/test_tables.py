"""Paper-style tables: GEdit's category mean per language, ImgEdit's sample-weighted and category-mean overall,
malformed answers counted and left out, speedups over the reference on the same items."""

import math

import pytest

from specedit.evals import tables


def rec(method, key, latency, tflops, category="a", language="en"):
    return {"method": method, "key": key, "category": category, "language": language, "latency_s": latency,
            "tflops": tflops, "nfe": 50 if method == "base" else 18, "expanded_fraction": None}  # fmt: skip


RECORDS = [
    rec("base", "1", 10.0, 100.0), rec("base", "2", 10.0, 100.0), rec("base", "3", 10.0, 100.0),
    rec("fast", "1", 2.0, 25.0), rec("fast", "2", 2.0, 25.0), rec("fast", "3", 2.0, 25.0),
]  # fmt: skip


def test_gedit_category_mean_and_weighted():
    scores = [
        {"method": "fast", "key": "1", "category": "a", "language": "en", "SC": 8.0, "PQ": 2.0, "O": 4.0},
        {"method": "fast", "key": "2", "category": "a", "language": "en", "SC": 6.0, "PQ": 6.0, "O": 6.0},
        {"method": "fast", "key": "3", "category": "b", "language": "en", "SC": 2.0, "PQ": 8.0, "O": 4.0},
        {"method": "base", "key": "1", "category": "a", "language": "en", "SC": None, "PQ": None, "O": None,
         "malformed": True},
    ]  # fmt: skip
    rows = tables.score_rows(
        scores, RECORDS, metrics=tables.GEDIT_METRICS, reference="base", by_language=True
    )
    fast = next(r for r in rows if r["method"] == "fast")
    assert fast["SC"] == pytest.approx(((8 + 6) / 2 + 2) / 2)  # mean of the category means
    assert fast["SC_weighted"] == pytest.approx((8 + 6 + 2) / 3)
    assert fast["O"] == pytest.approx((5 + 4) / 2)
    assert fast["latency_speedup"] == pytest.approx(5.0) and fast["flops_speedup"] == pytest.approx(4.0)
    base = next(r for r in rows if r["method"] == "base")
    assert base["malformed"] == 1 and base["SC"] is None and base["n"] == 1
    text = tables.markdown(rows, tables.GEDIT_METRICS, title="t")
    assert "| fast | en | 3 | 4.500 | 6.000 | 4.500 | 5.333 |" in text and "| base | en | 1 | - |" in text


def test_imgedit_overall_both_ways():
    scores = [{"method": "fast", "key": str(i), "category": c, "score": s}
              for i, (c, s) in enumerate([("add", 5.0), ("add", 4.0), ("add", 3.0), ("remove", 1.0)])]  # fmt: skip
    records = [rec(m, str(i), 1.0, 1.0) for m in ("base", "fast") for i in range(4)]
    (row,) = tables.score_rows(scores, records, metrics=("score",), reference="base", by_language=False)
    assert row["score_weighted"] == pytest.approx(13 / 4)  # what the paper's Overall matches
    assert row["score"] == pytest.approx((4 + 1) / 2)
    assert row["categories"]["add"] == {"n": 3, "score": pytest.approx(4.0)}
    text = tables.category_markdown([row], "score")
    assert "| fast | all | 4.000 | 1.000 | 3.250 | 2.500 |" in text


def test_speedups_need_the_reference():
    with pytest.raises(ValueError, match="hold no 'baseline-50' runs"):
        tables.speedups(RECORDS, "baseline-50")
    assert math.isclose(tables.speedups(RECORDS, "base")["fast"]["latency_speedup"], 5.0)
