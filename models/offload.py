"""Block-wise offload: a DiT's blocks live in (pinned) CPU memory and visit the device a few at a time.

:func:`offload_blocks` keeps every tensor of the blocks of the model's block lists (``Flux.double_blocks``
then ``single_blocks``, ``QwenImage.transformer_blocks``) at home and moves the rest of the model (embedders,
output layer) to ``device``. Hooks on each block then run it on device copies: before block k runs, its
copy is ready (copied now if no prefetch started it) and blocks k+1 .. k+resident-1 start copying on a side
stream; after block k it is evicted (its home tensors put back, the copies dropped). At most ``resident``
blocks are on the device at a time, and none between forwards, so a LoRA fused into the model changes the
home weights the next forward copies.

Copies are always made, even when ``device`` is the home device (the CPU): the prefetch and eviction logic
then runs unchanged with a :class:`Streams` that does nothing, which is how the tests prove that the offload
path gives the resident path's output bit for bit. On CUDA the side stream overlaps the copies with compute
(copies from pinned memory are asynchronous; ``Tensor.record_stream`` keeps a copy's memory from being reused
before the compute stream is done with it), as in diffusers' group offloading with ``use_stream=True``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

BLOCK_LISTS = ("double_blocks", "single_blocks", "transformer_blocks")  # the models' block lists


class Streams:
    """A side stream for copies on CUDA; on any other device every method does nothing (copies then run
    synchronously on the caller's thread, in order)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextmanager
    def copying(self):
        """Work issued inside runs on the side stream."""
        if self.side is None:
            yield
            return
        with torch.cuda.stream(self.side):
            yield

    def record(self):
        """An event after the side stream's work so far (None off CUDA)."""
        return None if self.side is None else self.side.record_event()

    def wait(self, event) -> None:
        """Make the compute stream wait for ``event``."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def hand_over(self, t: Tensor) -> None:
        """Mark ``t`` (allocated on the side stream) as used by the compute stream, so its memory is not
        reused before the compute stream's work queued so far is done."""
        if self.side is not None:
            t.record_stream(torch.cuda.current_stream(self.device))


@dataclass
class _Loaded:
    event: object
    saved: list  # (store, key, home tensor) to put back on eviction
    copies: list[Tensor] = field(default_factory=list)


class BlockOffload:
    """Hooks that run ``blocks`` (in execution order) on ``device`` with at most ``resident`` of them there.

    ``transfers`` counts block copies and ``bytes_copied`` their bytes (for tests and benchmarks);
    ``peak_resident`` is the most blocks on the device at once. ``remove()`` takes the hooks off.
    """

    def __init__(self, blocks: Sequence[nn.Module], device: str | torch.device, resident: int = 2):
        if isinstance(resident, bool) or not isinstance(resident, int) or resident < 1:
            raise ValueError(f"resident blocks must be an integer >= 1, got {resident!r}")
        self.blocks, self.device, self.resident = list(blocks), torch.device(device), resident
        self.streams = Streams(self.device)
        self.loaded: dict[int, _Loaded] = {}
        self.transfers = self.bytes_copied = self.peak_resident = 0
        self.handles = []
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(lambda m, args, i=i: self._before(i)))
            self.handles.append(block.register_forward_hook(lambda m, args, out, i=i: self._after(i)))

    def _before(self, i: int) -> None:
        window = range(i, min(i + self.resident, len(self.blocks)))
        for j in [j for j in self.loaded if j not in window]:
            self._evict(j)  # a block called out of order: keep the bound
        for j in window:
            self._fetch(j)
        self.peak_resident = max(self.peak_resident, len(self.loaded))
        self.streams.wait(self.loaded[i].event)

    def _after(self, i: int) -> None:
        self._evict(i)
        if i == len(self.blocks) - 1:
            for j in list(self.loaded):
                self._evict(j)

    def _fetch(self, i: int) -> None:
        if i in self.loaded:
            return
        saved, copies = [], []
        with self.streams.copying():
            for store, k, t in _tensors(self.blocks[i]):
                copy = torch.empty_like(t, device=self.device)
                copy.copy_(t.detach(), non_blocking=True)
                saved.append((store, k, t))
                copies.append(copy)
                store[k] = nn.Parameter(copy, requires_grad=False) if isinstance(t, nn.Parameter) else copy
                self.bytes_copied += t.numel() * t.element_size()
            event = self.streams.record()
        self.loaded[i] = _Loaded(event, saved, copies)
        self.transfers += 1

    def _evict(self, i: int) -> None:
        done = self.loaded.pop(i)
        for t in done.copies:
            self.streams.hand_over(t)
        for store, k, t in done.saved:
            store[k] = t

    def evict_all(self) -> None:
        """Put every block's home tensors back (nothing stays on the device)."""
        for j in list(self.loaded):
            self._evict(j)

    def remove(self) -> None:
        """Evict everything and take the hooks off (the blocks then run wherever their home tensors are)."""
        self.evict_all()
        for h in self.handles:
            h.remove()
        self.handles = []


def _tensors(module: nn.Module):
    for m in module.modules():
        for store in (m._parameters, m._buffers):
            for k, t in store.items():
                if t is not None:
                    yield store, k, t


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The model's block lists (children named in ``BLOCK_LISTS``) in registration order, which is the
    order the models run them."""
    found = [c for n, c in model.named_children() if n in BLOCK_LISTS and isinstance(c, nn.ModuleList)]
    if not found:
        raise TypeError(f"{type(model).__name__} has no block list ({', '.join(BLOCK_LISTS)})")
    return found


def offload_blocks(
    model: nn.Module, device: str | torch.device, resident: int = 2, *, lists=None, pin: bool | None = None
) -> BlockOffload:
    """Offload ``model``'s blocks (the modules of ``lists``, in the order they run; default
    :func:`block_lists`): they stay where they are (the CPU), everything else moves to ``device``, and each
    forward streams the blocks through ``device`` with at most ``resident`` there at once
    (:class:`BlockOffload`, kept as ``model.block_offload``). ``pin`` (default: when ``device`` is CUDA) copies
    the blocks' home tensors into pinned memory, which makes the copies asynchronous but gives up a memory map
    of the checkpoint for those tensors."""
    device = torch.device(device)
    if getattr(model, "block_offload", None) is not None:
        raise ValueError(f"{type(model).__name__} is offloaded already")
    lists = block_lists(model) if lists is None else list(lists)
    blocks = [b for lst in lists for b in lst]
    at_home = {id(t) for b in blocks for _, _, t in _tensors(b)}
    if any(t.device.type != "cpu" for b in blocks for _, _, t in _tensors(b)):
        raise ValueError("offload_blocks expects the model's blocks on the CPU (load it there first)")
    for store, k, t in _tensors(model):
        if id(t) not in at_home and t.device != device:
            moved = t.detach().to(device)
            store[k] = nn.Parameter(moved, t.requires_grad) if isinstance(t, nn.Parameter) else moved
    if device.type == "cuda" if pin is None else pin:
        for b in blocks:
            for store, k, t in _tensors(b):
                pinned = t.detach().pin_memory()
                store[k] = nn.Parameter(pinned, False) if isinstance(t, nn.Parameter) else pinned
    model.block_offload = BlockOffload(blocks, device, resident)
    return model.block_offload


def measure(fn: Callable[[], object], device: str | torch.device) -> dict:
    """Run ``fn()`` once and return {"seconds": wall time, "peak_bytes": the device's peak allocated memory
    during the call (``torch.cuda.max_memory_allocated`` after a reset; None off CUDA), "result": fn's value}."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return {"seconds": seconds, "peak_bytes": peak, "result": result}
