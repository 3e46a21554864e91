"""The synthetic paired-edit generator: deterministic, exact masks, every edit kind, closed vocabulary."""

import numpy as np
import pytest

from specedit.toy.data import GLOBAL_EDITS, LOCAL_EDITS, make_example, render, vocabulary
from specedit.toy.model import toy_tokenizer


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
