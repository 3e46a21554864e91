"""Step distillation of the toy editor: a few-step LoRA trained by piecewise rectified flow.

Recipe (PeRFlow, Yan et al. 2024, "PeRFlow: Piecewise Rectified Flow as Universal Plug-and-Play Accelerator",
arXiv:2405.07510, with the teacher's ODE solved by Euler as the toy's sampler does):

1. Teacher trajectories. The teacher (the toy editor, no LoRA) integrates each training edit from Gaussian
   noise with Euler on ``teacher_steps`` points of the toy's own schedule (``flow_sigmas`` at the fine token
   count). The schedule is a shifted ``linspace(1, 1/K, K)``, so K = 24 contains every point of the 4-, 6- and
   8-step schedules (K divisible by each N). Every point is kept (fp16), at the fine grid (SpecEdit's full
   stage and ``distilled-N``) and, for some edits, at the 2x coarser grid with the reference 2x coarser
   (SpecEdit's coarse stage and its draft run there). Edits are ``specedit.toy.data`` examples with seeds
   900_000+ (fine) and 950_000+ (coarse): inside the training range (< 1_000_000), away from the held-out
   demo (5_000_000+) and eval (6_000_000+) seeds.
2. Student. The teacher's transformer with a LoRA of rank ``rank`` on every linear of its double and single
   blocks and final layer (B = 0 at the start: the student starts as the teacher). A step draws, per sample,
   N from ``nfes``, a window [s_i, s_{i+1}] of the N-step schedule and a time t in it (t = s_i, where the
   N-step Euler sampler evaluates the model, with probability ``start_frac``, else uniform in the window);
   x_t lies on the straight line between the teacher's states at s_i and s_{i+1}, and the student's velocity
   is regressed onto that line's velocity (x_{s_{i+1}} - x_{s_i}) / (s_{i+1} - s_i). A student that matches
   it takes the teacher's state at s_i to its state at s_{i+1} in one Euler step.

Everything is resumable: the trajectory bank grows in ``teacher_*.part.safetensors`` one batch at a time, the
student checkpoints (LoRA + AdamW state + step) every ``ckpt_every`` steps, each file written atomically;
every draw comes from a generator seeded by the run's seed and the batch or step, so a resumed run computes
what an uninterrupted one does (same device and thread count). The LoRA is written in BFL's key layout
(``diffusion_model.<module>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha``), which
``models.lora.fuse_lora`` reads.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from samplers.layout import Layout
from samplers.schedules import flow_sigmas
from specedit.kontext.editor import KontextEditor
from specedit.toy import atomic
from specedit.toy.data import make_example
from specedit.toy.model import ToyEditor, images_to_tensor
from specedit.toy.train import Deadline, _checkpoint, _resume

LORA_FILE = "distill_lora.safetensors"
INFO_FILE = "distill_lora.json"
FINE_SEED, COARSE_SEED = 900_000, 950_000  # first example seeds of the two trajectory banks
TARGETS = ("double_blocks.", "single_blocks.", "final_layer.")  # module paths that get a LoRA


@dataclass(frozen=True)
class DistillConfig:
    """Settings of one distillation run (defaults: the shipped LoRA's recipe, about 25 minutes on one CPU core)."""

    seed: int = 0
    nfes: tuple[int, ...] = (4, 6, 8)  # student step counts
    teacher_steps: int = 24  # Euler points of the teacher; a multiple of every N
    n_fine: int = 48  # teacher trajectories at the fine grid
    n_coarse: int = 24  # ... at the 2x coarser grid
    traj_batch: int = 8
    image_size: int = 128
    rank: int = 16
    steps: int = 200
    batch: int = 8
    lr: float = 3e-4
    warmup: int = 20
    weight_decay: float = 0.0
    start_frac: float = 0.5  # samples at the window's first point (where Euler evaluates the model)
    coarse_prob: float = 0.25  # batches drawn from the coarse bank
    ckpt_every: int = 20

    def __post_init__(self) -> None:
        nfes = tuple(self.nfes)
        if not nfes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in nfes):
            raise ValueError(f"--distill step counts must be positive integers, got {nfes}")
        bad = [n for n in nfes if self.teacher_steps % n]
        if bad:
            raise ValueError(
                f"--distill step count(s) {bad} do not divide the teacher's {self.teacher_steps} steps "
                "(its grid must contain every student point); choose divisors, e.g. 4,6,8"
            )
        for name in (
            "teacher_steps",
            "n_fine",
            "traj_batch",
            "rank",
            "steps",
            "batch",
            "warmup",
            "ckpt_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.n_coarse < 0 or self.n_fine > 50_000 or self.n_coarse > 50_000:
            raise ValueError("--n-fine and --n-coarse must lie in 0..50000 (the seeds stay below 1_000_000)")
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {self.image_size}")
        if not self.lr > 0 or not 0 <= self.start_frac <= 1 or not 0 <= self.coarse_prob <= 1:
            raise ValueError("need lr > 0 and start_frac, coarse_prob in [0, 1]")


def config_from(saved: dict) -> DistillConfig:
    names = {f.name for f in fields(DistillConfig)}
    return DistillConfig(**{k: tuple(v) if k == "nfes" else v for k, v in saved.items() if k in names})


# ----------------------------------------------------------------------------------------------- LoRA
class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * x A^T B^T`` with ``base`` frozen; A (r, in), B (out, r) held by a :class:`LoRASet`."""

    def __init__(self, base: nn.Linear, a: nn.Parameter, b: nn.Parameter, scale: float):
        super().__init__()
        self.base, self.a, self.b, self.scale = base, a, b, scale

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * ((x @ self.a.t().to(x.dtype)) @ self.b.t().to(x.dtype))


class LoRASet(nn.Module):
    """Trainable low-rank adapters for the linears of ``model`` under :data:`TARGETS` (A random, B zero, so
    the adapted model starts equal to ``model``); :meth:`attach` / :meth:`detach` swap them in and out."""

    def __init__(self, model: nn.Module, rank: int, *, seed: int = 0):
        super().__init__()
        self.rank = rank
        self.paths = [
            n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(TARGETS)
        ]
        g = torch.Generator().manual_seed(seed)
        mods = dict(model.named_modules())
        self.a, self.b = nn.ParameterDict(), nn.ParameterDict()
        for p in self.paths:
            w = mods[p].weight
            a = torch.randn(rank, w.shape[1], generator=g) / math.sqrt(w.shape[1])
            self.a[p.replace(".", "-")] = nn.Parameter(a.to(w.device))
            self.b[p.replace(".", "-")] = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device))

    def attach(self, model: nn.Module) -> None:
        mods = dict(model.named_modules())
        for p in self.paths:
            parent, _, leaf = p.rpartition(".")
            base = mods[p].base if isinstance(mods[p], LoRALinear) else mods[p]
            key = p.replace(".", "-")
            setattr(mods[parent] if parent else model, leaf, LoRALinear(base, self.a[key], self.b[key], 1.0))

    def detach(self, model: nn.Module) -> None:
        mods = dict(model.named_modules())
        for p in self.paths:
            parent, _, leaf = p.rpartition(".")
            if isinstance(mods[p], LoRALinear):
                setattr(mods[parent] if parent else model, leaf, mods[p].base)

    def state(self, dtype=torch.float16) -> dict[str, Tensor]:
        """The adapters in BFL's LoRA layout (alpha = r: a factor of 1), as ``models.lora.fuse_lora`` reads them."""
        out = {}
        for p in self.paths:
            key = p.replace(".", "-")
            out[f"diffusion_model.{p}.lora_A.weight"] = self.a[key].detach().to("cpu", dtype)
            out[f"diffusion_model.{p}.lora_B.weight"] = self.b[key].detach().to("cpu", dtype)
            out[f"diffusion_model.{p}.alpha"] = torch.tensor(float(self.rank), dtype=dtype)
        return out


# ----------------------------------------------------------------------------------------------- teacher
def _conditioning(teacher: ToyEditor, seeds: list[int], size: int) -> dict[str, Tensor]:
    """Source latents, text states and pooled vectors of the examples ``seeds`` (no gradients)."""
    exs = [make_example(s, size=size) for s in seeds]
    with torch.no_grad():
        source = teacher.ae.encode(images_to_tensor([e.source for e in exs]).to(teacher.device))
        txt, y = teacher.encode_prompt([e.instruction for e in exs])
    return {"source": source.float(), "txt": txt.float(), "y": y.float()}


def _layout(grid: tuple[int, int], coarse: bool) -> Layout:
    """The fine layout, or the coarse stage's: a 2x coarser grid with the reference 2x coarser."""
    return Layout.full((grid[0] // 2, grid[1] // 2), ref_factor=2.0) if coarse else Layout.full(grid)


def _editor(teacher: ToyEditor, cond: dict[str, Tensor]) -> KontextEditor:
    return KontextEditor(teacher.dit, teacher.ae, cond["txt"], cond["y"], cond["source"], guidance=0.0)


def teacher_batch(teacher: ToyEditor, seeds: list[int], sigmas: Tensor, *, coarse: bool, size: int,
                  noise_seed: int) -> dict[str, Tensor]:  # fmt: skip
    """The conditioning of ``seeds`` and the teacher's Euler states at every point of ``sigmas`` ("traj",
    (b, K + 1, n, c) fp16) from seeded Gaussian noise, at the fine or the coarse grid."""
    cond = _conditioning(teacher, seeds, size)
    ed = _editor(teacher, cond)
    layout = _layout(ed.grid, coarse)
    g = torch.Generator().manual_seed(noise_seed)
    x = torch.randn(len(seeds), len(layout), ed.source.shape[1] * 4, generator=g).to(ed.source)
    states = [x]
    with torch.no_grad():
        den = ed.denoiser(layout)
        for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            x = x + (s_next - s) * den(x, torch.tensor(s))
            states.append(x)
    return {**cond, "traj": torch.stack(states, 1).half()}


def teacher_bank(teacher: ToyEditor, cfg: DistillConfig, run: Path, *, coarse: bool,
                 deadline: Deadline, log=None) -> dict[str, Tensor] | None:  # fmt: skip
    """The run's trajectory bank at one grid, made (resumably, batch by batch) when missing; None when the
    deadline stopped it (what was made is in ``teacher_<grid>.part.safetensors``)."""
    kind, n, first = ("coarse", cfg.n_coarse, COARSE_SEED) if coarse else ("fine", cfg.n_fine, FINE_SEED)
    path, part = run / f"teacher_{kind}.safetensors", run / f"teacher_{kind}.part.safetensors"
    if path.is_file():
        return load_file(str(path))
    done = load_file(str(part)) if part.is_file() else None
    count = 0 if done is None else done["traj"].shape[0]
    tokens = (cfg.image_size // 8) ** 2  # the fine grid's tokens: 4x AE, 2x2 patches
    sigmas = flow_sigmas(cfg.teacher_steps, tokens)
    while count < n:
        if deadline.reached():
            return None
        seeds = list(range(first + count, first + min(n, count + cfg.traj_batch)))
        new = teacher_batch(teacher, seeds, sigmas, coarse=coarse, size=cfg.image_size,
                            noise_seed=cfg.seed * 1_000_003 + seeds[0])  # fmt: skip
        done = new if done is None else {k: torch.cat([done[k], new[k]]) for k in new}
        count = done["traj"].shape[0]
        atomic.save_tensors(done, part)
        if log:
            log({"stage": f"teacher-{kind}", "step": count, "of": n})
    atomic.save_tensors(done, path)
    part.unlink(missing_ok=True)
    return done


# ----------------------------------------------------------------------------------------------- student
def _draw(
    bank: dict[str, Tensor], cfg: DistillConfig, g: torch.Generator
) -> tuple[dict, Tensor, Tensor, Tensor]:
    """A batch: its conditioning, x_t on the teacher's segment, t, and the segment's velocity."""
    n_bank, k = bank["traj"].shape[0], cfg.teacher_steps
    idx = torch.randint(n_bank, (cfg.batch,), generator=g)
    nfe = torch.tensor(cfg.nfes)[torch.randint(len(cfg.nfes), (cfg.batch,), generator=g)]
    window = (torch.rand(cfg.batch, generator=g) * nfe).long()  # i in 0..N-1
    stride = k // nfe
    ia, ib = window * stride, (window + 1) * stride  # the window's ends on the teacher's grid
    tokens = (cfg.image_size // 8) ** 2
    sig = flow_sigmas(k, tokens).double()
    sa, sb = sig[ia], sig[ib]
    frac = torch.rand(cfg.batch, generator=g).double()
    frac = torch.where(torch.rand(cfg.batch, generator=g) < cfg.start_frac, torch.zeros_like(frac), frac)
    t = sa + frac * (sb - sa)
    traj = bank["traj"][idx].float()
    xa, xb = traj[torch.arange(cfg.batch), ia], traj[torch.arange(cfg.batch), ib]
    v = (xb - xa) / (sb - sa).float()[:, None, None]
    xt = xa + (t - sa).float()[:, None, None] * v
    cond = {key: bank[key][idx] for key in ("source", "txt", "y")}
    return cond, xt, t.float(), v


def student_loss(teacher: ToyEditor, bank: dict[str, Tensor], cfg: DistillConfig, g: torch.Generator,
                 *, coarse: bool) -> Tensor:  # fmt: skip
    """Mean squared error between the (LoRA-adapted) model's velocity and the teacher segment's velocity."""
    cond, xt, t, v = _draw(bank, cfg, g)
    dev = teacher.device
    ed = _editor(teacher, {k: c.to(dev) for k, c in cond.items()})
    pred = ed.denoiser(_layout(ed.grid, coarse))(xt.to(dev), t.to(dev))
    return (pred.float() - v.to(dev)).pow(2).mean()


def train_student(teacher: ToyEditor, banks: dict[str, dict], cfg: DistillConfig, run: Path, *,
                  deadline: Deadline, log=None) -> tuple[LoRASet, dict]:  # fmt: skip
    """Train the LoRA (resuming from ``run/student_ckpt.safetensors``) until ``cfg.steps`` or the deadline;
    returns it (detached from the teacher) and a summary."""
    lora = LoRASet(teacher.dit, cfg.rank, seed=cfg.seed)
    teacher.dit.requires_grad_(False)
    opt = torch.optim.AdamW(lora.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    path = run / "student_ckpt.safetensors"
    step, _ = _resume(path, {"lora": lora}, {}, opt)
    saved, t0, seen, losses = step, time.time(), 0, []
    lora.attach(teacher.dit)
    try:
        while step < cfg.steps and not deadline.reached():
            warm = min(1.0, (step + 1) / cfg.warmup)
            lr = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            for group in opt.param_groups:
                group["lr"] = lr
            g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
            coarse = bool(banks.get("coarse")) and float(torch.rand(1, generator=g)) < cfg.coarse_prob
            loss = student_loss(teacher, banks["coarse" if coarse else "fine"], cfg, g, coarse=coarse)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, seen = step + 1, seen + 1
            losses.append(loss.item())
            if log:
                log({"stage": "student", "step": step, "loss": losses[-1], "lr": lr, "coarse": coarse,
                     "s_per_step": (time.time() - t0) / seen})  # fmt: skip
            if step % cfg.ckpt_every == 0:
                _checkpoint(path, {"lora": lora}, {}, opt, step)
                saved = step
        if step != saved:
            _checkpoint(path, {"lora": lora}, {}, opt, step)
        val = {"val_loss_student": validation_loss(teacher, banks, cfg)}
    finally:
        lora.detach(teacher.dit)
    val["val_loss_teacher"] = validation_loss(teacher, banks, cfg)
    return lora, {"steps_done": step, "done": step >= cfg.steps, "losses": losses, **val}


VAL_SEED, VAL_BATCHES = 123_456_789, 4


@torch.no_grad()
def validation_loss(model: ToyEditor, banks: dict[str, dict], cfg: DistillConfig) -> float:
    """The loss on ``VAL_BATCHES`` fixed draws from the fine bank (the same for every run of a bank): with the
    LoRA attached the student's, without it the teacher's own (its N-step Euler error, in velocity)."""
    g = torch.Generator().manual_seed(VAL_SEED)
    losses = [student_loss(model, banks["fine"], cfg, g, coarse=False).item() for _ in range(VAL_BATCHES)]
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------------------------- the run
RESUMABLE = ("steps", "ckpt_every")  # settings a resumed run may change


def _run_config(run: Path, overrides: dict) -> DistillConfig:
    """The run's saved configuration with ``overrides`` (only RESUMABLE ones may differ), or a new one."""
    path = run / "distill_config.json"
    if not path.is_file():
        return replace(DistillConfig(), **overrides)
    cfg = config_from(json.loads(path.read_text()))
    changed = {k: v for k, v in overrides.items() if getattr(cfg, k) != v and k not in RESUMABLE}
    if changed:
        raise ValueError(f"{run} was started with other settings; differing: {changed} (use a new --run)")
    return replace(cfg, **{k: v for k, v in overrides.items() if k in RESUMABLE})


def _check_out(out: Path, run: Path, overwrite: bool) -> None:
    """Refuse (one line) to replace a LoRA that another run wrote, unless ``overwrite``."""
    atomic.check_folder(out)
    if not (out / LORA_FILE).exists() or overwrite:
        return
    try:
        writer = json.loads((out / INFO_FILE).read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        writer = None
    if writer != str(run.resolve()):
        raise ValueError(f"--out {out} already holds {LORA_FILE}; pass --overwrite to replace it")


def distill_toy(run: str | Path, *, teacher: str | Path | None = None, out: str | Path | None = None,
                minutes: float | None = None, overwrite: bool = False, device="cpu",
                log: Callable[[dict], None] | None = None, **overrides) -> dict:  # fmt: skip
    """Run (or resume) the distillation; returns a summary with ``done`` True once all steps are made.

    ``teacher``: a toy editor folder (default: the shipped weights). The LoRA and its metadata go to ``out``
    (default ``run/lora``) as ``distill_lora.safetensors`` / ``distill_lora.json`` (written atomically, also
    after a stopped run; a resumed run replaces them). Settings are checked before any work."""
    run = Path(run)
    atomic.check_folder(run, "--run")
    out = Path(out) if out is not None else run / "lora"
    cfg = _run_config(run, overrides)
    deadline = Deadline(minutes)
    _check_out(out, run, overwrite)
    model = ToyEditor.load(teacher, device=device) if teacher is not None else ToyEditor.load(device=device)
    run.mkdir(parents=True, exist_ok=True)
    atomic.clean_stale(run)
    atomic.write_json(run / "distill_config.json", asdict(cfg))
    with deadline.catching_signals(), (run / "log.jsonl").open("a", buffering=1) as logfile:

        def record(entry: dict) -> None:
            logfile.write(json.dumps(entry) + "\n")
            if log:
                log(entry)

        return _stages(model, cfg, run, out, deadline, record, teacher)


def _stages(model: ToyEditor, cfg: DistillConfig, run: Path, out: Path, deadline: Deadline, record,
            teacher) -> dict:  # fmt: skip
    t0 = time.time()
    banks = {}
    for kind, n in (("fine", cfg.n_fine), ("coarse", cfg.n_coarse)):
        if n:
            banks[kind] = teacher_bank(
                model, cfg, run, coarse=kind == "coarse", deadline=deadline, log=record
            )
            if banks[kind] is None:
                stopped = f"{deadline.reason} in the teacher stage ({kind}); run the same command to resume"
                return {"run": str(run), "done": False, "stopped": stopped}
    lora, summary = train_student(model, banks, cfg, run, deadline=deadline, log=record)
    info = {"run": str(run.resolve()), "recipe": "specedit train-toy --distill", "config": asdict(cfg),
            "teacher": str(teacher or "shipped specedit/toy/weights"), "steps_done": summary["steps_done"],
            "final_loss": sum(summary["losses"][-20:]) / max(1, len(summary["losses"][-20:])),
            "val_loss_student": summary["val_loss_student"],
            "val_loss_teacher": summary["val_loss_teacher"]}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic.save_tensors(lora.state(), out / LORA_FILE)
    info["sha256"] = atomic.sha256(out / LORA_FILE)
    atomic.write_json(out / INFO_FILE, info)
    result = {"run": str(run), "lora": str(out / LORA_FILE), "steps_done": summary["steps_done"],
              "done": summary["done"], "seconds": time.time() - t0, "val_loss_student": summary["val_loss_student"],
              "val_loss_teacher": summary["val_loss_teacher"]}  # fmt: skip
    if not summary["done"]:
        result["stopped"] = f"{deadline.reason} in the student stage; run the same command to resume"
    return result
