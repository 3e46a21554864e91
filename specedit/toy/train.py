"""Training the toy editor: the autoencoder, a pre-encoded dataset, then the transformer and text encoder.

Recipe (rectified flow, as the Kontext family is trained):

1. Autoencoder: reconstruction (MSE + L1) with a tiny KL term on synthetic source and target images; then
   the latent normalisation (z - shift) * scale is set from the latents' statistics.
   It trains on a bank of generated examples (step 2's images), so no image is drawn inside its loop.
2. Dataset: ``n`` examples of ``specedit.toy.data`` generated once (uint8 images, cached) and, after step 1,
   encoded once (posterior means, fp16) with their token-level edit masks and tokenized instructions.
3. Transformer + text encoder, jointly: x_t = (1 - t) x0 + t eps, target v = eps - x0, t logit-normal and shifted
   like the sampler's schedule for the token count. What makes it learn fast enough for a CPU:
   - multi-resolution batches (full, 2x and 4x coarser latents), so the draft and coarse stages of SpecEdit
     see resolutions the model was trained on;
   - the loss on edited tokens (from the ground-truth masks) is weighted ``1 + edit_weight``, since most
     tokens only copy the reference;
   - an EMA of the weights, which is what gets saved.
   Checkpoints (model, EMA, optimizer, step) go to the run folder; a run resumes from the last one.

Every stage stops at a :class:`Deadline` (a time budget shared by all stages, or a caught SIGINT / SIGTERM) at
its next step boundary and leaves state the next call continues from: the training stages checkpoint, the
example bank and the encoding keep what they made in ``*.part.safetensors``. Every file is written atomically
(``specedit.toy.atomic``), so a kill at any moment (SIGKILL included) loses at most the work since the last
checkpoint.

Everything is deterministic given the seeds: each step draws its batch and noise from generators seeded by the
step (no global random state), so a resumed run computes bit for bit what an uninterrupted one does (on the
same device and thread count).
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from models.packing import grid_ids, pack
from samplers.field import dc
from samplers.layout import Layout, mixed_indices
from samplers.schedules import FLUX_SCHEDULE, time_shift
from specedit.toy import atomic
from specedit.toy.data import ALL_EDITS, GLOBAL_EDITS, LOCAL_EDITS, make_example
from specedit.toy.model import IMAGE_SIZE, TEXT_TOKENS, ToyEditor, images_to_tensor, toy_tokenizer

KINDS = ALL_EDITS  # a dataset's "kind" is the index into this tuple
# how often each edit kind is drawn for the training set (ALL_EDITS order): add, resize and move, the kinds the
# first editor drew with soft outlines, more often, and a quarter of stochastic edits (the curved-flow suite)
KIND_WEIGHTS = {"recolor": 1.0, "remove": 1.0, "add": 3.0, "resize": 2.0, "move": 2.0, "background": 1.0,
                "brightness": 1.0, "cast": 1.0, "add-somewhere": 1.5, "pattern": 1.5, "scatter": 1.5}  # fmt: skip


@dataclass(frozen=True)
class ToyTrainConfig:
    """Hyperparameters of the whole recipe (the defaults fit about 2 hours on a 2-core CPU)."""

    seed: int = 0
    # autoencoder
    ae_steps: int = 3000
    ae_batch: int = 8
    ae_crop: int = 64  # the AE is fully convolutional: random crops are 4x cheaper than whole images (CPU)
    ae_lr: float = 5e-4
    kl_weight: float = 1e-6
    # dataset
    n_train: int = 12000
    kind_weights: tuple[float, ...] = tuple(KIND_WEIGHTS[k] for k in ALL_EDITS)  # per kind of ALL_EDITS
    # transformer + text encoder
    steps: int = 2500  # 0: "auto", fit the schedule to the time budget after timing the first steps
    batch: int = 16
    lr: float = 4e-4
    warmup: int = 150
    weight_decay: float = 0.01
    ema: float = 0.998
    edit_weight: float = 4.0
    # batches at 1x, 2x, 4x coarser latents, and mixed layouts (SpecEdit's middle stage: coarse cells and the
    # 2x2 children of a random subset at fractional positions, coarse reference)
    res_probs: tuple[float, ...] = (0.6, 0.25, 0.15, 0.0)
    ckpt_every: int = 250

    def __post_init__(self) -> None:
        """One-line errors for settings no run can use (e.g. a negative step count), before any work."""
        for name, low in COUNTS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"{_name(name)} must be an integer >= {low}{COUNT_NOTES.get(name, '')}, got {value!r}"
                )
        if self.ae_crop % 4:
            raise ValueError(
                f"{_name('ae_crop')} must be a multiple of 4 (the AE's downsampling), got {self.ae_crop}"
            )
        for name in ("lr", "ae_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{_name(name)} must be > 0, got {getattr(self, name)!r}")
        for name in ("kl_weight", "weight_decay", "edit_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{_name(name)} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"{_name('ema')} must be in [0, 1), got {self.ema!r}")
        w = tuple(self.kind_weights)
        if len(w) != len(ALL_EDITS) or any(not x >= 0 for x in w) or not sum(w) > 0:
            raise ValueError(
                f"{_name('kind_weights')} must be {len(ALL_EDITS)} weights >= 0 (one per kind of {ALL_EDITS}) with "
                f"a positive sum, got {w}"
            )
        probs = tuple(self.res_probs)
        if not 1 <= len(probs) <= 4 or any(not p >= 0 for p in probs) or not sum(probs) > 0:
            raise ValueError(
                f"{_name('res_probs')} must be 1 to 4 probabilities (full, 2x, 4x, mixed) >= 0 with a positive "
                f"sum, got {probs}"
            )


# the smallest value of each count; COUNT_NOTES explain the exceptions, FLAGS the command-line names that differ
COUNTS = {"ae_steps": 1, "ae_batch": 1, "ae_crop": 4, "n_train": 1, "steps": 0, "batch": 1, "warmup": 1,
          "ckpt_every": 1}  # fmt: skip
COUNT_NOTES = {"steps": " (0: fit the schedule to the time budget)"}
FLAGS = {"ckpt_every": "checkpoint-every"}


def _name(field: str) -> str:
    """A setting as the command line spells it: ``steps`` -> ``--steps``."""
    return f"--{FLAGS.get(field, field.replace('_', '-'))}"


# ----------------------------------------------------------------------------------------------- stopping
class Deadline:
    """When long work must stop: a wall-clock budget (``minutes``; None: none) shared by every stage, or a
    SIGINT / SIGTERM caught by :meth:`catching_signals`. Loops check :meth:`reached` at step boundaries."""

    def __init__(self, minutes: float | None = None, *, clock: Callable[[], float] = time.monotonic):
        if minutes is not None and not minutes > 0:
            raise ValueError(f"--minutes must be > 0, got {minutes!r}")
        self.clock = clock
        self.end = None if minutes is None else clock() + 60 * minutes
        self.caught: str | None = None  # the name of the caught signal

    def reached(self) -> bool:
        return self.caught is not None or (self.end is not None and self.clock() >= self.end)

    def seconds_left(self) -> float | None:
        return None if self.end is None else max(0.0, self.end - self.clock())

    @property
    def reason(self) -> str:
        return self.caught or "time budget"

    @contextlib.contextmanager
    def catching_signals(self) -> Iterator[Deadline]:
        """Within: SIGINT and SIGTERM end the deadline (the stages stop cleanly at their next step boundary);
        a second signal gets the previous handler (Ctrl-C twice interrupts at once). Outside the main thread
        no handler can be installed and signals keep their handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {}

        def handle(signum, frame) -> None:
            if self.caught is not None:
                signal.signal(signum, previous[signum])
                signal.raise_signal(signum)
                return
            self.caught = signal.Signals(signum).name

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handle)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------- autoencoder
def _ae_batch(step: int, cfg: ToyTrainConfig, bank: Tensor, crop: int | None = None) -> Tensor:
    """A batch of ``bank`` images ((n, H, W, 3) uint8, sources and targets), randomly cropped, step-seeded."""
    g = torch.Generator().manual_seed(10_000_000 + step)
    idx = torch.randint(bank.shape[0], (cfg.ae_batch,), generator=g)
    images = bank[idx]
    if crop and crop < images.shape[1]:
        r, c = (
            torch.randint(0, (IMAGE_SIZE - crop) // 4 + 1, (2,), generator=g) * 4
        ).tolist()  # 4 px aligned
        images = images[:, r : r + crop, c : c + crop]
    return images_to_tensor(images)


def train_ae(
    editor: ToyEditor,
    cfg: ToyTrainConfig,
    run: Path,
    bank: Tensor,
    *,
    device="cpu",
    deadline: Deadline | None = None,
    log: Callable[[dict], None] | None = None,
) -> dict:
    """Train ``editor.ae`` (resuming from ``run/ae_ckpt.safetensors``) until ``cfg.ae_steps`` or the deadline;
    once every step is done, set its latent statistics. The summary's ``done`` says whether it is."""
    deadline = deadline or Deadline()
    ae = editor.ae.to(device).train()
    # start the posterior nearly deterministic: with logvar ~ 0 its noise (std 1) hides the signal until the
    # encoder learns to shrink it
    with torch.no_grad():
        ae.encoder.conv_out.bias[ae.config.z_channels :].fill_(-8.0)
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.ae_lr, weight_decay=0.0)
    path = run / "ae_ckpt.safetensors"
    step, _ = _resume(path, {"ae": ae}, {}, opt)
    saved = step
    while step < cfg.ae_steps and not deadline.reached():
        lr = cfg.ae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.ae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x = _ae_batch(step, cfg, bank, cfg.ae_crop).to(device)
        mean, logvar = ae.encoder(x).chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(20_000_000 + step))
        z = mean + torch.exp(0.5 * logvar) * noise.to(device)
        rec = ae.decoder(z)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum() / x.shape[0]
        loss = F.mse_loss(rec, x) + 0.1 * (rec - x).abs().mean() + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        step += 1
        if log:
            log({"stage": "ae", "step": step, "loss": loss.item(), "lr": lr})
        if step % cfg.ckpt_every == 0:
            _checkpoint(path, {"ae": ae}, {}, opt, step)
            saved = step
    if step != saved:
        _checkpoint(path, {"ae": ae}, {}, opt, step)
    ae.eval()
    if step < cfg.ae_steps:
        return {"ae_steps": step, "done": False}
    with torch.no_grad():
        means = [ae.encoder(_ae_batch(900_000 + i, cfg, bank).to(device)).chunk(2, 1)[0] for i in range(8)]
        z = torch.cat(means)
    shift, scale = float(z.mean()), float(1.0 / z.std())
    editor.with_latent_stats(shift, scale)
    return {"ae_steps": step, "latent_shift": shift, "latent_scale": scale, "done": True}


