"""Feature caching: the invariants (interval 1 is the uncached sampler bit for bit, order-0 TaylorSeer is
FORA, no cache outlives its stage, edit or batch item), the papers' schedules, the forecasts' arithmetic,
CFG call slots, costs and bad settings."""

from dataclasses import replace

import pytest
import torch

from models.work import EditShape, Forecast, Forward
from samplers.caching import FORA, FoCa, FreqCa, StageCache, TaylorSeer
from samplers.mixed_res import FullResSampler
from specedit.kontext.family import tiny_editor
from specedit.method import Baseline
from specedit.presets import methods
from specedit.qwen.family import tiny_editor as qwen_tiny_editor

POLICIES = [FORA(interval=4), TaylorSeer(interval=4), TaylorSeer(interval=3, order=2), FreqCa(interval=4),
            FoCa(interval=3)]  # fmt: skip


def _run(policy, editor, steps=12, seed=3):
    return Baseline(FullResSampler(steps, cache=policy)).run(editor, seed)


@pytest.mark.parametrize("policy", [replace(p, interval=1) for p in POLICIES], ids=str)
def test_interval_one_is_the_uncached_sampler_bit_for_bit(policy):
    ed = tiny_editor()
    assert torch.equal(_run(policy, ed).latent, _run(None, ed).latent)
    s18 = methods("kontext")["specedit-18"]
    cached = replace(s18, sampler=replace(s18.sampler, cache=policy))
    assert torch.equal(cached.run(ed, 5).latent, s18.run(ed, 5).latent)


def test_order_zero_taylorseer_is_fora():
    ed = tiny_editor()
    fora, t0 = _run(FORA(interval=3), ed), _run(TaylorSeer(interval=3, order=0, warmup=1), ed)
    assert torch.equal(fora.latent, t0.latent) and fora.events == t0.events
    assert not torch.equal(fora.latent, _run(None, ed).latent)  # the cache did skip computation


def test_schedules_of_the_papers():
    """FORA computes every N-th step from the first; TaylorSeer and FreqCa 3 warm-up steps, then every N-th
    (their code's first_enhance 3: steps 0, 1, 2, 8, 14, ... for N = 6)."""
    on = lambda p, n=50: [i for i, c in enumerate(p.schedule(n)) if c]  # noqa: E731
    assert on(FORA(interval=5)) == list(range(0, 50, 5))
    assert on(TaylorSeer(interval=6)) == [0, 1, 2, 8, 14, 20, 26, 32, 38, 44]
    assert len(on(TaylorSeer(interval=9))) == len(on(FreqCa(interval=9))) == 8
    assert len(on(FORA(interval=7))) == 8


def test_forecasts_arithmetic():
    """Order >= 1 continues a linear trend exactly; FORA repeats; FreqCa keeps a constant feature."""
    a, b = torch.randn(1, 6, 4), torch.randn(1, 6, 4)
    feats = lambda i: (a + b * i, 2 * a)  # noqa: E731
    for policy in (TaylorSeer(interval=4, order=1), TaylorSeer(interval=4, order=2)):
        mem, got = None, {}
        for i in range(12):
            got[i], mem = policy.step(mem, i, 12, lambda i=i: feats(i))
        assert all(torch.allclose(got[i][0], feats(i)[0], atol=1e-5) for i in range(12))
    mem, _ = FORA(interval=4).step(None, 0, 8, lambda: feats(0))
    assert FORA(interval=4).step(mem, 1, 8, lambda: pytest.fail("computed"))[0] is mem
    const = (a, b)
    mem = None
    for i in range(6):
        out, mem = FreqCa(interval=3, warmup=1).step(mem, i, 6, lambda: const)
        assert torch.allclose(out[0], a, atol=1e-5)


def test_no_cache_outlives_a_stage_an_edit_or_a_batch_item():
    ed = tiny_editor()
    policy = TaylorSeer(interval=3)
    first = _run(policy, ed, seed=1)
    assert ed.model.stack_hook is None  # the hook is removed after the stage
    other = _run(policy, ed, seed=2)
    assert torch.equal(_run(policy, ed, seed=1).latent, first.latent)  # a rerun does not see the other seed
    assert not torch.equal(other.latent, first.latent)
    # batch items: one batch of 2 equals the two batch-1 edits
    pair = tiny_editor(batch=2)
    both = _run(policy, pair, seed=1)
    single = _run(policy, tiny_editor(batch=1), seed=1)
    assert torch.allclose(both.latent[:1], single.latent, atol=1e-5, rtol=1e-5)

    # an error inside a cached stage still removes the hook
    class Boom(TaylorSeer):
        def step(self, memory, i, n, run):
            if i == 5:
                raise RuntimeError("boom at step 5")
            return super().step(memory, i, n, run)

    with pytest.raises(RuntimeError, match="boom at step 5"):
        _run(Boom(interval=3), ed)
    assert ed.model.stack_hook is None


def test_cfg_branches_keep_their_own_cache():
    """Two forwards per step (CFG branches run one after the other) keep one memory per call slot, so the result
    matches the batched-CFG forward (one slot)."""
    ed = qwen_tiny_editor()
    policy = TaylorSeer(interval=3)
    batched = _run(policy, ed, steps=9)
    sequential = _run(policy, replace(ed, batched_cfg=False), steps=9)
    assert torch.allclose(batched.latent, sequential.latent, atol=1e-4, rtol=1e-4)


def test_cached_steps_are_priced_and_counted():
    ed = tiny_editor()
    out = _run(TaylorSeer(interval=4, order=2), ed)
    kinds = [type(e) for e in out.events]
    assert kinds.count(Forward) == 5 and kinds.count(Forecast) == 7 and out.nfe == 12
    fc = next(e for e in out.events if isinstance(e, Forecast))
    assert fc.terms == 3 and ed.cost(fc) == 2 * 3 * ed.costs.stream_elements(fc) > 0
    assert ed.cost(fc) < 0.01 * ed.cost(out.events[0])
    plan = Baseline(FullResSampler(12, cache=TaylorSeer(interval=4, order=2))).plan(EditShape.of(ed))
    assert plan.events == out.events


def test_bad_settings_and_editors():
    with pytest.raises(ValueError, match=r"^FORA.interval must be an integer >= 1, got 0$"):
        FORA(interval=0)
    with pytest.raises(ValueError, match=r"^TaylorSeer.warmup must be an integer >= 1, got 0$"):
        TaylorSeer(interval=3, warmup=0)
    with pytest.raises(ValueError, match=r"^TaylorSeer.order must be an integer in 0..4, got 7$"):
        TaylorSeer(interval=3, order=7)
    with pytest.raises(ValueError, match=r"^FreqCa needs order in 0..4 and cutoff in \(0, 1\), got 2, 1.5$"):
        FreqCa(interval=3, cutoff=1.5)
    with pytest.raises(ValueError, match="cache_stages must name coarse, mixed or full stages"):
        replace(methods("kontext")["specedit-18"].sampler, cache_stages=("draft",))

    class NoHook:
        model = torch.nn.Linear(2, 2)

    ed = tiny_editor()
    stranger = replace(ed, model=ed.model)
    object.__setattr__(stranger, "model", NoHook.model)
    with pytest.raises(ValueError, match="KontextEditor.model has no stack_hook"):
        _run(TaylorSeer(interval=2), stranger)


def test_stage_cache_bytes():
    cache = StageCache(TaylorSeer(interval=3, order=2), 10)
    feats = (torch.zeros(1, 5, 4), torch.zeros(1, 2, 4))
    assert cache.bytes_held(feats) == 3 * (20 + 8) * 4
