"""The DiTs' one hook point: the call of their block stack.

Every transformer in ``models`` (``Flux``, ``QwenImage``) embeds its inputs, runs its block lists on the image
and text streams, and projects the image stream out. ``model.stack_hook``, when set, is called as
``hook(run, img, txt) -> (img, txt)`` in place of ``run(img, txt)``, where ``run`` runs the whole block stack on
the embedded streams (b, n, d) and (b, l, d) with the forward's other inputs bound. A hook may call ``run`` or
return streams of its own (a feature cache's forecast); the embedders and the output layer always run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

StackRun = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
StackHook = Callable[[StackRun, Tensor, Tensor], tuple[Tensor, Tensor]]


@contextmanager
def stack_hook(model: nn.Module, hook: StackHook) -> Iterator[nn.Module]:
    """Set ``model.stack_hook`` for the duration of the block (the previous hook is restored after)."""
    if not hasattr(model, "stack_hook"):
        raise TypeError(f"{type(model).__name__} has no stack_hook (a hook point of the models' DiTs)")
    previous = model.stack_hook
    model.stack_hook = hook
    try:
        yield model
    finally:
        model.stack_hook = previous
