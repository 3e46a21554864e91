"""The ``specedit`` command line: one subcommand per job, each printing measured numbers.

    specedit flops --model flux-kontext-dev --height 1024 --width 1024 --ref-height 1024 --ref-width 1024 \
        --text-tokens 512 --steps 50
"""

from __future__ import annotations

import argparse
import json
import sys

from specedit import costs


def _flops(a: argparse.Namespace) -> dict:
    if a.model != "flux-kontext-dev":
        raise SystemExit(f"specedit flops: unknown --model {a.model!r}")
    out = costs.flux_kontext_baseline(
        a.height,
        a.width,
        a.ref_height or a.height,
        a.ref_width or a.width,
        a.text_tokens,
        a.steps,
        measure=not a.analytic,
    )
    paper_setting = (a.height, a.width, out["ref_height"], out["ref_width"], a.text_tokens, a.steps) == (
        1024,
        1024,
        1024,
        1024,
        512,
        50,
    )
    if paper_setting:
        out.update(costs.paper_comparison(a.model, out["tflops_total"]))
    return out


def _add_flops(sub) -> None:
    p = sub.add_parser(
        "flops", help="FLOPs of a full-size baseline edit, counted on the meta device (no weights)"
    )
    p.add_argument("--model", default="flux-kontext-dev", choices=["flux-kontext-dev"])
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--ref-height", type=int, default=None, help="reference height (default: --height)")
    p.add_argument("--ref-width", type=int, default=None, help="reference width (default: --width)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--analytic", action="store_true", help="skip the meta-device FlopCounterMode check")
    p.set_defaults(run=_flops)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specedit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_flops(sub)
    a = parser.parse_args(argv)
    try:
        result = a.run(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"specedit {a.command}: error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
