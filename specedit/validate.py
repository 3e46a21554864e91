"""Checks on user input that run before any weight is loaded or any compute starts.

Each ``argparse`` type here turns a string into a value or raises ``argparse.ArgumentTypeError`` with a
one-line reason; the same rules back the Python API through the parts' ``__post_init__`` checks.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

MAX_SIDE = 8192  # pixels per image side: a 8192^2 RGB float image is 0.8 GB, larger sizes are typos
MAX_SEED = 2**64 - 1  # seeds are 64-bit (torch.Generator.manual_seed)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def side(text: str) -> int:
    """An image side in pixels, 1..MAX_SIDE."""
    value = positive_int(text)
    if value > MAX_SIDE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SIDE} px, got {value}")
    return value


def area(text: str) -> int:
    """An image area in pixels, 1..MAX_SIDE^2."""
    value = positive_int(text)
    if value > MAX_SIDE**2:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SIDE}^2 px, got {value}")
    return value


def seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64 - 1], got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {value}")
    return value


def device(text: str) -> str:
    """A torch device that exists here ("cpu", "cuda", "cuda:1", "mps")."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:0)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return text


def input_file(path: str) -> str:
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return path


def check_output_file(out: str | os.PathLike, inputs: list[str | os.PathLike], *, overwrite: bool) -> None:
    """``out`` may be written: not one of ``inputs``, not a folder, and new unless ``overwrite``."""
    target = Path(out)
    for p in inputs:
        if os.path.exists(p) and target.exists() and os.path.samefile(p, target):
            raise ValueError(f"output {out} is the input file {p}: choose another --out")
    if target.is_dir():
        raise ValueError(f"output {out} is a folder: give a file name")
    if target.exists() and not overwrite:
        raise ValueError(f"output {out} exists: pass --overwrite to replace it")


def lora_spec(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale); a local file must exist and end in ``.safetensors``, anything else is
    taken as a hub file ``owner/repo/file.safetensors`` (fetched when the pipeline loads it)."""
    path, _, tail = text.rpartition(":")
    try:
        scale = float(tail) if path else 1.0
    except ValueError:
        path, scale = "", 1.0
    path = path or text  # no ":SCALE" suffix: the whole text is the path
    if not math.isfinite(scale):
        raise argparse.ArgumentTypeError(f"LoRA scale must be finite, got {tail!r}")
    if not path.endswith(".safetensors"):
        raise argparse.ArgumentTypeError(f"{path}: a LoRA must be a .safetensors file")
    p = Path(path)
    hub = not p.is_absolute() and path.count("/") >= 2 and not Path(path.split("/")[0]).exists()
    if not hub and not p.is_file():
        raise argparse.ArgumentTypeError(f"{path}: no such LoRA file")
    return path, scale


def schedule(text: str):
    """A schedule name (flux, qwen, lightning) or a ``scheduler_config.json`` / folder holding one."""
    from samplers.schedules import load_schedule

    try:
        return load_schedule(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
