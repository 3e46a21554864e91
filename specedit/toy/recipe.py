"""``specedit train-toy``: the whole toy-editor recipe as resumable stages in one run folder.

run/
  train_config.json     the ToyTrainConfig of the run (a resumed run keeps it)
  ae_ckpt.safetensors   autoencoder checkpoint (+ optimizer); ae_stats.json once the AE is done
  examples_N.safetensors  the generated examples (uint8 images, masks, ids): the AE's bank and the data source
  data_N.safetensors    the encoded dataset
  dit_ckpt.safetensors  transformer + text encoder checkpoint (+ EMA, optimizer)
  log.jsonl             one line per step
  weights/              the final editor (EMA weights, fp16), loadable with ToyEditor.load

Each stage skips what is already done, so an interrupted run (or one stopped by its time budget) continues
where it stopped when the same command is run again.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from specedit.toy.model import ToyEditor
from specedit.toy.train import (
    ToyTrainConfig,
    load_or_encode_dataset,
    load_or_generate_examples,
    train_ae,
    train_dit,
)

AE_SHARE = 0.35


def _config(run: Path, overrides: dict) -> ToyTrainConfig:
    path = run / "train_config.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        saved["res_probs"] = tuple(saved["res_probs"])
        cfg = ToyTrainConfig(**saved)
        # step counts may grow on resume (train longer); anything else must match the run
        changed = {
            k: v for k, v in overrides.items() if getattr(cfg, k) != v and k not in ("steps", "ae_steps")
        }
        if changed:
            raise ValueError(f"{run} was started with other settings; differing: {changed} (use a new --run)")
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if k in ("steps", "ae_steps")})
    else:
        cfg = replace(ToyTrainConfig(), **overrides)
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(cfg), indent=1))
    return cfg


def train_toy(
    run: str | Path,
    *,
    device: str = "cpu",
    minutes: float | None = None,
    ae_from: str | None = None,
    init_from: str | None = None,
    workers: int = 0,
    out: str | Path | None = None,
    log: Callable[[dict], None] | None = None,
    **overrides,
) -> dict:
    """Run (or resume) the recipe; returns a summary with ``done`` True once the weights are written."""
    run = Path(run)
    cfg = _config(run, overrides)
    deadline = None if minutes is None else time.time() + 60 * minutes
    left = lambda: None if deadline is None else max(0.0, (deadline - time.time()) / 60)
    logfile = (run / "log.jsonl").open("a", buffering=1)  # line-buffered: the log can be followed live

    def record(entry: dict) -> None:
        logfile.write(json.dumps(entry) + "\n")
        if log:
            log(entry)

    editor = ToyEditor.create(seed=cfg.seed)
    summary: dict = {"run": str(run)}
    examples = load_or_generate_examples(cfg, run, workers=workers)  # before CUDA starts: workers fork
    stats_path = run / "ae_stats.json"
    if ae_from is not None:  # reuse a trained autoencoder (e.g. the CPU-trained one on a GPU run)
        donor = ToyEditor.load(ae_from)  # on the CPU: CUDA must not start before the data workers fork
        editor.ae.load_state_dict(donor.ae.state_dict())
        editor.with_latent_stats(donor.ae.config.shift_factor, donor.ae.config.scale_factor)
        stats_path.write_text(
            json.dumps(
                {
                    "latent_shift": donor.ae.config.shift_factor,
                    "latent_scale": donor.ae.config.scale_factor,
                    "from": str(ae_from),
                }
            )
        )
    elif stats_path.is_file():
        state = load_file(str(run / "ae_ckpt.safetensors"))
        editor.ae.load_state_dict(
            {k[len("model.ae.") :]: v for k, v in state.items() if k.startswith("model.ae.")}
        )
        stats = json.loads(stats_path.read_text())
        editor.with_latent_stats(stats["latent_shift"], stats["latent_scale"])
    else:
        bank = torch.cat([examples["source"], examples["target"]])
        # with a time budget the AE gets at most AE_SHARE of it; the run goes on with the AE as trained by then
        ae_minutes = None if deadline is None else AE_SHARE * minutes
        summary["ae"] = train_ae(editor, cfg, run, bank, device=device, minutes=ae_minutes, log=record)
        del bank
        stats_path.write_text(json.dumps(summary["ae"]))
    editor.ae.to(device).eval()

    if init_from is not None and not (run / "dit_ckpt.safetensors").is_file():  # fine-tune trained weights
        donor = ToyEditor.load(init_from)
        editor.dit.load_state_dict(donor.dit.state_dict())
        editor.text.load_state_dict(donor.text.state_dict())
    data = load_or_encode_dataset(editor, examples, cfg, run, device=device)
    del examples
    summary["dit"] = train_dit(editor, data, cfg, run, device=device, minutes=left(), log=record)
    logfile.close()
    # the EMA weights are written either way; a stopped run can be resumed and will overwrite them
    weights = Path(out) if out else run / "weights"
    extra = {
        "train": {**asdict(cfg), "steps": summary["dit"]["planned_steps"]},
        "steps_done": summary["dit"]["dit_steps"],
        "recipe": "specedit train-toy",
    }
    editor.save(weights, extra=extra)
    if not summary["dit"]["done"]:
        return {
            **summary,
            "done": False,
            "weights": str(weights),
            "stopped": f"time budget at step {summary['dit']['dit_steps']}",
        }
    return {**summary, "done": True, "weights": str(weights)}


def launch_background(argv: list[str], run: Path) -> dict:
    """Start ``specedit train-toy`` (without --background) detached from this process; logs to run/train.out."""
    import subprocess

    run.mkdir(parents=True, exist_ok=True)
    args = [a for a in argv if a != "--background"]
    out = (run / "train.out").open("a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "specedit.cli", *args], stdout=out, stderr=out, start_new_session=True
    )
    return {"pid": proc.pid, "log": str(run / "train.out"), "run": str(run)}
