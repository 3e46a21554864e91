"""The ``specedit`` command line: one subcommand per job, each printing measured numbers.

    specedit flops --model flux-kontext-dev --height 1024 --width 1024 --ref-height 1024 --ref-width 1024 \
        --text-tokens 512 --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from specedit import validate as v
from specedit.families import families, get_family


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors ("specedit <command>: error: ...") and exit code 2, no usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _model_names(need: str) -> list[str]:
    """Model names of the registered families that have ``need`` (an attribute of the Family record)."""
    return [m for f in families().values() if getattr(f, need) is not None for m in f.models]


def _flops(a: argparse.Namespace) -> dict:
    fam = get_family(a.model)
    return fam.flops_report(height=a.height, width=a.width, ref_height=a.ref_height, ref_width=a.ref_width,
                            text_tokens=a.text_tokens, neg_text_tokens=a.neg_text_tokens, steps=a.steps,
                            measure=not a.analytic)  # fmt: skip


def _add_flops(sub) -> None:
    p = sub.add_parser(
        "flops", help="FLOPs of a full-size baseline edit, counted on the meta device (no weights)"
    )
    p.add_argument("--model", default="flux-kontext-dev", choices=_model_names("flops_report"))
    p.add_argument("--height", type=v.side, default=1024)
    p.add_argument("--width", type=v.side, default=1024)
    p.add_argument("--ref-height", type=v.side, default=None, help="reference height (default: --height)")
    p.add_argument("--ref-width", type=v.side, default=None, help="reference width (default: --width)")
    p.add_argument(
        "--text-tokens",
        type=v.positive_int,
        default=None,
        help="text tokens (FLUX: T5, default 512; Qwen: DiT text stream incl. VL image tokens, default 1400)",
    )
    p.add_argument(
        "--neg-text-tokens",
        type=v.positive_int,
        default=None,
        help="true-CFG models: negative prompt length (default: --text-tokens)",
    )
    p.add_argument("--steps", type=v.positive_int, default=50)
    p.add_argument("--analytic", action="store_true", help="skip the meta-device FlopCounterMode check")
    p.set_defaults(func=_flops)  # fmt: skip


def _bench(a: argparse.Namespace) -> None:
    from specedit import bench
    from specedit.presets import methods

    fam = get_family(a.model)
    names = [n.strip() for n in a.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in methods(fam)]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(methods(fam))}")
    if a.meta:
        ref = (a.ref_height or a.height, a.ref_width or a.width)
        rows = bench.meta_rows(names, family=fam, height=a.height, width=a.width, expand_fraction=a.expand_fraction,
                               ref_size=ref if ref != (a.height, a.width) else None)  # fmt: skip
    else:
        rows = _bench_latency(a, fam, names)
    if a.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(_table(rows))


def _bench_latency(a: argparse.Namespace, fam, names: list[str]) -> list[dict]:
    import torch

    from specedit import bench

    if not a.random_weights:
        raise ValueError("latency needs weights: pass --random-weights (or --meta for FLOPs only)")
    if fam.random_editor is None:
        raise ValueError(f"family {fam.name!r} has no random-weight editor; use --meta")
    config = a.config or fam.bench_configs[0]
    if config not in fam.bench_configs:
        raise ValueError(f"--config {config!r}: family {fam.name!r} has sizes {', '.join(fam.bench_configs)}")
    fam.grid(a.height, a.width)  # validates the size before building anything
    options = _compile_options(a)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    editor = fam.random_editor(config, a.height, a.width, device=a.device, dtype=dtype)
    _place_random(editor, a, dtype)
    if options is not None:
        from models.compile import compile_transformer

        compile_transformer(editor.model, options)
    from models.attention import use_backend

    with use_backend(a.attention):
        rows = bench.latency_rows(names, editor, family=fam, expand_fraction=a.expand_fraction, warmup=a.warmup,
                                  repeats=a.repeats, peak_tflops=bench.device_peak(a.device, dtype))  # fmt: skip
        used = bench.attention_used(editor)
    compiled = None if options is None else options.mode or "default"
    memory = {"fp8": a.fp8, "transformer_offload": a.transformer_offload}
    if torch.device(a.device).type == "cuda":  # peak over the whole run (weights, warm-up, every method)
        memory["peak_gib"] = torch.cuda.max_memory_allocated(torch.device(a.device)) / 2**30
    return [dict(r, attention=used, compile=compiled, **memory) for r in rows]


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _compile_options(a: argparse.Namespace):
    """The ``models.compile.CompileOptions`` of ``--compile`` (None without it); checked before any loading."""
    if a.compile is None:
        return None
    from models.compile import CompileOptions

    mode = None if a.compile == "default" else a.compile
    return CompileOptions(mode, backend=a.compile_backend, dynamic_tokens=not a.static_shapes)


def _attention(name: str) -> str:
    from models.attention import check_backend

    try:
        return check_backend(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_speed_flags(p) -> None:
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the transformer (fullgraph; MODE: default, reduce-overhead = CUDA graphs, "
                   "max-autotune, max-autotune-no-cudagraphs); the first run compiles")  # fmt: skip
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (eager / aot_eager: no code generation, for checks)")  # fmt: skip
    p.add_argument("--static-shapes", action="store_true",
                   help="--compile: one graph per token count instead of dynamic token dimensions")  # fmt: skip
    p.add_argument("--attention", type=_attention, default="sdpa",
                   help="attention backend: sdpa (PyTorch picks), flash, cudnn, efficient, math (SDPA kernels), "
                   "fa3 (FlashAttention-3), sage (SageAttention)")  # fmt: skip


def _add_memory_flags(p, *, pipeline: bool) -> None:
    p.add_argument(
        "--transformer-offload",
        type=v.positive_int,
        default=None,
        metavar="N",
        help="keep the transformer's blocks in CPU memory and stream them through the device, N resident",
    )
    p.add_argument("--fp8", action="store_true",
                   help="weight-only fp8 (e4m3, per-channel scales) for the transformer blocks' linears")  # fmt: skip
    if pipeline:
        p.add_argument(
            "--vae-tiling",
            type=v.positive_int,
            default=None,
            metavar="T",
            help="run the VAE on overlapping tiles of T latent pixels (large images)",
        )
        p.add_argument(
            "--text-encoder-offload",
            type=v.positive_int,
            default=None,
            metavar="N",
            help="Qwen: stream the VL encoder's layers through the device, N resident",
        )


def _place_random(editor, a: argparse.Namespace, dtype) -> None:
    """Apply --fp8 / --transformer-offload to a random-weight editor's transformer, in place."""
    if not a.fp8 and a.transformer_offload is None:
        return
    import torch

    from specedit.pipeline import Placement

    where = Placement(dtype, torch.device(a.device), transformer_offload=a.transformer_offload, fp8=a.fp8)
    where.place_transformer(lambda device: editor.model.to(device))


