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

Everything is deterministic given the seeds: batches are drawn from ``seed + step``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.packing import grid_ids, pack
from samplers.field import dc
from samplers.layout import Layout, mixed_indices
from samplers.schedules import FLUX_SCHEDULE, time_shift
from specedit.toy.data import GLOBAL_EDITS, LOCAL_EDITS, make_example
from specedit.toy.model import IMAGE_SIZE, ToyEditor, images_to_tensor, toy_tokenizer

KINDS = LOCAL_EDITS + GLOBAL_EDITS


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
    minutes: float | None = None,
    log: Callable[[dict], None] | None = None,
) -> dict:
    """Train ``editor.ae`` (resuming from ``run/ae_ckpt.safetensors``), then set its latent statistics."""
    ae = editor.ae.to(device).train()
    # start the posterior nearly deterministic: with logvar ~ 0 its noise (std 1) hides the signal until the
    # encoder learns to shrink it
    with torch.no_grad():
        ae.encoder.conv_out.bias[ae.config.z_channels :].fill_(-8.0)
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.ae_lr, weight_decay=0.0)
    step = _resume(run / "ae_ckpt.safetensors", {"ae": ae}, {}, opt)
    t_end = None if minutes is None else time.time() + 60 * minutes
    while step < cfg.ae_steps and (t_end is None or time.time() < t_end):
        lr = cfg.ae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.ae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x = _ae_batch(step, cfg, bank, cfg.ae_crop).to(device)
        mean, logvar = ae.encoder(x).chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
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
        if step % cfg.ckpt_every == 0 or step == cfg.ae_steps:
            _checkpoint(run / "ae_ckpt.safetensors", {"ae": ae}, {}, opt, step)
    _checkpoint(run / "ae_ckpt.safetensors", {"ae": ae}, {}, opt, step)
    ae.eval()
    with torch.no_grad():
        means = [ae.encoder(_ae_batch(900_000 + i, cfg, bank).to(device)).chunk(2, 1)[0] for i in range(8)]
        z = torch.cat(means)
    shift, scale = float(z.mean()), float(1.0 / z.std())
    editor.with_latent_stats(shift, scale)
    return {"ae_steps": step, "latent_shift": shift, "latent_scale": scale, "done": step >= cfg.ae_steps}


# ----------------------------------------------------------------------------------------------- dataset
def _example_arrays(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, int]:
    ex = make_example(seed, size=IMAGE_SIZE)
    return ex.source, ex.target, ex.mask, ex.instruction, KINDS.index(ex.kind)


def generate_examples(n: int, *, first_seed: int = 0, workers: int = 0, tokenizer=None) -> dict[str, Tensor]:
    """Examples ``first_seed .. first_seed + n - 1`` as tensors: source / target (n, H, W, 3) uint8, pixel
    masks, instruction ids and edit kinds (``workers`` processes generate them)."""
    seeds = range(first_seed, first_seed + n)
    if workers > 1:
        from multiprocessing import get_context

        with get_context("fork").Pool(workers) as pool:
            rows = pool.map(_example_arrays, seeds, chunksize=64)
    else:
        rows = [_example_arrays(s) for s in seeds]
    return {
        "source": torch.from_numpy(np.stack([r[0] for r in rows])),
        "target": torch.from_numpy(np.stack([r[1] for r in rows])),
        "mask": torch.from_numpy(np.stack([r[2] for r in rows])),
        "ids": (tokenizer or toy_tokenizer())([r[3] for r in rows]),
        "kind": torch.tensor([r[4] for r in rows]),
    }


def encode_examples(
    editor: ToyEditor, examples: dict[str, Tensor], *, device="cpu", batch: int = 64
) -> dict[str, Tensor]:
    """The training set: AE latents (fp16) of sources and targets, token-level masks, ids and kinds."""
    ae = editor.ae.to(device).eval()
    out = {"source": [], "target": []}
    with torch.no_grad():
        for i in range(0, examples["source"].shape[0], batch):
            for key in out:
                x = images_to_tensor(examples[key][i : i + batch]).to(device)
                out[key].append(ae.encode(x).half().cpu())
    token = IMAGE_SIZE // 16  # pixels per token side on the 16 x 16 fine grid
    masks = F.max_pool2d(examples["mask"][:, None].float(), token)[:, 0] > 0
    return {
        "source": torch.cat(out["source"]),
        "target": torch.cat(out["target"]),
        "mask": masks,
        "ids": examples["ids"],
        "kind": examples["kind"],
    }