# ----------------------------------------------------------------------------------------------- dataset
def _example_arrays(
    seed: int, weights: tuple[float, ...] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, int]:
    kinds = ALL_EDITS if weights else LOCAL_EDITS + GLOBAL_EDITS  # no weights: the first editor's draw
    ex = make_example(seed, size=IMAGE_SIZE, kinds=kinds, weights=weights)
    return ex.source, ex.target, ex.mask, ex.instruction, KINDS.index(ex.kind)


def generate_examples(
    n: int,
    *,
    first_seed: int = 0,
    workers: int = 0,
    tokenizer=None,
    deadline: Deadline | None = None,
    kind_weights: tuple[float, ...] | None = None,
) -> dict[str, Tensor]:
    """Examples ``first_seed .. first_seed + n - 1`` as tensors: source / target (n, H, W, 3) uint8, pixel
    masks, instruction ids and edit kinds (``workers`` processes generate them); ``kind_weights`` (one per kind
    of ALL_EDITS) as in :class:`ToyTrainConfig`, None for the deterministic kinds drawn uniformly. At the
    deadline it returns the first examples made so far (possibly none)."""
    deadline = deadline or Deadline()
    seeds = range(first_seed, first_seed + n)
    make = functools.partial(_example_arrays, weights=kind_weights)
    rows = []
    if workers > 1:
        from multiprocessing import get_context

        with get_context("fork").Pool(workers) as pool:  # leaving the block ends the workers
            for row in pool.imap(make, seeds, chunksize=64):
                rows.append(row)
                if deadline.reached():
                    break
    else:
        for seed in seeds:
            if deadline.reached():
                break
            rows.append(make(seed))
    if not rows:
        return _no_examples()
    return {
        "source": torch.from_numpy(np.stack([r[0] for r in rows])),
        "target": torch.from_numpy(np.stack([r[1] for r in rows])),
        "mask": torch.from_numpy(np.stack([r[2] for r in rows])),
        "ids": (tokenizer or toy_tokenizer())([r[3] for r in rows]),
        "kind": torch.tensor([r[4] for r in rows]),
    }