def _table(rows: list[dict]) -> str:
    fmt = lambda v, spec, unit="": "-" if v is None else format(v, spec) + unit
    w = max(22, *(len(r["method"]) for r in rows))
    head = f"{'method':{w}s} {'NFE':>4s} {'latency (s)':>12s} {'speed':>7s} {'TFLOPs':>10s} {'speed':>7s}"
    lines = [head + f" {'expanded':>9s} {'cache MiB':>10s}"]
    for r in rows:
        lines.append(
            f"{r['method']:{w}s} {r['nfe']:4d} {fmt(r['latency_s'], '12.3f')} "
            f"{fmt(r['latency_speedup'], '6.2f', 'x'):>7s} {r['tflops']:10.2f} {r['flops_speedup']:6.2f}x "
            f"{fmt(r['expanded_fraction'], '9.3f'):>9s} {fmt(r.get('cache_mib') or None, '10.1f'):>10s}"
        )
    if "attention" in rows[0]:
        recompiles = sum(r["recompiles"] for r in rows)
        lines.append(f"attention: {rows[0]['attention']}; compile: {rows[0]['compile'] or 'off'}; "
                     f"recompiles after warm-up: {recompiles}")  # fmt: skip
    return "\n".join(lines)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="paper-style table: NFE, latency, TFLOPs and speedups per method")
    p.add_argument(
        "--model",
        default="flux-kontext-dev",
        choices=[*families(), *_model_names("costs")],
        help="a model or family name",
    )
    p.add_argument(
        "--methods",
        default="baseline-50,steps-18,ralu-4x,specedit-30,specedit-18,specedit-11,specedit-9",
        help="comma-separated method names (see specedit.presets.methods)",
    )
    p.add_argument("--meta", action="store_true", help="FLOPs only, full-size preset on the meta device")
    p.add_argument(
        "--expand-fraction",
        type=v.fraction,
        default=0.25,
        help="expanded fraction of coarse cells for verifier-based methods (a fixed budget when timing)",
    )
    p.add_argument("--height", type=v.side, default=1024)
    p.add_argument("--width", type=v.side, default=1024)
    p.add_argument(
        "--ref-height", type=v.side, default=None, help="--meta: reference height (default: --height)"
    )
    p.add_argument(
        "--ref-width", type=v.side, default=None, help="--meta: reference width (default: --width)"
    )
    p.add_argument("--config", default=None, help="model size for latency (the family's; default its first)")
    p.add_argument("--device", type=v.device, default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--random-weights", action="store_true", help="time with random weights (no download)")
    p.add_argument("--warmup", type=v.non_negative_int, default=1)
    p.add_argument("--repeats", type=v.positive_int, default=3)
    p.add_argument("--json", action="store_true", help="one JSON object per method")
    _add_speed_flags(p)
    _add_memory_flags(p, pipeline=False)
    p.set_defaults(func=_bench)  # fmt: skip


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _edit(a: argparse.Namespace) -> dict:

    from specedit import presets

    fam = get_family(a.model)
    if a.method != "baseline":
        method = presets.get(a.method, fam)  # an unknown method fails before any loading
        if method.weights == "distilled" and not a.lora:
            raise ValueError(
                f"--method {a.method} expects step-distilled weights: add --lora <distilled LoRA>"
            )
    if a.distilled and not a.lora:
        raise ValueError("--distilled says the --lora files are step-distilled, but no --lora was given")
    from models.imageio import load_image

    for path in a.image:  # unreadable or truncated images fail here, before any weight is loaded
        load_image(path)
    v.check_output_file(a.out, a.image, overwrite=a.overwrite)
    _compile_options(a)  # a bad --compile fails before any loading
    if a.save_mask:
        v.check_output_file(a.save_mask, [*a.image, a.out], overwrite=a.overwrite)
        if os.path.abspath(a.save_mask) == os.path.abspath(a.out):
            raise ValueError(f"--save-mask {a.save_mask} is the --out file: give it another name")
    pipe = load_pipeline(a, fam)
    images = a.image if len(a.image) > 1 else a.image[0]
    out = pipe.edit(images, a.prompt, method=a.method, seed=a.seed, steps=a.steps, guidance=a.guidance,
                    true_cfg_scale=a.true_cfg_scale, negative_prompt=a.negative_prompt, height=a.height,
                    width=a.width, progress=not a.quiet)  # fmt: skip
    summary = _save_edit(a, out)
    from models.attention import use_backend
    from specedit.bench import attention_used

    with use_backend(a.attention):
        summary["attention"], summary["compile"] = attention_used(out.editor), a.compile
    if pipe.loras:
        summary["loras"] = [list(entry) for entry in pipe.loras]
    return summary


def load_pipeline(a: argparse.Namespace, fam):
    """The pipeline of ``--model`` as the edit flags say: weights, dtype, device, memory placement, LoRAs,
    schedule, attention backend and compilation (``--compile`` is checked before anything loads)."""
    import torch

    compiling = _compile_options(a)
    entry = fam.models[a.model]
    options = dict(entry.options, **({} if a.area is None else {"area": a.area}))
    memory = dict(transformer_offload=a.transformer_offload, fp8=a.fp8, vae_tiling=a.vae_tiling,
                  text_encoder_offload=a.text_encoder_offload)  # fmt: skip
    pipe = fam.pipeline.from_pretrained(a.weights or entry.repo, dtype=getattr(torch, DTYPES[a.dtype]),
                                        device=a.device, **memory, **options)  # fmt: skip
    for path, scale in a.lora:
        pipe.load_lora(path, scale, distilled=True if a.distilled else None)
    if a.schedule is not None:
        pipe.schedule = a.schedule
    pipe.use_attention(a.attention)
    if compiling is not None:
        pipe.compile(compiling.mode, backend=compiling.backend, dynamic_tokens=compiling.dynamic_tokens)
    return pipe


def _save_edit(a: argparse.Namespace, out) -> dict:
    if a.save_mask and out.mask is None:
        raise ValueError(f"--save-mask: method {a.method!r} verifies no tokens (no mask to save)")
    _atomic_save(out.image, a.out)
    flops = out.flops()
    summary = {
        "out": a.out,
        "method": a.method,
        "nfe": out.result.nfe,
        "size": list(out.image.size),
        "seconds": {k: round(v, 3) for k, v in {**out.seconds, **out.result.seconds}.items()},
        "tflops": {k: round(v / 1e12, 4) for k, v in flops.items()},
    }
    if out.mask is not None:
        summary["expanded_fraction"] = round(float(out.mask.float().mean()), 4)
        if a.save_mask:
            _atomic_save(out.overlay(), a.save_mask)
            summary["mask"] = a.save_mask
    return summary


def _atomic_save(image, path: str) -> None:
    """Write ``image`` next to ``path`` under a temporary name, then rename it into place."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    image.save(tmp, format=image.format or _format(target))
    os.replace(tmp, target)


def _format(path: Path) -> str:
    from PIL import Image

    ext = path.suffix.lower()
    Image.init()
    if ext not in Image.EXTENSION:
        raise ValueError(f"--out {path}: unknown image extension {ext!r} (use .png, .jpg, .webp, ...)")
    return Image.EXTENSION[ext]


def _add_edit(sub) -> None:
    p = sub.add_parser("edit", help="edit an image with the baseline sampler or a SpecEdit preset")
    p.add_argument("--model", default="flux-kontext-dev", choices=_model_names("pipeline"))
    p.add_argument(
        "--image",
        action="append",
        required=True,
        type=v.input_file,
        help="input image (repeat for multi-image models)",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="output image (PNG, JPEG, WebP, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --save-mask")
    p.add_argument(
        "--method",
        default="baseline",
        help="baseline, specedit-30, specedit-18, specedit-11, specedit-9, distilled-N, specedit-distill-N "
        "or any preset name",
    )
    p.add_argument(
        "--steps",
        type=v.positive_int,
        default=None,
        help="steps of the baseline sampler (default: the model's, FLUX 28, Qwen 50, or its distilled LoRA's)",
    )
    p.add_argument(
        "--guidance", type=v.finite_float, default=None, help="FLUX distilled guidance (default 2.5)"
    )
    p.add_argument(
        "--true-cfg-scale", type=v.finite_float, default=None, help="true CFG scale (Qwen default 4.0)"
    )
    p.add_argument("--negative-prompt", default=None, help="negative prompt for true CFG (Qwen default ' ')")
    p.add_argument(
        "--area", type=v.area, default=None, help="Qwen: VAE working area in pixels (default 1024^2)"
    )
    p.add_argument("--seed", type=v.seed, default=0)
    p.add_argument("--height", type=v.side, default=None)
    p.add_argument("--width", type=v.side, default=None)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--device", type=v.device, default="cuda" if _cuda() else "cpu")
    p.add_argument("--weights", default=None, help="local folder or hub repo id (default: the official repo)")
    p.add_argument("--save-mask", default=None, help="image of the verified-token mask over the input")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        type=v.lora_spec,
        metavar="PATH[:SCALE]",
        help="fuse a LoRA (.safetensors file or hub file owner/repo/file.safetensors; repeatable). "
        "Known step-distilled LoRAs (Qwen-Image Lightning) set their schedule, CFG and steps",
    )
    p.add_argument(
        "--distilled",
        action="store_true",
        help="the --lora files are step-distilled weights not "
        "recognised by name (enables the distilled-N / specedit-distill-N methods)",
    )
    p.add_argument(
        "--schedule",
        type=v.schedule,
        default=None,
        help="sampling schedule: flux, qwen, lightning, "
        "or a scheduler_config.json (default: the model's, or its distilled LoRA's)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_speed_flags(p)
    _add_memory_flags(p, pipeline=True)
    p.set_defaults(func=_edit)  # fmt: skip


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _train_toy(a: argparse.Namespace) -> dict:
    from specedit.toy.recipe import launch_background, train_toy

    overrides = {
        k: v
        for k, v in {
            "steps": a.steps,
            "batch": a.batch,
            "n_train": a.n_train,
            "seed": a.seed,
            "ae_steps": a.ae_steps,
            "ae_batch": a.ae_batch,
            "ae_crop": a.ae_crop,
            "lr": a.lr,
            "ema": a.ema,
            "warmup": a.warmup,
            "edit_weight": a.edit_weight,
            "ckpt_every": a.checkpoint_every,
        }.items()
        if v is not None
    }
    if a.background:
        return launch_background(a.argv, Path(a.run))
    bars = []  # the progress bar opens with the first logged step, so a bad setting prints only its error

    def log(entry: dict) -> None:
        if a.quiet:
            return
        if not bars:
            from tqdm.auto import tqdm

            bars.append(tqdm(desc="train-toy", unit="step"))
        bars[0].set_description(f"{entry['stage']} {entry['step']}")
        bars[0].set_postfix(loss=f"{entry['loss']:.4f}")
        bars[0].update(1)

    if a.res_probs:
        overrides["res_probs"] = tuple(float(x) for x in a.res_probs.split(","))
    if a.kind_weights:
        overrides["kind_weights"] = _kind_weights(a.kind_weights)
    return train_toy(
        a.run,
        device=a.device,
        minutes=a.minutes,
        ae_from=a.ae_from,
        init_from=a.init_from,
        workers=a.workers,
        out=a.out,
        overwrite=a.overwrite,
        log=log,
        **overrides,
    )


def _kind_weights(text: str) -> tuple[float, ...]:
    """``add=3,move=2``: those kinds' training weights, the others' from the recipe's defaults."""
    from specedit.toy.data import ALL_EDITS
    from specedit.toy.train import KIND_WEIGHTS

    weights = dict(KIND_WEIGHTS)
    for item in text.split(","):
        kind, _, value = item.strip().partition("=")
        if kind not in weights:
            raise ValueError(
                f"--kind-weights: unknown edit kind {kind!r}; choose from {', '.join(ALL_EDITS)}"
            )
        try:
            weights[kind] = float(value)
        except ValueError:
            raise ValueError(f"--kind-weights: {item.strip()!r} is not KIND=WEIGHT") from None
    return tuple(weights[k] for k in ALL_EDITS)


def _add_train_toy(sub) -> None:
    p = sub.add_parser("train-toy", help="train the toy editor (resumable; --background to detach)")
    p.add_argument("--run", default="runs/toy", help="run folder: checkpoints, dataset cache, log, weights")
    p.add_argument("--out", default=None, help="where to write the final weights (default: RUN/weights)")
    p.add_argument("--overwrite", action="store_true", help="let --out replace another run's toy editor")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (250)")
    p.add_argument("--device", type=v.device, default="cuda" if _cuda() else "cpu")
    p.add_argument("--minutes", type=float, default=None, help="stop (resumably) after this many minutes, all "
                   "stages counted; SIGINT / SIGTERM also stop it resumably")  # fmt: skip
    p.add_argument("--background", action="store_true", help="run detached; progress goes to RUN/train.out")
    p.add_argument("--ae-from", default=None, help="take the autoencoder from a trained toy editor folder")
    p.add_argument("--workers", type=int, default=0, help="processes generating the dataset")
    p.add_argument(
        "--init-from", default=None, help="start the transformer and text encoder from a toy editor folder"
    )
    p.add_argument(
        "--res-probs", default=None, help="batch mix: full,2x,4x,mixed probabilities (e.g. 0.4,0.2,0.1,0.3)"
    )
    p.add_argument("--kind-weights", default=None, metavar="KIND=W,...",
                   help="how often each edit kind is drawn, e.g. add=3,scatter=0 (others: the recipe's)")  # fmt: skip
    for name, kind in (
        ("steps", int),
        ("batch", int),
        ("n-train", int),
        ("seed", int),
        ("ae-steps", int),
        ("ae-batch", int),
        ("ae-crop", int),
        ("lr", float),
        ("ema", float),
        ("warmup", int),
        ("edit-weight", float),
    ):
        p.add_argument(f"--{name}", type=kind, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_train_toy)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="specedit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _add_flops(sub)
    _add_bench(sub)
    _add_edit(sub)
    _add_train_toy(sub)
    from specedit.evals.cli_commands import add_score
    from specedit.toy.cli_commands import add_commands  # demo, eval

    add_commands(sub)
    add_score(sub)
    argv = sys.argv[1:] if argv is None else argv
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a bad argument already reported in one line
        return int(e.code or 0)
    a.argv = argv
    try:
        result = a.func(a)
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError) as e:
        print(f"specedit {a.command}: error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
