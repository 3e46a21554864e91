"""Benchmark evaluation: dataset readers (GEdit-Bench, ImgEdit-Bench), the sharded and resumable runner shared
with the toy suite, judge-free fidelity, judges (VIEScore-style GEdit scoring, ImgEdit's 1-5 rubric) and the
paper-style tables."""