def _no_examples() -> dict[str, Tensor]:
    images = torch.zeros(0, IMAGE_SIZE, IMAGE_SIZE, 3, dtype=torch.uint8)
    mask = torch.zeros(0, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    ids = torch.zeros(0, TEXT_TOKENS, dtype=torch.long)
    return {"source": images, "target": images.clone(), "mask": mask, "ids": ids, "kind": ids[:, 0].clone()}


def encode_latents(
    editor: ToyEditor,
    examples: dict[str, Tensor],
    *,
    device="cpu",
    batch: int = 64,
    start: int = 0,
    deadline: Deadline | None = None,
) -> dict[str, Tensor]:
    """AE latents (posterior means, fp16) of the sources and targets from example ``start`` on, ``batch``
    examples at a time (batches start at multiples of ``batch`` when ``start`` is one, so a resumed encoding
    gives the same numbers), until all are done or the deadline."""
    deadline = deadline or Deadline()
    ae = editor.ae.to(device).eval()
    out = {"source": [], "target": []}
    with torch.no_grad():
        for i in range(start, examples["source"].shape[0], batch):
            if deadline.reached():
                break
            for key in out:
                x = images_to_tensor(examples[key][i : i + batch]).to(device)
                out[key].append(ae.encode(x).half().cpu())
    empty = torch.zeros(0, ae.config.z_channels, IMAGE_SIZE // 4, IMAGE_SIZE // 4, dtype=torch.float16)
    return {k: torch.cat(v) if v else empty for k, v in out.items()}


def encode_examples(
    editor: ToyEditor, examples: dict[str, Tensor], *, device="cpu", batch: int = 64
) -> dict[str, Tensor]:
    """The training set: AE latents (fp16) of sources and targets, token-level masks, ids and kinds."""
    return _dataset(examples, encode_latents(editor, examples, device=device, batch=batch))


def _dataset(examples: dict[str, Tensor], latents: dict[str, Tensor]) -> dict[str, Tensor]:
    """The encoded ``latents`` of every example with its token-level mask, instruction ids and kind."""
    token = IMAGE_SIZE // 16  # pixels per token side on the 16 x 16 fine grid
    masks = F.max_pool2d(examples["mask"][:, None].float(), token)[:, 0] > 0
    return {**latents, "mask": masks, "ids": examples["ids"], "kind": examples["kind"]}


def _count(part: Path) -> tuple[dict[str, Tensor] | None, int]:
    """The tensors saved in ``part`` (None when there is no such file) and how many examples they hold."""
    if not part.is_file():
        return None, 0
    done = load_file(str(part))
    return done, next(iter(done.values())).shape[0]


def load_or_generate_examples(
    cfg: ToyTrainConfig, run: Path, *, workers: int = 0, deadline: Deadline | None = None
) -> dict[str, Tensor] | None:
    """The run's example bank (``run/examples_N.safetensors``), generated when missing. None when the deadline
    stopped the generation: what it made is in ``examples_N.part.safetensors``, where the next call goes on."""
    path = run / f"examples_{cfg.n_train}.safetensors"
    if path.is_file():
        return load_file(str(path))
    part = run / f"examples_{cfg.n_train}.part.safetensors"
    done, start = _count(part)
    first = cfg.seed * 1_000_000 + start
    new = generate_examples(
        cfg.n_train - start,
        first_seed=first,
        workers=workers,
        deadline=deadline,
        kind_weights=cfg.kind_weights,
    )
    examples = new if done is None else {k: torch.cat([done[k], new[k]]) for k in new}
    if examples["kind"].shape[0] < cfg.n_train:
        if new["kind"].shape[0]:
            atomic.save_tensors(examples, part)
        return None
    atomic.save_tensors(examples, path)
    part.unlink(missing_ok=True)
    return examples


def load_or_encode_dataset(
    editor: ToyEditor,
    examples: dict[str, Tensor],
    cfg: ToyTrainConfig,
    run: Path,
    *,
    device="cpu",
    batch: int = 64,
    deadline: Deadline | None = None,
) -> dict[str, Tensor] | None:
    """The encoded training set (``run/data_N.safetensors``), encoded when missing. None when the deadline
    stopped the encoding: the latents made so far are in ``data_N.part.safetensors``, where the next call goes
    on."""
    path = run / f"data_{cfg.n_train}.safetensors"
    if path.is_file():
        return load_file(str(path))
    part = run / f"data_{cfg.n_train}.part.safetensors"
    done, start = _count(part)
    new = encode_latents(editor, examples, device=device, batch=batch, start=start, deadline=deadline)
    latents = new if done is None else {k: torch.cat([done[k], new[k]]) for k in new}
    if latents["source"].shape[0] < cfg.n_train:
        if new["source"].shape[0]:
            atomic.save_tensors(latents, part)
        return None
    data = _dataset(examples, latents)
    atomic.save_tensors(data, path)
    part.unlink(missing_ok=True)
    return data


# ----------------------------------------------------------------------------------------------- transformer
def dit_loss(
    editor: ToyEditor,
    data: dict[str, Tensor],
    idx: Tensor,
    factor: int,
    g: torch.Generator,
    edit_weight: float,
    device,
) -> Tensor:
    """Weighted rectified-flow loss of one batch at a latent ``factor`` times coarser, or (``factor`` "mixed") on
    a mixed-resolution layout."""
    x0 = data["target"][idx].to(device).float()
    ref = data["source"][idx].to(device).float()
    mask = data["mask"][idx].to(device).float()
    if factor == "mixed":
        return _mixed_loss(editor, data, idx, x0, ref, mask, g, edit_weight, device)
    if factor > 1:
        x0, ref = F.avg_pool2d(x0, factor), F.avg_pool2d(ref, factor)
        mask = F.max_pool2d(mask[:, None], factor)[:, 0]
    b, _, H, W = x0.shape
    grid = (H // 2, W // 2)
    n = grid[0] * grid[1]
    u = torch.sigmoid(torch.randn(b, generator=g)).to(device)
    t = time_shift(u, FLUX_SCHEDULE.mu(n))
    eps = torch.randn(x0.shape, generator=g).to(device)
    xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
    ids = torch.cat([grid_ids(grid), grid_ids(grid, axis0=1.0)])
    v = _velocity(editor, data["ids"][idx], torch.cat([pack(xt), pack(ref)], 1), ids, t, n, device)
    err = (v - pack(eps - x0)).pow(2).mean(-1)  # (b, n)
    w = 1 + edit_weight * mask.flatten(1)
    return (w * err).sum() / w.sum()


def _velocity(
    editor: ToyEditor, text_ids: Tensor, img: Tensor, ids: Tensor, t: Tensor, n: int, device
) -> Tensor:
    """fp32 velocity of the first ``n`` image tokens (the target; the reference follows), bf16 autocast on GPUs."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
        txt, y = editor.text(text_ids.to(device))
        txt_ids = torch.zeros(1, txt.shape[1], 3, device=device)
        return editor.dit(img, ids.to(device), txt, txt_ids, t, y)[:, :n].float()


def _mixed_loss(
    editor: ToyEditor,
    data,
    idx,
    x0: Tensor,
    ref: Tensor,
    mask: Tensor,
    g: torch.Generator,
    edit_weight: float,
    device,
) -> Tensor:
    """The loss on a layout like SpecEdit's mixed stage, built the way the sampler builds it: kept coarse cells
    carry the area-pooled signal and the Haar DC of the noise, children the full-resolution signal and noise
    (positions from ``Layout.mixed``), the reference sits at the coarse level."""
    b, _, H, W = x0.shape
    hc, wc = H // 4, W // 4
    frac = float(torch.empty(1).uniform_(0.05, 0.6, generator=g))
    cells = torch.rand(hc * wc, generator=g) < frac
    expanded = cells.view(hc, wc)
    keep, children = (t.to(device) for t in mixed_indices(expanded))
    eps = torch.randn(x0.shape, generator=g).to(device)
    u = torch.sigmoid(torch.randn(b, generator=g)).to(device)
    layout = Layout.mixed(expanded, ref_factor=2.0)
    n = len(layout)
    t = time_shift(u, FLUX_SCHEDULE.mu(n))[:, None, None]
    x0_tok = torch.cat([pack(F.avg_pool2d(x0, 2))[:, keep], pack(x0)[:, children]], 1)
    eps_tok = torch.cat([pack(dc(eps))[:, keep], pack(eps)[:, children]], 1)
    fine_mask = mask.flatten(1)
    coarse_mask = F.max_pool2d(mask[:, None], 2)[:, 0].flatten(1)
    w = 1 + edit_weight * torch.cat([coarse_mask[:, keep], fine_mask[:, children]], 1)
    xt = (1 - t) * x0_tok + t * eps_tok
    ref_c = F.avg_pool2d(ref, 2)
    pos = torch.stack([torch.zeros_like(layout.rows), layout.rows, layout.cols], -1)
    ids = torch.cat([pos, grid_ids((hc, wc), axis0=1.0)])
    v = _velocity(editor, data["ids"][idx], torch.cat([xt, pack(ref_c)], 1), ids, t[:, 0, 0], n, device)
    err = (v - (eps_tok - x0_tok)).pow(2).mean(-1)
    return (w * err).sum() / w.sum()


def train_dit(
    editor: ToyEditor,
    data: dict[str, Tensor],
    cfg: ToyTrainConfig,
    run: Path,
    *,
    device="cpu",
    deadline: Deadline | None = None,
    log: Callable[[dict], None] | None = None,
) -> dict:
    """Train the transformer and text encoder (resuming from ``run/dit_ckpt.safetensors``) until ``cfg.steps``
    or the deadline; returns a summary (``done``: all steps made). With ``cfg.steps`` 0 the schedule is fitted
    to the deadline's time after timing the first steps, and kept in the checkpoint for resumed calls.

    The EMA weights are copied into ``editor`` at the end (they are what gets saved and evaluated).
    """
    deadline = deadline or Deadline()
    nets = {"dit": editor.dit.to(device).train(), "text": editor.text.to(device).train()}
    editor.ae.to(device).eval().requires_grad_(False)
    params = [p for m in nets.values() for p in m.parameters()]
    ema = {f"{k}.{n}": p.detach().clone() for k, m in nets.items() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    path = run / "dit_ckpt.safetensors"
    step, planned = _resume(path, nets, ema, opt)
    saved = step
    if torch.device(device).type == "cuda":
        data = {k: v.to(device) for k, v in data.items()}
    n_data = data["target"].shape[0]
    factors = torch.tensor(cfg.res_probs)
    total = cfg.steps or planned  # auto: the schedule planned by the call that started it
    if total == 0 and deadline.end is None:
        raise ValueError("--steps 0 (fit the schedule to the time budget) needs --minutes")
    t0, seen = time.time(), 0
    while (total == 0 or step < total) and not deadline.reached():
        if total == 0 and seen == 10:
            t_calib = time.time()  # the first steps carry warm-up (allocator, kernel selection): not timed
        if total == 0 and seen == 40:  # auto: the schedule ends with the time budget (5 % margin)
            per_step = (time.time() - t_calib) / 30
            total = step + max(1, int(0.95 * deadline.seconds_left() / per_step))
        horizon = total or 10**9
        warm = min(1.0, (step + 1) / cfg.warmup)
        lr = cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, horizon) / horizon)))
        for group in opt.param_groups:
            group["lr"] = lr
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        idx = torch.randint(n_data, (cfg.batch,), generator=g)
        factor = (1, 2, 4, "mixed")[int(torch.multinomial(factors, 1, generator=g))]
        loss = dit_loss(editor, data, idx, factor, g, cfg.edit_weight, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        seen += 1
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for k, m in nets.items():
                for n, p in m.named_parameters():
                    ema[f"{k}.{n}"].lerp_(p.detach(), 1 - decay)
        if log:
            log(
                {
                    "stage": "dit",
                    "step": step,
                    "loss": loss.item(),
                    "lr": lr,
                    "factor": factor,
                    "s_per_step": (time.time() - t0) / seen,
                }
            )
        if step % cfg.ckpt_every == 0:
            _checkpoint(path, nets, ema, opt, step, planned=total)
            saved = step
    if step != saved:
        _checkpoint(path, nets, ema, opt, step, planned=total)
    with torch.no_grad():
        for k, m in nets.items():
            for n, p in m.named_parameters():
                p.copy_(ema[f"{k}.{n}"])
            m.eval()
    return {
        "dit_steps": step,
        "planned_steps": total,
        "done": total > 0 and step >= total,
        "s_per_step": (time.time() - t0) / max(seen, 1),
    }


# ----------------------------------------------------------------------------------------------- checkpoints
def _checkpoint(
    path: Path, nets: dict[str, nn.Module], ema: dict[str, Tensor], opt, step: int, *, planned: int = 0
) -> None:
    """Model, EMA and AdamW state (per parameter, in order), the step and the planned step count in one
    safetensors file, never pickled; written atomically, so a kill during a save keeps the previous one."""
    state = {f"model.{k}.{n}": v for k, m in nets.items() for n, v in m.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in ema.items()})
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        s = opt.state.get(p)
        if s:
            state[f"opt.{i}.exp_avg"], state[f"opt.{i}.exp_avg_sq"] = s["exp_avg"], s["exp_avg_sq"]
            state[f"opt.{i}.step"] = torch.as_tensor(s["step"], dtype=torch.float32).reshape(1)
    state["step"] = torch.tensor([step])
    state["planned"] = torch.tensor([planned])
    atomic.save_tensors(state, path)


def _resume(path: Path, nets: dict[str, nn.Module], ema: dict[str, Tensor], opt) -> tuple[int, int]:
    """Load the checkpoint at ``path`` (if any) into ``nets``, ``ema`` and ``opt``; its step and planned
    step count (0, 0 without one)."""
    if not path.is_file():
        return 0, 0
    state = load_file(str(path))
    for k, m in nets.items():
        m.load_state_dict(
            {n[len(f"model.{k}.") :]: v for n, v in state.items() if n.startswith(f"model.{k}.")}
        )
    for k in ema:
        ema[k].copy_(state[f"ema.{k}"])
    device = next(iter(nets.values())).parameters().__next__().device
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        if f"opt.{i}.exp_avg" in state:
            opt.state[p] = {
                "step": state[f"opt.{i}.step"][0].clone(),
                "exp_avg": state[f"opt.{i}.exp_avg"].to(device),
                "exp_avg_sq": state[f"opt.{i}.exp_avg_sq"].to(device),
            }
    planned = int(state["planned"][0]) if "planned" in state else 0
    return int(state["step"][0]), planned


def config_dict(cfg: ToyTrainConfig) -> dict:
    return asdict(cfg)
