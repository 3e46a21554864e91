"""``specedit eval`` (every suite) and ``specedit score`` on the command line.

    specedit eval --suite toy [--n N] [--methods LIST] [--out DIR] [--judge scripted]      # the toy suite
    specedit eval --suite gedit --data stepfun-ai/GEdit-Bench --model flux-kontext-dev \\
        --methods specedit-18,steps-18 --out runs/gedit-kontext [--languages en] [--judge openai ...]
    specedit eval --suite imgedit --data /data/Benchmark/singleturn --model qwen-image-edit --out runs/imgedit
    torchrun --nproc_per_node=8 -m specedit.cli eval --suite gedit ...      # items sharded over the ranks
    specedit score --out runs/gedit-kontext --judge openai --judge-url URL --judge-model gpt-4.1

``eval`` edits every item with every method (the reference, default baseline-50, first), saves the images
in the suite's official layout and records costs and judge-free fidelity; a rerun into the same ``--out``
resumes. With ``--judge`` it then scores the run (``score``). ``score`` judges a finished run folder and writes
``scores.jsonl``, ``tables.md``, ``tables.json`` and the plot; judge answers are cached in ``--judge-cache``
(default ``OUT/judge_cache``), so rescoring is free.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from specedit import validate as v
from specedit.toy import atomic

SUITES = ("toy", "toy-stochastic", "gedit", "imgedit")
JUDGES = ("scripted", "openai", "qwen-vl")


def _logger(a: argparse.Namespace, prefix: str = ""):
    if a.quiet:
        return None
    return lambda msg: print(f"{prefix}{msg}", file=sys.stderr, flush=True)


def check_judge(a: argparse.Namespace) -> None:
    """Judge flags that do not fit fail before any model loads."""
    if a.judge == "openai" and not (a.judge_url and a.judge_model):
        raise ValueError("--judge openai needs --judge-url (an OpenAI-compatible endpoint) and --judge-model")
    if a.judge == "qwen-vl" and not a.judge_weights:
        raise ValueError("--judge qwen-vl needs --judge-weights (a Qwen2.5-VL-Instruct folder or hub id)")


def make_judge(a: argparse.Namespace, out: Path):
    """The judge of the flags, answering through the on-disk cache."""
    from specedit.evals import judges

    if a.judge == "scripted":
        judge = judges.ScriptedJudge(judges.demo_script, name="demo-script")
    elif a.judge == "openai":
        judge = judges.OpenAIJudge(a.judge_url, a.judge_model, api_key_env=a.api_key_env or None)
    else:
        judge = judges.QwenVLJudge.from_pretrained(a.judge_weights, device=a.judge_device)
    return judges.cached(judge, a.judge_cache or out / "judge_cache")


def read_data(suite: str, data: str, a: argparse.Namespace):
    """The suite's items (GEdit: the --languages and --subset; --limit: the first N)."""
    from specedit.evals.items import BenchData

    if suite == "gedit":
        from specedit.evals.gedit import read_gedit

        languages = getattr(a, "languages", "en,cn")
        bench = read_gedit(
            data, languages=tuple(languages.split(",")), subset=getattr(a, "subset", "fullset")
        )
    else:
        from specedit.evals.imgedit import read_imgedit

        bench = read_imgedit(data)
    limit = getattr(a, "limit", None)
    if limit is not None:
        bench = BenchData(bench.name, bench.items[:limit], bench.layout, bench.source, bench.source_layout)
    return bench


def _pipeline(a: argparse.Namespace):
    """The pipeline, its preset table and its identity for the run's setup check."""
    import torch

    from specedit.cli import DTYPES, load_pipeline
    from specedit.families import get_family
    from specedit.presets import methods

    fam = get_family(a.model)
    dtype = a.dtype or ("fp32" if fam.name == "toy" else "bf16")
    a.lora = [v.lora_spec(a.lora)] if a.lora else []
    identity = {"model": a.model, "weights": a.weights, "dtype": dtype, "loras": [list(x) for x in a.lora]}
    if fam.name == "toy":  # the toy editor is its own pipeline
        from specedit.toy.evaluate import load_toy

        pipe = load_toy(a.weights, device=a.device, dtype=getattr(torch, DTYPES[dtype]))
    else:
        a.dtype = dtype
        pipe = load_pipeline(a, fam)
    return pipe, methods(fam), identity


def bench_eval(a: argparse.Namespace) -> None:
    """``specedit eval --suite gedit|imgedit``."""
    from specedit.evals.editing import run_suite
    from specedit.evals.runner import Dist

    if a.data is None or a.model is None or a.methods is None:
        raise ValueError(f"--suite {a.suite} needs --data (a folder or hub id), --model and --methods")
    out = atomic.check_folder(a.out)
    check_judge(a)
    bench = read_data(a.suite, a.data, a)  # bad data fails before any weight loads
    dist = Dist.from_env()
    a.device = str(dist.device(a.device))
    pipe, known, identity = _pipeline(a)
    options = {k: getattr(a, k) for k in ("height", "width") if getattr(a, k) is not None}
    names = [n.strip() for n in a.methods.split(",") if n.strip()]
    records = run_suite(pipe, bench, names, out, identity=identity, reference=a.reference, seed=a.seed,
                        options=options, dist=dist, log=_logger(a, dist.prefix), known=known)  # fmt: skip
    if records is None:  # not rank 0
        return
    from specedit.evals import tables

    speed = tables.speedups(records, a.reference)
    print(json.dumps({"out": str(out), "records": len(records), "methods": speed}, indent=1))
    if a.judge:
        _score_bench(a, out, bench, records)


