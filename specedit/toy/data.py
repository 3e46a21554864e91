"""Synthetic paired edits with ground-truth masks: the data of the toy editor.

A scene is a background (plain, a two-colour gradient or a two-colour texture) with one to three shapes
(circle, square, triangle, star, diamond) of named colours and sizes at named places on a 3 x 3 layout. An
edit is an English instruction and the scene it describes:

- local: recolour, remove, add (a named size at a named place), resize (bigger / smaller), move to a named place;
- global: background colour, brightness (brighter / darker), colour cast (warm / cool);
- stochastic (several valid outcomes, the curved-flow suite): add a shape somewhere on a side (left, right,
  top, bottom: a free place of that side, jittered), fill a shape with a random pattern (checker, stripes or
  dots of a random second colour, period and phase), scatter two to four dots at random free positions.

A stochastic example's target is one draw of its outcome distribution; ``Example.request`` says what every
valid outcome has (the colour, the region it may change, the count), which ``specedit.toy.validity`` checks.

``make_example(seed)`` returns the source image, the instruction, the edited image and the pixel-exact edit
mask (pixels whose value changed). Everything is drawn from ``numpy.random.default_rng(seed)``, so a seed is
an example. Shapes are rasterised without anti-aliasing so the mask is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "orange": (240, 140, 30), "purple": (140, 60, 190), "white": (245, 245, 245), "black": (25, 25, 25),
    "cyan": (40, 200, 210), "pink": (240, 130, 180), "gray": (128, 128, 128), "brown": (130, 80, 40),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZES = {"small": 0.10, "medium": 0.15, "large": 0.21}  # radius as a fraction of the image side
PLACES = {
    "top left": (0.22, 0.22), "top": (0.22, 0.5), "top right": (0.22, 0.78),
    "left": (0.5, 0.22), "center": (0.5, 0.5), "right": (0.5, 0.78),
    "bottom left": (0.78, 0.22), "bottom": (0.78, 0.5), "bottom right": (0.78, 0.78),
}  # (row, col) as fractions  # fmt: skip
LOCAL_EDITS = ("recolor", "remove", "add", "resize", "move")
GLOBAL_EDITS = ("background", "brightness", "cast")
STOCHASTIC_EDITS = ("add-somewhere", "pattern", "scatter")
ALL_EDITS = LOCAL_EDITS + GLOBAL_EDITS + STOCHASTIC_EDITS
SIDES = {side: tuple(p for p in PLACES if side in p.split()) for side in ("left", "right", "top", "bottom")}
COUNTS = {"two": 2, "three": 3, "four": 4}
DOT_RADIUS = 0.045  # scattered dots, as a fraction of the image side
JITTER = 0.07  # add-somewhere: the shape's centre moves up to this fraction from its place, per axis
PATTERN_PERIODS = (8, 10, 12, 16)  # pixels; >= 2 latent pixels of the toy AE (4 px each)
BACKGROUNDS = ("plain", "gradient", "texture")


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES, or "dot" (radius DOT_RADIUS; ``size`` is ignored)
    color: str
    size: str
    place: str
    # (row, col) from the place's centre, fractions of the side
    offset: tuple[float, float] = (0.0, 0.0)
    # ("checker" | "stripes" | "dots", second colour, period px, phase y, phase x)
    pattern: tuple | None = None

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    background: tuple  # ("plain", c) | ("gradient", c1, c2, axis) | ("texture", c1, c2, style)
    shapes: tuple[Shape, ...]
    brightness: float = 1.0  # global multiplicative gain
    cast: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel gain


@dataclass
class Example:
    source: np.ndarray  # (H, W, 3) uint8
    instruction: str
    target: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool: pixels the edit changed
    kind: str  # the edit type, e.g. "recolor" or "background"
    scene: Scene = field(repr=False, default=None)
    # stochastic edits: what every valid outcome has
    request: Request | None = field(repr=False, default=None)


@dataclass(frozen=True)
class Request:
    """What a stochastic edit asks for, in the generator's own terms: ``color`` (a COLORS name) must appear as
    ``count`` new objects (add-somewhere, scatter; ``count`` 0: a pattern) inside ``region`` (a (H, W) bool
    mask: the side's half, the free area, the shape) and nothing outside ``region`` may change."""

    kind: str
    color: str
    region: np.ndarray = field(repr=False)
    count: int = 0


# ----------------------------------------------------------------------------------------------- rendering
def _shape_mask(shape: Shape, size: int) -> np.ndarray:
    cy, cx = (np.array(PLACES[shape.place]) + np.array(shape.offset)) * size
    r = (DOT_RADIUS if shape.kind == "dot" else SIZES[shape.size]) * size
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = yy - cy, xx - cx
    if shape.kind in ("circle", "dot"):
        return dy**2 + dx**2 <= r**2
    if shape.kind == "square":
        s = r * 0.85
        return (np.abs(dy) <= s) & (np.abs(dx) <= s)
    if shape.kind == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    if shape.kind == "triangle":  # pointing up, inscribed in the circle of radius r
        top, base = -r, r * 0.5
        half = (dy - top) / (base - top) * r * 0.87
        return (dy >= top) & (dy <= base) & (np.abs(dx) <= half)
    if shape.kind == "star":  # five points: inside if the radius at this angle is below the star's outline
        ang = np.arctan2(dx, -dy) % (2 * np.pi / 5) - np.pi / 5
        outline = r * 0.45 / np.cos(ang) ** 0.35 + r * 0.55 * (1 - np.abs(ang) / (np.pi / 5)) ** 1.5
        return np.sqrt(dy**2 + dx**2) <= outline
    raise ValueError(f"unknown shape {shape.kind!r}")


def _background(bg: tuple, size: int) -> np.ndarray:
    kind = bg[0]
    if kind == "plain":
        return np.broadcast_to(np.array(COLORS[bg[1]], np.float32), (size, size, 3)).copy()
    c1, c2 = np.array(COLORS[bg[1]], np.float32), np.array(COLORS[bg[2]], np.float32)
    t = np.linspace(0, 1, size, dtype=np.float32)
    if kind == "gradient":
        w = t[:, None] if bg[3] == "vertical" else t[None, :]
        w = np.broadcast_to(w, (size, size))[..., None]
        return c1 * (1 - w) + c2 * w
    if kind == "texture":
        yy, xx = np.mgrid[0:size, 0:size]
        period = max(4, size // 8)
        pattern = (
            ((yy // period + xx // period) % 2 == 0) if bg[3] == "checker" else ((xx + yy) // period % 2 == 0)
        )
        return np.where(pattern[..., None], c1, c2).astype(np.float32)
    raise ValueError(f"unknown background {kind!r}")


def _pattern(pattern: tuple, size: int) -> np.ndarray:
    """(size, size) bool: where a patterned shape takes its second colour."""
    style, _, period, py, px = pattern
    yy, xx = np.mgrid[0:size, 0:size]
    if style == "checker":
        return ((yy + py) // (period // 2) + (xx + px) // (period // 2)) % 2 == 0
    if style == "stripes":
        return ((xx + yy + px) // (period // 2)) % 2 == 0
    if style == "dots":
        y, x = (yy + py) % period - period / 2 + 0.5, (xx + px) % period - period / 2 + 0.5
        return y**2 + x**2 <= (period / 3.2) ** 2
    raise ValueError(f"unknown pattern style {style!r}")


def render(scene: Scene, size: int = 128) -> np.ndarray:
    """(size, size, 3) uint8 image of ``scene``."""
    img = _background(scene.background, size)
    for shape in scene.shapes:
        inside = _shape_mask(shape, size)
        img[inside] = COLORS[shape.color]
        if shape.pattern is not None:
            img[inside & _pattern(shape.pattern, size)] = COLORS[shape.pattern[1]]
    img = img * scene.brightness * np.array(scene.cast, np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- sampling
def _pick(rng: np.random.Generator, items, exclude=()):
    options = [x for x in items if x not in exclude]
    return options[int(rng.integers(len(options)))]


def _background_sample(rng: np.random.Generator, kinds=BACKGROUNDS) -> tuple:
    kind = _pick(rng, kinds)
    dull = [c for c in COLORS if c not in ("white", "black")]
    if kind == "plain":
        return ("plain", _pick(rng, list(COLORS)))
    c1 = _pick(rng, dull)
    c2 = _pick(rng, dull, exclude=(c1,))
    return (
        kind,
        c1,
        c2,
        _pick(rng, ("vertical", "horizontal") if kind == "gradient" else ("checker", "stripes")),
    )


def _free_place(rng, shapes: tuple[Shape, ...], exclude=()) -> str | None:
    taken = {s.place for s in shapes}
    options = [p for p in PLACES if p not in taken and p not in exclude]
    return None if not options else options[int(rng.integers(len(options)))]


def _scene_sample(rng: np.random.Generator, max_shapes: int = 3) -> Scene:
    bg = _background_sample(rng)
    bg_colors = _bg_colors(Scene(bg, ()))
    shapes: list[Shape] = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        kind = _pick(rng, SHAPES)
        color = _pick(rng, list(COLORS), exclude=bg_colors | {s.color for s in shapes if s.kind == kind})
        place = _free_place(rng, tuple(shapes))
        size = _pick(rng, list(SIZES))
        shapes.append(Shape(kind, color, size, place))
    return Scene(bg, tuple(shapes))


def _distinct(shapes: tuple[Shape, ...], shape: Shape) -> bool:
    return sum(s.name == shape.name for s in shapes) == 1


def make_edit(rng: np.random.Generator, scene: Scene, kind: str) -> tuple[str, Scene] | None:
    """An instruction of ``kind`` and the edited scene, or None when the scene does not allow it."""
    shapes = scene.shapes
    bg_colors = _bg_colors(scene)
    named = [s for s in shapes if _distinct(shapes, s)]
    if kind in ("recolor", "remove", "resize", "move") and not named:
        return None
    if kind == "recolor":
        s = _pick(rng, named)
        new = _pick(rng, list(COLORS), exclude=bg_colors | {x.color for x in shapes if x.kind == s.kind})
        edited = tuple(replace(x, color=new) if x is s else x for x in shapes)
        text = _pick(
            rng, ("make the {old} {k} {new}", "change the {old} {k} to {new}", "paint the {old} {k} {new}")
        )
        return text.format(old=s.color, k=s.kind, new=new), replace(scene, shapes=edited)
    if kind == "remove":
        s = _pick(rng, named)
        text = _pick(rng, ("remove the {n}", "delete the {n}", "take away the {n}"))
        return text.format(n=s.name), replace(scene, shapes=tuple(x for x in shapes if x is not s))
    if kind == "add":
        place = _free_place(rng, shapes)
        if place is None or len(shapes) >= 4:
            return None
        k = _pick(rng, SHAPES)
        color = _pick(rng, list(COLORS), exclude=bg_colors | {x.color for x in shapes if x.kind == k})
        new = Shape(k, color, _pick(rng, list(SIZES)), place)
        # the size is named so that the instruction determines the target (v1 and v2 left it open)
        verb = _pick(rng, ("add", "put", "draw"))
        return f"{verb} a {new.size} {new.name} at the {place}", replace(scene, shapes=(*shapes, new))
    if kind == "resize":
        s = _pick(rng, named)
        order = list(SIZES)
        i = order.index(s.size)
        bigger = i == 0 or (i < len(order) - 1 and bool(rng.integers(2)))
        new_size = order[i + 1] if bigger else order[i - 1]
        edited = tuple(replace(x, size=new_size) if x is s else x for x in shapes)
        text = ("make the {n} bigger" if bigger else "make the {n} smaller").format(n=s.name)
        return text, replace(scene, shapes=edited)
    if kind == "move":
        s = _pick(rng, named)
        place = _free_place(rng, shapes)
        if place is None:
            return None
        edited = tuple(replace(x, place=place) if x is s else x for x in shapes)
        text = _pick(rng, ("move the {n} to the {p}", "shift the {n} to the {p}"))
        return text.format(n=s.name, p=place), replace(scene, shapes=edited)
    if kind == "background":
        new = _pick(rng, list(COLORS), exclude=bg_colors | {x.color for x in shapes})
        text = _pick(rng, ("make the background {c}", "change the background to {c}"))
        return text.format(c=new), replace(scene, background=("plain", new))
    if kind == "brightness":
        brighter = bool(rng.integers(2))
        text = "make the image brighter" if brighter else "make the image darker"
        return text, replace(scene, brightness=1.25 if brighter else 0.7)
    if kind == "cast":
        warm = bool(rng.integers(2))
        text = "give the image a warm tint" if warm else "give the image a cool tint"
        return text, replace(scene, cast=(1.15, 1.0, 0.8) if warm else (0.8, 1.0, 1.15))
    raise ValueError(f"unknown edit kind {kind!r}")


def make_stochastic_edit(rng: np.random.Generator, scene: Scene, kind: str, size: int = 128):
    """A stochastic edit of ``kind``: (instruction, one drawn edited scene, its Request), or None when the scene
    does not allow it. Every random choice the instruction leaves open is drawn from ``rng``."""
    if kind not in STOCHASTIC_EDITS:
        raise ValueError(f"unknown stochastic edit kind {kind!r}")
    make = {"add-somewhere": _add_somewhere, "pattern": _pattern_fill, "scatter": _scatter}[kind]
    return make(rng, scene, size)


def _add_somewhere(rng: np.random.Generator, scene: Scene, size: int):
    shapes = scene.shapes
    taken = {x.place for x in shapes}
    sides = [s for s, places in SIDES.items() if any(p not in taken for p in places)]
    if not sides or len(shapes) >= 4:
        return None
    side = _pick(rng, sides)
    place = _free_place(rng, shapes, exclude=tuple(p for p in PLACES if p not in SIDES[side]))
    k = _pick(rng, SHAPES)
    color = _pick(rng, list(COLORS), exclude=_bg_colors(scene) | {x.color for x in shapes})
    offset = tuple(float(v) for v in rng.uniform(-JITTER, JITTER, 2))
    new = Shape(k, color, _pick(rng, list(SIZES)), place, offset)
    cut = round(0.56 * size)  # the side's half and a margin for a large shape jittered inwards
    half = np.zeros((size, size), bool)
    half[{"left": np.s_[:, :cut], "right": np.s_[:, size - cut :], "top": np.s_[:cut],
          "bottom": np.s_[size - cut :]}[side]] = True  # fmt: skip
    text = _pick(rng, ("add a {n} somewhere on the {s}", "put a {n} somewhere on the {s}"))
    return text.format(n=new.name, s=side), replace(scene, shapes=(*shapes, new)), Request("add-somewhere",
                                                                                          color, half, 1)  # fmt: skip


def _pattern_fill(rng: np.random.Generator, scene: Scene, size: int):
    shapes = scene.shapes
    named = [s for s in shapes if _distinct(shapes, s) and s.size != "small"]
    if not named:
        return None
    s = _pick(rng, named)
    period = int(_pick(rng, PATTERN_PERIODS))
    second = _pick(rng, list(COLORS), exclude=_bg_colors(scene) | {s.color})
    style = _pick(rng, ("checker", "stripes", "dots"))
    pattern = (style, second, period, *(int(v) for v in rng.integers(period, size=2)))
    edited = tuple(replace(x, pattern=pattern) if x is s else x for x in shapes)
    region = _shape_mask(s, size) & ~_covered(shapes[shapes.index(s) + 1 :], size)  # its visible pixels
    text = f"fill the {s.name} with a random pattern"
    return text, replace(scene, shapes=edited), Request("pattern", s.color, region, 0)


def _scatter(rng: np.random.Generator, scene: Scene, size: int):
    shapes = scene.shapes
    word = _pick(rng, list(COUNTS))
    color = _pick(rng, list(COLORS), exclude=_bg_colors(scene) | {x.color for x in shapes})
    free = ~_covered(shapes, size, grow=3)
    dots: list[Shape] = []
    for _ in range(200):
        if len(dots) == COUNTS[word]:
            break
        y, x = rng.uniform(0.08, 0.92, 2)
        dot = Shape("dot", color, "small", "center", (float(y) - 0.5, float(x) - 0.5))
        inside = _shape_mask(dot, size)
        if not (inside & ~free).any() and not (inside & _covered(tuple(dots), size, grow=4)).any():
            dots.append(dot)
    if len(dots) < COUNTS[word]:
        return None
    text = f"scatter {word} {color} dots"
    return text, replace(scene, shapes=(*shapes, *dots)), Request("scatter", color, free, COUNTS[word])


def _bg_colors(scene: Scene) -> set[str]:
    """The colour names of ``scene``'s background (one for a plain one, two otherwise)."""
    bg = scene.background
    return set(bg[1:3]) if bg[0] != "plain" else {bg[1]}


def _covered(shapes: tuple[Shape, ...], size: int, grow: int = 0) -> np.ndarray:
    """(size, size) bool: pixels within ``grow`` pixels (a square neighbourhood) of any of ``shapes``."""
    covered = np.zeros((size, size), bool)
    for shape in shapes:
        covered |= _shape_mask(shape, size)
    return dilate(covered, grow)


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The bool ``mask`` grown by ``pixels`` (a square neighbourhood: 8-connected steps)."""
    for _ in range(pixels):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
        mask = grown
    return mask


def make_example(seed: int, *, size: int = 128, kinds: tuple[str, ...] = LOCAL_EDITS + GLOBAL_EDITS,
                 max_shapes: int = 3, weights: tuple[float, ...] | None = None) -> Example:  # fmt: skip
    """The example of ``seed``: a random scene and a random edit of one of ``kinds`` (uniformly, or with
    ``weights``), retrying if the scene does not allow it. The default draws only deterministic edits, as the
    first toy editor's data did, so its seeds give the same examples."""
    unknown = set(kinds) - set(ALL_EDITS)
    if unknown:
        raise ValueError(f"unknown edit kinds {sorted(unknown)}; choose from {ALL_EDITS}")
    if weights is not None and (len(weights) != len(kinds) or min(weights) < 0 or not sum(weights) > 0):
        raise ValueError(f"weights must be one number >= 0 per kind with a positive sum, got {weights}")
    p = None if weights is None else np.asarray(weights, float) / sum(weights)
    rng = np.random.default_rng(seed)
    for _ in range(100):
        scene = _scene_sample(rng, max_shapes)
        kind = kinds[int(rng.integers(len(kinds)) if p is None else rng.choice(len(kinds), p=p))]
        request = None
        if kind in STOCHASTIC_EDITS:
            made = make_stochastic_edit(rng, scene, kind, size)
            made, request = (None, None) if made is None else (made[:2], made[2])
        else:
            made = make_edit(rng, scene, kind)
        if made is None:
            continue
        text, edited = made
        src, tgt = render(scene, size), render(edited, size)
        mask = (src != tgt).any(-1)
        if mask.any():
            return Example(src, text, tgt, mask, kind, scene, request)
    raise RuntimeError(f"no valid edit found for seed {seed} and kinds {kinds}")


_WORDS = """make the change to paint remove delete take away add a at put draw bigger smaller move shift
background image brighter darker give warm cool tint"""
_STOCHASTIC_WORDS = "somewhere on fill with random pattern scatter dots"  # added by v2
_SIZE_WORDS = " ".join(SIZES)  # added by v3: "add" names the size


def vocabulary() -> list[str]:
    """Every word an instruction can contain (the toy tokenizer's vocabulary): the first editor's 48 words,
    sorted, then each later editor's new words, sorted, so that every earlier word keeps its id."""
    first = set(_WORDS.split()) | set(COLORS) | set(SHAPES)
    for place in PLACES:
        first |= set(place.split())
    words = sorted(first)
    for added in (set(_STOCHASTIC_WORDS.split()) | set(COUNTS), set(_SIZE_WORDS.split())):
        words += sorted(added - set(words))
    return words
