"""``specedit train-toy``: the whole toy-editor recipe as resumable stages in one run folder.

run/
  train_config.json     the ToyTrainConfig of the run (a resumed run keeps it)
  examples_N.safetensors  the generated examples (uint8 images, masks, ids): the AE's bank and the data source
  ae_ckpt.safetensors   autoencoder checkpoint (+ optimizer); ae_stats.json once the AE has made all its steps
  data_N.safetensors    the encoded dataset
  dit_ckpt.safetensors  transformer + text encoder checkpoint (+ EMA, optimizer, planned steps)
  *.part.safetensors    what an interrupted example generation or encoding had made
  log.jsonl             one line per step (a resumed run repeats the steps after its last checkpoint)
  weights/              the final editor (EMA weights, fp16, manifest.json), loadable with ToyEditor.load

Each stage skips what is already done, so an interrupted run (stopped by its time budget, SIGINT, SIGTERM,
or killed) continues where it stopped when the same command is run again. The time budget (``minutes``)
covers every stage; SIGINT and SIGTERM make the current stage save its state and the run return.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from specedit.toy import atomic
from specedit.toy.model import MANIFEST, ToyEditor
from specedit.toy.train import (
    Deadline,
    ToyTrainConfig,
    load_or_encode_dataset,
    load_or_generate_examples,
    train_ae,
    train_dit,
)

RESUMABLE = ("steps", "ae_steps", "ckpt_every")  # settings a resumed run may change


def _config(run: Path, overrides: dict) -> ToyTrainConfig:
    """The run's configuration: the saved one with ``overrides`` (only RESUMABLE ones may differ), or the
    defaults with ``overrides`` for a new run. Checked (one-line errors) before anything is written."""
    path = run / "train_config.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        saved["res_probs"] = tuple(saved["res_probs"])
        if "kind_weights" in saved:
            saved["kind_weights"] = tuple(saved["kind_weights"])
        cfg = ToyTrainConfig(**saved)
        # step counts may grow on resume (train longer); anything else must match the run
        changed = {k: v for k, v in overrides.items() if getattr(cfg, k) != v and k not in RESUMABLE}
        if changed:
            raise ValueError(f"{run} was started with other settings; differing: {changed} (use a new --run)")
        return replace(cfg, **{k: v for k, v in overrides.items() if k in RESUMABLE})
    return replace(ToyTrainConfig(), **overrides)


def _check_out(weights: Path, run: Path, *, own: bool, overwrite: bool) -> None:
    """Refuse (one line) to write the final weights over a file, a folder that is not a toy editor, or another
    toy editor (one not written by this run) unless ``overwrite``; ``own``: the run's own weights folder."""
    atomic.check_folder(weights, "the run's weights folder" if own else "--out")
    if not (weights / "config.json").is_file():
        if weights.is_dir() and any(weights.iterdir()):
            raise ValueError(f"{weights} is not empty and holds no toy editor; choose a new or empty --out")
        return
    if own or overwrite or _written_by(weights) == str(run.resolve()):
        return
    raise ValueError(f"--out {weights} already holds a toy editor; pass --overwrite to replace it")


