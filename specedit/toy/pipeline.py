"""The toy editor behind the one edit API: ``ToyEditor.edit`` runs :class:`ToyPipeline`'s
``specedit.pipeline.EditPipeline.edit`` (batches, seeds, methods, outputs as there).

The toy editor is FLUX.1-Kontext-shaped (``specedit.kontext.KontextEditor``) without a guidance embedding:
``guidance`` raises; ``true_cfg_scale`` > 1 with a ``negative_prompt`` runs true CFG as Kontext does. Images
are edited at their own size (sides in multiples of 32 px: 4 tokens of 2x2 latent pixels of the 4x AE), or
LANCZOS-resized to ``height`` x ``width``; further images of an edit are references at their own size.
"""

from __future__ import annotations

import time

from specedit.kontext.editor import KontextEditor
from specedit.kontext.pipeline import kontext_editors, kontext_prompts
from specedit.pipeline import (
    EditPipeline,
    Sample,
    encode_images,
    grid_multiple,
    image_size,
    same_sizes,
    stack_editors,
    working_image,
)


class ToyPipeline(EditPipeline):
    """``edit`` over a loaded :class:`specedit.toy.model.ToyEditor` (``toy``)."""

    family = "toy"
    default_steps = 50

    def __init__(self, toy):
        self.toy = toy

    def _options(self, guidance: float | None, true_cfg_scale: float | None) -> float:
        if guidance is not None:
            raise ValueError(f"guidance={guidance}: the toy editor has no guidance embedding")
        return 1.0 if true_cfg_scale is None else float(true_cfg_scale)

    def _size(self, image, height: int | None, width: int | None) -> tuple[int, int]:
        if (height is None) != (width is None):
            raise ValueError(f"give both height and width or neither, got height={height}, width={width}")
        w, h = image_size(image) if height is None else (width, height)
        m = grid_multiple(2, self.toy.ae.config.factor)
        if w < m or h < m or w % m or h % m:
            raise ValueError(f"the toy editor needs image sides in multiples of {m} px, got {w}x{h}")
        return w, h

    def _prepare(
        self, samples: list[Sample], scale: float, height, width, batched_cfg: bool, full_resolution: bool
    ):
        sizes = same_sizes([
            [self._size(im, height, width) if k == 0 else self._size(im, None, None) for k, im in enumerate(s.images)]
            for s in samples
        ])  # fmt: skip
        t0 = time.perf_counter()
        prompts = kontext_prompts(self.toy.encode_prompt, samples, scale)
        t1 = time.perf_counter()
        ae = self.toy.ae
        dtype = next(ae.parameters()).dtype
        latents = encode_images(samples, sizes, lambda x: ae.encode(x.to(self.toy.device, dtype)))
        seconds = {"encode_prompt": t1 - t0, "encode_image": time.perf_counter() - t1}
        editors = kontext_editors(self.toy.dit, ae, *prompts, latents, guidance=0.0, cfg_scale=scale,
                                  batched_cfg=batched_cfg)  # fmt: skip
        return editors, working_image(samples[0].images[0], sizes[0]), seconds, {}

    def _stack(self, editors: list[KontextEditor]) -> KontextEditor:
        return stack_editors(editors)
