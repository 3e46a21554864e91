"""``torch.compile`` for the DiTs (``Flux``, ``QwenImage``; any module with a tensor ``forward``).

:func:`compile_transformer` replaces ``model.forward`` in place (the module, its parameters and state-dict keys
stay as they are, so LoRA fusing and ``transformer_module()`` keep working) by a dispatcher:

- No feature cache (``model.stack_hook`` is None): the compiled forward, ``fullgraph=True`` by default (the
  forwards have no graph break; ``tests/specedit/test_compile.py`` checks it with ``torch._dynamo.explain``).
- A feature cache active (``stack_hook`` set, ``models.hooks``): the eager forward. A cache's policy is Python
  state that changes every step; traced, it would recompile or break the graph, so caching runs eager.

Shapes. SpecEdit runs several token counts per edit (draft, coarse, mixed, full stages) and the mixed count
depends on the verifier. With ``dynamic_tokens`` (default) the token dimensions of ``img``, ``img_ids``,
``txt``, ``txt_ids`` and ``txt_mask`` are marked dynamic (``torch._dynamo.maybe_mark_dynamic``) before every
call, so one graph serves every stage, bucket and prompt length: the first call (the warm-up) compiles it and
later edits of any size at the same batch, dtype and attention backend compile nothing. With
``dynamic_tokens=False`` each token count gets its own static graph (what CUDA graphs and autotuning like
best); the verifier's ``FeatureVerifier(buckets=STATIC_BUCKETS)`` then bounds an edit size to a few mixed
shapes, which a warm-up must run once each (e.g. the method ``with_budget(b)`` for every bucket b), and the
recompile limit is raised to ``STATIC_RECOMPILE_LIMIT`` to hold them.

Modes (``torch.compile``'s): None (default), "max-autotune-no-cudagraphs", "max-autotune", and
"reduce-overhead" (CUDA graphs: meant for the small draft and coarse stages, where launch overhead dominates;
unmeasured here). Under a CUDA-graph mode each call starts a new graph step and its output is cloned, since
the sampler keeps the last velocity across stages and a replay would overwrite it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch._dynamo.utils import counters

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
# forward argument -> its token dimension (ids may come as (n, 3) or (b, n, 3))
TOKEN_DIMS = {"img": -2, "img_ids": -2, "txt": -2, "txt_ids": -2, "txt_mask": -1}
STATIC_RECOMPILE_LIMIT = 32


@dataclass(frozen=True)
class CompileOptions:
    """How :func:`compile_transformer` compiles: ``torch.compile``'s mode, backend and fullgraph, and whether
    the token dimensions are dynamic (see the module docstring)."""

    mode: str | None = None
    backend: str = "inductor"
    fullgraph: bool = True
    dynamic_tokens: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(
                f"compile mode {self.mode!r} is unknown; choose from {', '.join(map(str, MODES))}"
            )
        if self.mode not in (None, "default") and self.backend != "inductor":
            raise ValueError(f"compile mode {self.mode!r} needs the inductor backend, got {self.backend!r}")
        if self.backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ValueError(f"compile backend {self.backend!r} is unknown to torch._dynamo")


class CompiledForward:
    """``model.forward`` after :func:`compile_transformer`: the compiled forward, or the eager one while a
    feature cache hooks the block stack."""

    def __init__(self, eager, options: CompileOptions):
        self.eager, self.options = eager, options
        self.signature = inspect.signature(eager)
        mode = None if options.mode == "default" else options.mode
        self.compiled = torch.compile(eager, backend=options.backend, mode=mode, fullgraph=options.fullgraph,
                                      dynamic=None if options.dynamic_tokens else False)  # fmt: skip

    def __call__(self, *args, **kwargs):
        if getattr(self.eager.__self__, "stack_hook", None) is not None:
            return self.eager(*args, **kwargs)
        if self.options.dynamic_tokens:
            mark_tokens_dynamic(self.signature.bind(*args, **kwargs).arguments)
        if self.options.mode not in CUDAGRAPH_MODES:
            return self.compiled(*args, **kwargs)
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(*args, **kwargs).clone()


def mark_tokens_dynamic(arguments: dict) -> None:
    """Mark the token dimension (``TOKEN_DIMS``) of each tensor argument dynamic for the next compile."""
    for name, dim in TOKEN_DIMS.items():
        t = arguments.get(name)
        if isinstance(t, Tensor) and t.ndim >= -dim:
            torch._dynamo.maybe_mark_dynamic(t, t.ndim + dim)


def compile_transformer(model: nn.Module, options: CompileOptions | None = None, **kwargs) -> nn.Module:
    """Compile ``model``'s forward in place (see the module docstring); returns ``model``.

    options: a :class:`CompileOptions`, or its fields as keywords (``mode=``, ``backend=``, ``fullgraph=``,
    ``dynamic_tokens=``). Compiling happens lazily, on the first call.
    """
    options = options or CompileOptions(**kwargs)
    if is_compiled(model):
        raise ValueError(f"{type(model).__name__} is compiled already ({model.forward.options})")
    if getattr(model, "block_offload", None) is not None:
        raise ValueError(
            f"{type(model).__name__} streams its blocks (models.offload, forward hooks and side streams): "
            "compile a resident transformer (no transformer_offload)"
        )
    if not options.dynamic_tokens:
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), STATIC_RECOMPILE_LIMIT))
    if hasattr(model, "stack_hook"):  # an instance attribute from the start: setting and restoring a hook
        model.stack_hook = model.stack_hook  # then leaves the guarded attribute where the graph found it
    model.forward = CompiledForward(model.forward, options)
    return model


def is_compiled(model: nn.Module) -> bool:
    return isinstance(model.__dict__.get("forward"), CompiledForward)


def uncompile(model: nn.Module) -> nn.Module:
    """Restore the eager forward of a model compiled by :func:`compile_transformer`."""
    if is_compiled(model):
        del model.forward
    return model


def compile_count() -> int:
    """Graphs ``torch._dynamo`` has compiled in this process (first compiles and recompiles alike); the
    difference across a run is that run's (re)compiles."""
    return counters["stats"]["unique_graphs"]


def graph_breaks(fn, *args, **kwargs) -> int:
    """Graph breaks of ``fn(*args, **kwargs)`` (``torch._dynamo.explain``; runs ``fn`` once, eagerly traced)."""
    return torch._dynamo.explain(fn)(*args, **kwargs).graph_break_count
