"""Is a stochastic edit's output one of its valid outcomes? Checked with the generator's own terms.

A stochastic edit (``specedit.toy.data.STOCHASTIC_EDITS``) has many valid targets, so its output is judged by
what all of them share (``Example.request``), not by its distance to the one target that was drawn:

- *object*: the requested colour appears as new pixels (near the colour in the output, not in the source),
  grouped in ``count`` connected objects of at least ``MIN_AREA`` of the smallest shape (a dot for scatter)
  whose centres lie in the request's region (add-somewhere, scatter); for a pattern, between 15 % and 85 % of
  the shape's inner pixels keep the shape's colour (the rest took another one);
- *preserved*: outside the region (grown by ``MARGIN`` pixels, where a decoder's blur may reach) the output is
  within ``PRESERVED_DB`` dB PSNR of the source.

A pixel is "near" a colour when its RGB distance to it is at most ``COLOR_TOLERANCE`` (the palette's closest two
colours are further apart than twice that). Shape legend: H W pixels.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from specedit.toy import metrics
from specedit.toy.data import COLORS, SHAPES, Example, Shape, _shape_mask, dilate

COLOR_TOLERANCE = 35.0
MIN_AREA = 0.4  # of the smallest object the edit can draw
MARGIN = 3
PRESERVED_DB = 22.0
PATTERN_SHARE = (0.15, 0.85)


def near(image: np.ndarray, color: str) -> np.ndarray:
    """(H, W) bool: pixels of the uint8 (H, W, 3) ``image`` within COLOR_TOLERANCE of ``color``."""
    diff = image.astype(np.float32) - np.array(COLORS[color], np.float32)
    return np.sqrt((diff**2).sum(-1)) <= COLOR_TOLERANCE


def objects(mask: np.ndarray, min_area: float) -> list[tuple[int, float, float]]:
    """The 8-connected components of ``mask`` with at least ``min_area`` pixels: (area, centre row, centre col)."""
    seen = np.zeros_like(mask)
    found = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    inside = 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
                    if inside and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        if len(pixels) >= min_area:
            ys, xs = np.array(pixels).T
            found.append((len(pixels), float(ys.mean()), float(xs.mean())))
    return found


def _smallest_area(kind: str, size: int) -> float:
    if kind == "scatter":
        return float(_shape_mask(Shape("dot", "red", "small", "center"), size).sum())
    return float(min(_shape_mask(Shape(k, "red", "small", "center"), size).sum() for k in SHAPES))


def _psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """PSNR (dB) of two uint8 (H, W, 3) images over the pixels of ``where`` (``metrics.psnr`` on [-1, 1])."""
    to = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None].float() / 127.5 - 1
    return float(metrics.psnr(to(a), to(b), torch.from_numpy(where)))


def check(example: Example, output: np.ndarray) -> dict:
    """Validity of the uint8 (H, W, 3) ``output`` for the stochastic ``example``: ``valid`` (object and
    preserved), ``object``, ``preserved``, ``found`` (objects found, or the pattern's share of the shape's
    colour) and ``preserved_psnr`` (dB, outside the grown region)."""
    req = example.request
    if req is None:
        raise ValueError(f"{example.kind!r} is not a stochastic edit: it has one valid target, no request")
    if output.shape != example.source.shape or output.dtype != np.uint8:
        raise ValueError(f"output must be uint8 {example.source.shape}, got {output.dtype} {output.shape}")
    size = output.shape[0]
    if req.kind == "pattern":
        inner = ~dilate(~req.region, MARGIN)  # the shape's pixels at least MARGIN from its outline
        share = float(near(output, req.color)[inner].mean()) if inner.any() else 0.0
        found, ok = share, PATTERN_SHARE[0] <= share <= PATTERN_SHARE[1]
    else:
        new = near(output, req.color) & ~near(example.source, req.color)
        found_objects = objects(new, MIN_AREA * _smallest_area(req.kind, size))
        centres_in = all(req.region[round(y), round(x)] for _, y, x in found_objects)
        found, ok = len(found_objects), len(found_objects) == req.count and centres_in
    outside = ~dilate(req.region, MARGIN)
    kept = _psnr(output, example.source, outside) if outside.any() else float("inf")
    return {
        "valid": bool(ok and kept >= PRESERVED_DB),
        "object": bool(ok),
        "preserved": bool(kept >= PRESERVED_DB),
        "found": found,
        "preserved_psnr": kept,
    }