def load_or_generate_examples(cfg: ToyTrainConfig, run: Path, *, workers: int = 0) -> dict[str, Tensor]:
    path = run / f"examples_{cfg.n_train}.safetensors"
    if path.is_file():
        return load_file(str(path))
    examples = generate_examples(cfg.n_train, first_seed=cfg.seed * 1_000_000, workers=workers)
    save_file({k: v.contiguous() for k, v in examples.items()}, str(path))
    return examples


def load_or_encode_dataset(
    editor: ToyEditor, examples: dict[str, Tensor], cfg: ToyTrainConfig, run: Path, *, device="cpu"
) -> dict[str, Tensor]:
    path = run / f"data_{cfg.n_train}.safetensors"
    if path.is_file():
        return load_file(str(path))
    data = encode_examples(editor, examples, device=device)
    save_file({k: v.contiguous() for k, v in data.items()}, str(path))
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
    minutes: float | None = None,
    log: Callable[[dict], None] | None = None,
) -> dict:
    """Train the transformer and text encoder (resuming from ``run/dit_ckpt.safetensors``); returns a summary.

    The EMA weights are copied into ``editor`` at the end (they are what gets saved and evaluated).
    """
    nets = {"dit": editor.dit.to(device).train(), "text": editor.text.to(device).train()}
    editor.ae.to(device).eval().requires_grad_(False)
    params = [p for m in nets.values() for p in m.parameters()]
    ema = {f"{k}.{n}": p.detach().clone() for k, m in nets.items() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    step = _resume(run / "dit_ckpt.safetensors", nets, ema, opt)
    t_end = None if minutes is None else time.time() + 60 * minutes
    if torch.device(device).type == "cuda":
        data = {k: v.to(device) for k, v in data.items()}
    n_data = data["target"].shape[0]
    factors = torch.tensor(cfg.res_probs)
    total = cfg.steps
    if total == 0 and t_end is None:
        raise ValueError("steps 0 (auto) needs a time budget (minutes)")
    t0, seen = time.time(), 0
    while (total == 0 or step < total) and (t_end is None or time.time() < t_end):
        if total == 0 and seen == 10:
            t_calib = time.time()  # the first steps carry warm-up (allocator, kernel selection): not timed
        if total == 0 and seen == 40:  # auto: the schedule ends with the time budget (5 % margin)
            per_step = (time.time() - t_calib) / 30
            total = step + max(1, int(0.95 * (t_end - time.time()) / per_step))
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
            _checkpoint(run / "dit_ckpt.safetensors", nets, ema, opt, step)
    _checkpoint(run / "dit_ckpt.safetensors", nets, ema, opt, step)
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
def _checkpoint(path: Path, nets: dict[str, nn.Module], ema: dict[str, Tensor], opt, step: int) -> None:
    """Model, EMA and AdamW state (per parameter, in order) in one safetensors file; never pickled."""
    state = {f"model.{k}.{n}": v for k, m in nets.items() for n, v in m.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in ema.items()})
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        s = opt.state.get(p)
        if s:
            state[f"opt.{i}.exp_avg"], state[f"opt.{i}.exp_avg_sq"] = s["exp_avg"], s["exp_avg_sq"]
            state[f"opt.{i}.step"] = torch.as_tensor(s["step"], dtype=torch.float32).reshape(1)
    state["step"] = torch.tensor([step])
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)  # atomic: an interrupted save never corrupts the last checkpoint


def _resume(path: Path, nets: dict[str, nn.Module], ema: dict[str, Tensor], opt) -> int:
    if not path.is_file():
        return 0
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
    return int(state["step"][0])


def config_dict(cfg: ToyTrainConfig) -> dict:
    return asdict(cfg)
