"""The synthetic paired-edit generator: deterministic, exact masks, every edit kind, closed vocabulary."""

import numpy as np
import pytest

from specedit.toy.data import (
    COLORS,
    GLOBAL_EDITS,
    LOCAL_EDITS,
    STOCHASTIC_EDITS,
    Shape,
    _shape_mask,
    dilate,
    make_example,
    render,
    vocabulary,
)
from specedit.toy.model import toy_tokenizer
from specedit.toy.validity import check, near, objects


def test_deterministic_by_seed():
    a, b = make_example(42), make_example(42)
    assert (
        a.instruction == b.instruction
        and np.array_equal(a.source, b.source)
        and np.array_equal(a.target, b.target)
    )
    assert make_example(43).instruction != a.instruction or not np.array_equal(
        make_example(43).source, a.source
    )


@pytest.mark.parametrize("kind", LOCAL_EDITS + GLOBAL_EDITS)
def test_every_kind_with_an_exact_mask(kind):
    for seed in range(5):
        ex = make_example(seed, kinds=(kind,))
        assert ex.kind == kind and ex.source.shape == (128, 128, 3) and ex.source.dtype == np.uint8
        assert np.array_equal(ex.mask, (ex.source != ex.target).any(-1)) and ex.mask.any()
        assert np.array_equal(render(ex.scene), ex.source)
        if kind in LOCAL_EDITS:
            assert ex.mask.mean() < 0.5  # a local edit changes a local region


def test_instructions_use_the_vocabulary_and_tokenize_without_unknowns():
    words, tok = set(vocabulary()), toy_tokenizer()
    texts = [make_example(s).instruction for s in range(300)]
    assert all(set(t.split()) <= words for t in texts)
    ids = tok(texts)
    assert ids.shape == (300, 16) and not (ids == 0).any()  # id 0 is <unk>
    assert (ids.argmax(1) > 1).all()  # CLIP pools at the first <eos>, the highest id


def test_bad_kind():
    with pytest.raises(ValueError, match="unknown edit kinds"):
        make_example(0, kinds=("rotate",))


# ----------------------------------------------------------------------------------------------- stochastic edits
@pytest.mark.parametrize("kind", STOCHASTIC_EDITS)
def test_stochastic_kinds_draw_valid_targets_with_exact_masks(kind):
    for seed in range(30):
        ex = make_example(seed, kinds=(kind,))
        assert ex.kind == kind and ex.request is not None and ex.request.kind == kind
        assert np.array_equal(ex.mask, (ex.source != ex.target).any(-1)) and ex.mask.any()
        assert not (ex.mask & ~ex.request.region).any()  # the drawn target changes only the request's region
        assert check(ex, ex.target)["valid"], (seed, ex.instruction)
        assert not check(ex, ex.source)["valid"]  # copying the source is not a valid edit


def test_stochastic_instruction_leaves_the_outcome_open():
    """Two scenes with the same instruction words draw different targets: the outcome is not determined."""
    seen = {}
    for seed in range(400):
        ex = make_example(seed, kinds=("scatter",))
        seen.setdefault(ex.instruction, []).append(ex)
    same = next(v for v in seen.values() if len(v) > 1)
    a, b = same[0], same[1]
    assert not np.array_equal(a.mask, b.mask)


def test_the_default_draw_is_the_first_editors_and_weights_pick_kinds():
    assert make_example(6_000_000).request is None
    kinds = [make_example(s, kinds=("add", "scatter"), weights=(0, 1)).kind for s in range(10)]
    assert set(kinds) == {"scatter"}
    with pytest.raises(ValueError, match=r"weights must be one number >= 0 per kind .* got \(1,\)"):
        make_example(0, kinds=("add", "move"), weights=(1,))


def test_vocabulary_grows_at_the_end():
    words = vocabulary()
    assert words[:48] == sorted(words[:48]) and len(words) == len(set(words)) == 62
    assert {"scatter", "somewhere", "pattern", "three", "dots"} <= set(words[48:59])
    assert words[59:] == ["large", "medium", "small"]  # v3: "add" names the size
    texts = [make_example(s, kinds=STOCHASTIC_EDITS).instruction for s in range(100)]
    assert not (toy_tokenizer()(texts) == 0).any()
    old = toy_tokenizer(vocab_size=51)  # the first editor's text encoder: its ids are kept
    assert (
        old("remove the red star")[0, :5].tolist() == toy_tokenizer()("remove the red star")[0, :5].tolist()
    )
    assert (
        old("scatter three red dots")[0, 1].item() == 0 and old("x")[0, -1].item() == 50
    )  # <unk>; <eos> last
    v2 = toy_tokenizer(vocab_size=62)  # the second editor's: it knows the stochastic words, not the sizes
    assert v2("scatter three red dots")[0, 1].item() != 0 and v2("add a large red star")[0, 3].item() == 0
    with pytest.raises(ValueError, match="vocab_size must be in 4..65, got 70"):
        toy_tokenizer(vocab_size=70)


def test_add_names_the_size_so_the_instruction_determines_the_target():
    for seed in range(20):
        ex = make_example(seed, kinds=("add",))
        # "add a large red star at the top left"
        _, _, size, color, kind, _, _, *place = ex.instruction.split()
        drawn = _shape_mask(Shape(kind, color, size, " ".join(place)), 128)
        assert not (ex.mask & ~drawn).any() and ex.mask.sum() >= 0.9 * drawn.sum(), ex.instruction


# ----------------------------------------------------------------------------------------------- validity
def _scatter_case():
    return next(ex for s in range(100) if (ex := make_example(s, kinds=("scatter",))).request.count == 3)


def test_validity_counts_objects_and_checks_the_rest():
    ex = _scatter_case()
    good = check(ex, ex.target)
    assert good == {**good, "valid": True, "object": True, "preserved": True, "found": 3}
    one_less = ex.target.copy()
    dots = objects(near(ex.target, ex.request.color) & ~near(ex.source, ex.request.color), 10)
    _, y, x = dots[0]
    gone = (np.abs(np.arange(128)[:, None] - y) < 9) & (np.abs(np.arange(128)[None] - x) < 9)
    one_less[gone] = ex.source[gone]
    assert check(ex, one_less)["found"] == 2 and not check(ex, one_less)["valid"]
    blurred = ((ex.target.astype(np.float32) + ex.source) / 2).astype(np.uint8)  # half-faded dots: no colour
    assert not check(ex, blurred)["object"]
    spoiled = ex.target.copy()
    spoiled[~dilate(ex.request.region, 3)] = 255 - spoiled[~dilate(ex.request.region, 3)]
    assert check(ex, spoiled)["object"] and not check(ex, spoiled)["preserved"]


def test_add_somewhere_needs_the_named_side_and_pattern_needs_two_colours():
    ex = next(
        e for s in range(100) if "on the left" in (e := make_example(s, kinds=("add-somewhere",))).instruction
    )
    mirrored = ex.target[:, ::-1].copy()  # the new shape on the right half instead
    assert not check(ex, mirrored)["object"] and check(ex, ex.target)["object"]
    pat = make_example(3, kinds=("pattern",))
    flat = pat.target.copy()
    flat[pat.request.region] = COLORS[pat.request.color]  # the shape left plain
    assert check(pat, flat)["found"] == 1.0 and not check(pat, flat)["object"]
    with pytest.raises(ValueError, match="'recolor' is not a stochastic edit"):
        check(make_example(0, kinds=("recolor",)), pat.target)
    with pytest.raises(ValueError, match=r"output must be uint8 \(128, 128, 3\), got float32"):
        check(pat, pat.target.astype(np.float32))