def _score_bench(a: argparse.Namespace, out: Path, bench, records: list[dict]) -> None:
    from specedit.evals import scoring

    items = {item.key: item for item in bench.items}
    source = lambda r: items[r["key"]].meta.get("load_srcimg", items[r["key"]].load)()
    scores = scoring.score_records(records, make_judge(a, out), suite=bench.name, source=source,
                                   instruction=lambda r: items[r["key"]].instruction, out=out,
                                   log=_logger(a), progress=not a.quiet)  # fmt: skip
    result = scoring.write_scores(scores, records, out, suite=bench.name, reference=a.reference,
                                  plot=not getattr(a, "no_plot", False))  # fmt: skip
    _print_tables(result)


def _print_tables(result: dict) -> None:
    print(result["markdown"])
    for name, path in result["paths"].items():
        print(f"{name}: {path}")


def _score(a: argparse.Namespace) -> None:
    """``specedit score``: judge the run in ``--out`` (its run.json says the suite and data)."""
    from specedit.evals import editing

    out = Path(a.out)
    setup_file = out / editing.SETUP
    check_judge(a)
    if not setup_file.is_file():
        from specedit.toy.cli_commands import score_toy

        if (out / "suite.json").is_file():  # a toy eval folder
            return score_toy(a, out, make_judge(a, out))
        raise FileNotFoundError(f"{out} holds no eval run ({editing.SETUP} or suite.json missing)")
    setup = json.loads(setup_file.read_text())
    bench = read_data(setup["suite"], a.data or setup["data"], a)
    records = atomic.read_lines(out / editing.RECORDS)
    a.reference = setup["reference"]
    _score_bench(a, out, bench, records)


def add_judge_flags(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--judge", choices=JUDGES, required=required, default=None,
                   help="score the images: scripted (a deterministic stand-in for tests), openai (any "
                   "OpenAI-compatible chat endpoint), qwen-vl (local Qwen2.5-VL-Instruct)")  # fmt: skip
    p.add_argument(
        "--judge-url", default=None, help="openai: the endpoint's base URL, e.g. https://api.openai.com"
    )
    p.add_argument("--judge-model", default=None, help="openai: the model name, e.g. gpt-4.1")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="openai: the environment variable holding the API key ('' for none)")  # fmt: skip
    p.add_argument("--judge-weights", default=None, help="qwen-vl: a Qwen2.5-VL-Instruct folder or hub id")
    p.add_argument(
        "--judge-device", type=v.device, default=None, help="qwen-vl: device (default: cuda if any)"
    )
    p.add_argument(
        "--judge-cache", default=None, help="folder of cached judge answers (default OUT/judge_cache)"
    )


def add_bench_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``eval --suite gedit|imgedit`` (model loading as ``specedit edit``)."""
    from specedit.cli import _add_memory_flags, _add_speed_flags, _model_names

    g = p.add_argument_group("gedit / imgedit")
    g.add_argument(
        "--data", default=None, help="the suite's data: a local folder (or file) or a hub dataset id"
    )
    g.add_argument("--model", default=None, choices=[*_model_names("pipeline"), "toy"],
                   help="the editor (toy: the toy editor of --weights, for checks)")  # fmt: skip
    g.add_argument("--seed", type=v.seed, default=0, help="the seed of every item (recorded)")
    g.add_argument("--languages", default="en,cn", help="gedit: comma-separated languages (en, cn)")
    g.add_argument("--subset", default="fullset", choices=["fullset", "intersection"], help="gedit subset")
    g.add_argument("--limit", type=v.positive_int, default=None, help="only the first N items (smoke runs)")
    g.add_argument("--height", type=v.side, default=None, help="working height (default: the model's rule)")
    g.add_argument("--width", type=v.side, default=None)
    g.add_argument(
        "--area", type=v.area, default=None, help="Qwen: VAE working area in pixels (default 1024^2)"
    )
    g.add_argument("--distilled", action="store_true", help="the --lora file is step-distilled")
    g.add_argument("--schedule", type=v.schedule, default=None, help="sampling schedule (flux, qwen, lightning, "
                   "or a scheduler_config.json)")  # fmt: skip
    _add_speed_flags(g)
    _add_memory_flags(g, pipeline=True)


def add_score(sub) -> None:
    p = sub.add_parser("score", help="judge a finished eval run: scores.jsonl, paper-style tables and plot")
    p.add_argument("--out", required=True, help="the eval run folder (specedit eval --out)")
    p.add_argument(
        "--data", default=None, help="the suite's data, if it moved since the eval (default: run.json's)"
    )
    p.add_argument("--no-plot", action="store_true", help="skip the score-versus-speedup plot")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_judge_flags(p, required=True)
    p.set_defaults(func=_score)