def _written_by(weights: Path) -> str | None:
    try:
        return json.loads((weights / MANIFEST).read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return None


def _check_donor(path: str | None, flag: str) -> None:
    if path is not None and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {path}: no toy editor there (config.json missing)")


def train_toy(
    run: str | Path,
    *,
    device: str = "cpu",
    minutes: float | None = None,
    ae_from: str | None = None,
    init_from: str | None = None,
    workers: int = 0,
    out: str | Path | None = None,
    overwrite: bool = False,
    log: Callable[[dict], None] | None = None,
    **overrides,
) -> dict:
    """Run (or resume) the recipe; returns a summary with ``done`` True once the weights are written.

    Every setting is checked before any work. ``minutes`` bounds the whole call (example bank, AE, encoding,
    transformer); SIGINT / SIGTERM stop it at the next step boundary with its state saved (``done`` False and
    ``stopped`` saying where). ``out`` (default ``run/weights``) may not hold another toy editor unless
    ``overwrite``."""
    run = Path(run)
    atomic.check_folder(run, "--run")
    weights = Path(out) if out else run / "weights"
    cfg = _config(run, overrides)
    deadline = Deadline(minutes)
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    if cfg.steps == 0 and minutes is None:
        raise ValueError("--steps 0 (fit the schedule to the time budget) needs --minutes")
    _check_out(weights, run, own=out is None, overwrite=overwrite)
    _check_donor(ae_from, "--ae-from")
    _check_donor(init_from, "--init-from")
    run.mkdir(parents=True, exist_ok=True)
    atomic.clean_stale(run)  # temporary files of a killed earlier call
    atomic.write_json(run / "train_config.json", asdict(cfg))
    with deadline.catching_signals(), (run / "log.jsonl").open("a", buffering=1) as logfile:

        def record(entry: dict) -> None:
            logfile.write(json.dumps(entry) + "\n")  # line-buffered: the log can be followed live
            if log:
                log(entry)

        return _stages(run, cfg, weights, deadline, device, ae_from, init_from, workers, record)


def _stages(run: Path, cfg: ToyTrainConfig, weights: Path, deadline: Deadline, device, ae_from, init_from,
            workers: int, record) -> dict:  # fmt: skip
    """The recipe's stages in order; each returns early (resumably) when the deadline is reached."""
    summary: dict = {"run": str(run)}
    editor = ToyEditor.create(seed=cfg.seed)
    examples = load_or_generate_examples(cfg, run, workers=workers, deadline=deadline)  # before CUDA: forks
    if examples is None:
        return _stopped(summary, deadline, "example bank")
    trained, done = _autoencoder(editor, cfg, run, examples, ae_from, device, deadline, record)
    if trained is not None:
        summary["ae"] = trained
    if not done:
        return _stopped(summary, deadline, f"autoencoder (step {trained['ae_steps']} of {cfg.ae_steps})")
    editor.ae.to(device).eval()
    if init_from is not None and not (run / "dit_ckpt.safetensors").is_file():  # fine-tune trained weights
        editor.take_weights(ToyEditor.load(init_from))
    data = load_or_encode_dataset(editor, examples, cfg, run, device=device, deadline=deadline)
    del examples
    if data is None:
        return _stopped(summary, deadline, "encoding")
    summary["dit"] = train_dit(editor, data, cfg, run, device=device, deadline=deadline, log=record)
    # the EMA weights are written either way; a stopped run can be resumed and will replace them
    steps = summary["dit"]["dit_steps"]
    extra = {
        "train": {**asdict(cfg), "steps": summary["dit"]["planned_steps"]},
        "steps_done": steps,
        "recipe": "specedit train-toy",
    }
    if steps:  # no editor before the first transformer step
        editor.save(weights, extra=extra, manifest={"step": steps, "run": str(run.resolve())})
        summary["weights"] = str(weights)
    if not summary["dit"]["done"]:
        return _stopped(summary, deadline, f"transformer (step {steps})")
    return {**summary, "done": True}


def _stopped(summary: dict, deadline: Deadline, where: str) -> dict:
    stopped = f"{deadline.reason} in the {where} stage; run the same command to resume"
    return {**summary, "done": False, "stopped": stopped}


def _autoencoder(editor: ToyEditor, cfg: ToyTrainConfig, run: Path, examples, ae_from, device,
                 deadline: Deadline, record) -> tuple[dict | None, bool]:  # fmt: skip
    """Give ``editor`` the run's autoencoder: taken from ``ae_from``, loaded once trained (ae_stats.json marks
    an AE that made all its steps), or trained (resumably). Returns the training summary (None when nothing
    was trained here) and whether the AE is done."""
    stats_path = run / "ae_stats.json"
    if ae_from is not None:  # reuse a trained autoencoder (e.g. the CPU-trained one on a GPU run)
        donor = ToyEditor.load(ae_from)  # on the CPU: CUDA must not start before the data workers fork
        editor.ae.load_state_dict(donor.ae.state_dict())
        shift, scale = donor.ae.config.shift_factor, donor.ae.config.scale_factor
        editor.with_latent_stats(shift, scale)
        atomic.write_json(stats_path, {"latent_shift": shift, "latent_scale": scale, "from": str(ae_from)})
        return None, True
    if stats_path.is_file():
        state = load_file(str(run / "ae_ckpt.safetensors"))
        editor.ae.load_state_dict(
            {k[len("model.ae.") :]: v for k, v in state.items() if k.startswith("model.ae.")}
        )
        stats = json.loads(stats_path.read_text())
        editor.with_latent_stats(stats["latent_shift"], stats["latent_scale"])
        return None, True
    bank = torch.cat([examples["source"], examples["target"]])
    trained = train_ae(editor, cfg, run, bank, device=device, deadline=deadline, log=record)
    if trained["done"]:
        atomic.write_json(stats_path, trained)
    return trained, trained["done"]


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
