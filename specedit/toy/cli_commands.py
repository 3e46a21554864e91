"""``specedit demo`` and ``specedit eval``: the toy editor's demo and evaluation suite on the command line.

    specedit demo [--out DIR] [--weights DIR] [--methods LIST] [--n N]
    specedit eval --suite toy [--n N] [--methods LIST] [--out DIR] [--weights DIR] [--seed-offset S]
    specedit train-toy --distill [4,6,8] [--run DIR] [--out DIR] [--minutes M] [--steps S] [--init-from DIR]
    torchrun --nproc_per_node=N -m specedit.cli eval --num-examples N ...   # examples sharded over the ranks

``add_commands(sub)`` registers both on the ``specedit`` parser and adds ``--distill`` to its ``train-toy``
(``specedit.toy.distill``: a few-step LoRA for the toy editor; ``--init-from`` names the teacher, default the
shipped weights; the run folder defaults to runs/toy-distill, the LoRA goes to ``--out``, default RUN/lora).
The demo and eval handlers print tables (progress goes to stderr) and return None. An ``--out`` that is a
file fails before anything is loaded or run; ``eval`` resumes a killed run when rerun into the same
``--out`` (finished records are kept and not run again).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from specedit import validate as v
from specedit.toy import atomic
from specedit.toy import evaluate as ev

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _setup(a: argparse.Namespace, device):
    import torch

    threads = a.threads if a.threads is not None else (1 if device.type == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    return ev.load_toy(a.weights, device=device, dtype=getattr(torch, DTYPES[a.dtype or "fp32"]))


def _lora(a: argparse.Namespace, names: list[str]):
    """The distilled LoRA for the distilled methods among ``names`` (checked), or None when none is run."""
    lora = a.lora if a.lora is not None else ev.default_lora(a.weights)
    named = ev.resolve(names)
    if not any(ev.weights_of(m) == "distilled" for m in named.values()):
        return None
    ev.check_lora(named, lora)
    return str(lora)


def _logger(a: argparse.Namespace, prefix: str = ""):
    if a.quiet:
        return None
    return lambda msg: print(f"{prefix}{msg}", file=sys.stderr, flush=True)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights", default=None, help="toy editor folder (default: the shipped specedit/toy/weights)"
    )
    p.add_argument(
        "--device", type=v.device, default=None, help="default: cuda (this rank's GPU) if available, else cpu"
    )
    p.add_argument(
        "--dtype", default=None, choices=list(DTYPES), help="default: fp32 (the toy), bf16 (real editors)"
    )
    p.add_argument("--threads", type=v.positive_int, default=None,
                   help="CPU threads per process (default on the CPU: 1, the fastest for this small model on a "
                   "shared machine; more on an idle many-core one)")  # fmt: skip
    p.add_argument("--lora", default=None, help="the distilled LoRA that distilled-N and specedit-distill-N run "
                   "with (default: distill_lora.safetensors of the --weights folder)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _demo(a: argparse.Namespace) -> None:
    atomic.check_folder(a.out)
    ev.demo_cases(a.n)  # checks --n
    names = ev.parse_methods(a.methods)
    _lora(a, names)  # a missing LoRA fails before loading
    toy = _setup(a, ev.Dist().device(a.device))
    report = ev.demo(toy, a.out, methods=names[1:], n=a.n, log=_logger(a), lora=_lora(a, names))
    print(ev.format_table(report["methods"], ev.DEMO_COLUMNS, title=_demo_title(report)))
    print(f"\npanels: {', '.join(e['panel'] for e in report['examples'])}")
    print(
        f"report: {a.out}/report.json ({report['seconds']:.1f} s, {report['device']}, {report['threads']} threads)"
    )


def _demo_title(report: dict) -> str:
    return (f"toy editor demo, {len(report['examples'])} held-out edits; fidelity to {report['reference']} "
            "(PSNR / SSIM: whole, in and out of the true edit mask), PSNR to the ground truth, verifier IoU "
            "with the true edit cells, expanded fraction")  # fmt: skip


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="toy editor: baseline-50 vs SpecEdit on a few held-out edits (panels, table)"
    )
    p.add_argument("--out", default="out/demo", help="folder for the panels and report.json (other files in it "
                   "are left alone)")  # fmt: skip
    p.add_argument("--methods", default=",".join(ev.DEMO_METHODS), help="comma-separated methods besides "
                   "baseline-50 (see specedit.presets.methods)")  # fmt: skip
    p.add_argument("--n", type=int, default=4, help=f"examples (1..{len(ev.DEMO_SEEDS)})")
    _common(p)
    p.set_defaults(func=_demo)


def _eval(a: argparse.Namespace) -> None:
    a.out = a.out or f"out/eval-{a.suite}"
    if a.suite not in ev.SUITES:
        from specedit.evals.cli_commands import bench_eval

        return bench_eval(a)
    if a.data is not None or a.model is not None:
        raise ValueError(
            "--data and --model are for --suite gedit|imgedit; the toy suite makes its own edits"
        )
    atomic.check_folder(a.out)
    if a.judge:
        from specedit.evals.cli_commands import check_judge

        check_judge(a)
    ev.eval_cases(a.n, a.seed_offset, indices=[], suite=a.suite)  # checks --n and --seed-offset
    dist = ev.Dist.from_env()
    names = ev.parse_methods(a.methods or ",".join(ev.EVAL_METHODS), reference=a.reference)
    lora = _lora(a, names)
    device = dist.device(a.device)
    toy = _setup(a, device)
    prefix = f"[rank {dist.rank}/{dist.world}] " if dist.world > 1 else ""
    records = ev.evaluate_suite(toy, names, n=a.n, offset=a.seed_offset, reference=a.reference, dist=dist,
                                log=_logger(a, prefix), out=a.out, lora=lora, images=bool(a.judge),
                                suite=a.suite)  # fmt: skip
    if records is None:  # not rank 0: rank 0 writes and prints
        return
    out = ev.write_suite(records, a.out, reference=a.reference, plot=not a.no_plot)
    first = ev.SUITES[a.suite] + a.seed_offset
    if a.suite == "toy":
        title = (
            f"toy eval suite: {a.n} held-out edits (seeds {first}+), {dist.world} process(es); fidelity to "
            f"{a.reference} (whole / edited / unedited region), PSNR to the ground truth, verifier IoU / precision"
            " / recall on local edits (L), expanded fraction on global edits (G), curvature of one-stage paths"
        )
    else:
        title = (
            f"toy-stochastic suite: {a.n} held-out edits with several valid outcomes (seeds {first}+), "
            f"{dist.world} process(es); fidelity to the same-seed {a.reference} output (whole / edited / "
            "unedited region), validity (object there, rest kept), PSNR to the one drawn target, curvature"
        )
    columns = ev.EVAL_COLUMNS if a.suite == "toy" else ev.STOCHASTIC_COLUMNS
    print(ev.format_table(out["rows"], columns, title=title))
    print()
    for name, path in out["paths"].items():
        print(f"{name}: {path}")
    if out["note"]:
        print(f"note: {out['note']}")
    if a.judge:
        from specedit.evals.cli_commands import make_judge

        score_toy(a, Path(a.out), make_judge(a, Path(a.out)))


def score_toy(a: argparse.Namespace, out: Path, judge) -> None:
    """Judge the saved images of a toy eval folder (``--judge``; GEdit's SC / PQ / O) and print the tables."""
    from specedit.evals import scoring

    setup = json.loads((out / ev.SETUP).read_text())
    if "images" not in setup:
        raise ValueError(f"{out} was evaluated without --judge: it holds no images to score; use a new --out")
    records = [dict(r, key=str(r["seed"]), category=r["kind"]) for r in atomic.read_lines(out / ev.RECORDS)]
    cases = {}

    def source(r):
        if r["seed"] not in cases:
            suite = setup.get("suite", "toy")
            cases[r["seed"]] = ev.eval_cases(
                r["index"] + 1, setup["offset"], indices=[r["index"]], suite=suite
            )[0]
        return Image.fromarray(cases[r["seed"]].example.source)

    reference = setup["reference"]
    scores = scoring.score_records(records, judge, suite="toy", source=source, instruction=lambda r: r["instruction"],
                                   out=out, log=_logger(a), progress=not a.quiet)  # fmt: skip
    result = scoring.write_scores(scores, records, out, suite="toy", reference=reference, plot=not a.no_plot)
    print(result["markdown"])
    for name, path in result["paths"].items():
        print(f"{name}: {path}")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluation suite: every method on held-out toy edits (table, JSON lines, "
                       "plot); shards over torchrun ranks")  # fmt: skip
    p.add_argument(
        "--suite",
        default="toy",
        choices=["toy", "toy-stochastic", "gedit", "imgedit"],
        help="toy (held-out synthetic edits with ground truth), toy-stochastic (edits with several valid "
        "outcomes: fidelity, validity, curvature), gedit or imgedit (--data, --model)",
    )
    p.add_argument("--n", "--num-examples", dest="n", type=int, default=8,
                   help="held-out examples (under torchrun write --num-examples: torchrun takes --n as an "
                   "abbreviation of its own options)")  # fmt: skip
    p.add_argument("--methods", default=None, help="comma-separated methods (toy default: all "
                   "of the suite)")  # fmt: skip
    p.add_argument("--out", default=None, help="run folder (default out/eval-SUITE): records, images, tables; "
                   "a rerun into the same folder resumes (finished records are kept)")  # fmt: skip
    p.add_argument("--seed-offset", type=int, default=0, help="examples use seeds 6_000_000 + offset + i "
                   "(toy-stochastic: 8_000_000 + offset + i)")  # fmt: skip
    p.add_argument("--reference", default=ev.BASELINE, help="fidelity reference and speedup base")
    p.add_argument("--no-plot", action="store_true", help="skip the speed-versus-quality plot")
    _common(p)
    from specedit.evals.cli_commands import add_bench_flags, add_judge_flags

    add_judge_flags(p, required=False)
    add_bench_flags(p)
    p.set_defaults(func=_eval)


def add_commands(sub) -> None:
    """Register ``demo`` and ``eval`` on the ``specedit`` subcommand parser, and ``--distill`` on its
    ``train-toy`` (when that is registered)."""
    _add_demo(sub)
    _add_eval(sub)
    if "train-toy" in sub.choices:
        _add_distill(sub.choices["train-toy"])


# options of train-toy that only the editor's own recipe reads
NOT_DISTILL = ("n_train", "ae_steps", "ae_batch", "ae_crop", "ema", "ae_from", "res_probs")


def _add_distill(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distill", nargs="?", const="4,6,8", default=None, metavar="STEPS",
                   help="train a few-step LoRA for the toy editor instead (student step counts, default "
                   "4,6,8; --init-from: the teacher, default the shipped weights; --run default "
                   "runs/toy-distill; --out: the LoRA's folder, default RUN/lora)")  # fmt: skip
    p.add_argument("--rank", type=v.positive_int, default=None, help="--distill: LoRA rank (16)")
    train = p.get_default("func")
    p.set_defaults(func=lambda a: train(a) if a.distill is None else _distill(a))


def _steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--distill takes step counts like 4,6,8, got {text!r}") from None
    return steps


def _distill(a: argparse.Namespace) -> dict:
    from specedit.toy.distill import distill_toy
    from specedit.toy.recipe import launch_background

    given = [f"--{k.replace('_', '-')}" for k in NOT_DISTILL if getattr(a, k, None) not in (None, 0)]
    if given:
        raise ValueError(f"{', '.join(given)} belong to the editor's own recipe, not to --distill")
    argv = getattr(a, "argv", []) or []
    run = a.run if any(x == "--run" or x.startswith("--run=") for x in argv) else "runs/toy-distill"
    keys = {"steps": a.steps, "batch": a.batch, "seed": a.seed, "lr": a.lr, "ckpt_every": a.checkpoint_every,
            "rank": a.rank, "nfes": _steps(a.distill)}  # fmt: skip
    overrides = {k: x for k, x in keys.items() if x is not None}
    if a.background:
        return launch_background(argv, atomic.check_folder(run, "--run"))
    log = None if a.quiet else (lambda e: print(json.dumps(e), file=sys.stderr, flush=True))
    return distill_toy(run, teacher=a.init_from, out=a.out, minutes=a.minutes, overwrite=a.overwrite,
                       device=a.device, log=log, **overrides)  # fmt: skip
