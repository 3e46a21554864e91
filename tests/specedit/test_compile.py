"""torch.compile of the DiTs (models.compile): no graph break in the FLUX and Qwen-Image forwards, one graph for
every token count, no recompile across edits after warm-up, feature caches eager. CPU tests use dynamo's
"eager" backend (no C++ code generation): what is counted, graphs and guards, is the backend's business-free."""

from dataclasses import replace

import pytest
import torch

from models.compile import (
    CompileOptions,
    compile_count,
    compile_transformer,
    graph_breaks,
    is_compiled,
    uncompile,
)
from models.flux import FLUX_TINY, Flux
from models.hooks import stack_hook
from models.init import randomized_module
from models.qwen_image import QWEN_IMAGE_TINY, QWEN_IMAGE_TINY_2511, QwenImage
from verify.verifiers import STATIC_BUCKETS


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _ids(h, w, frame=0.0):
    grid = torch.meshgrid(
        torch.full((1,), frame), torch.arange(float(h)), torch.arange(float(w)), indexing="ij"
    )
    return torch.stack(grid, -1).reshape(-1, 3)


def _flux(h=4, w=6, l=5):
    g = torch.Generator().manual_seed(h * w)
    r = lambda *s: torch.randn(s, generator=g)  # noqa: E731
    model = randomized_module(lambda: Flux(FLUX_TINY), seed=1)
    args = (r(1, h * w, 16), _ids(h, w), r(1, l, 24), torch.zeros(l, 3), torch.tensor([0.7]), r(1, 20))
    return model, args, {"guidance": torch.tensor([2.5])}


def _qwen(h=4, w=6, l=9, cfg=QWEN_IMAGE_TINY):
    g = torch.Generator().manual_seed(h * w)
    r = lambda *s: torch.randn(s, generator=g)  # noqa: E731
    model = randomized_module(lambda: QwenImage(cfg), seed=2)
    ids = torch.cat([_ids(h, w), _ids(2, 2, frame=1.0)])  # target, then a reference (frame 1)
    mask = torch.ones(2, l, dtype=torch.long)
    mask[0, -2:] = 0
    txt_ids = (3 + torch.arange(float(l)))[:, None].expand(-1, 3)
    return (
        model,
        (r(2, h * w + 4, 16), ids, r(2, l, 24), txt_ids, torch.tensor([0.3, 0.6])),
        {"txt_mask": mask},
    )


MODELS = {"flux": _flux, "qwen": _qwen, "qwen-2511": lambda **kw: _qwen(cfg=QWEN_IMAGE_TINY_2511, **kw)}


@pytest.mark.parametrize("name", MODELS)
def test_forward_has_no_graph_break(name):
    model, args, kwargs = MODELS[name]()
    with torch.no_grad():
        assert graph_breaks(model, *args, **kwargs) == 0


@pytest.mark.parametrize("name", MODELS)
def test_one_graph_for_every_token_count(name):
    """fullgraph compile equals eager; new image and text lengths reuse the first graph (dynamic tokens)."""
    model, args, kwargs = MODELS[name]()
    with torch.no_grad():
        ref = model(*args, **kwargs)
        compile_transformer(model, backend="eager")
        before = compile_count()
        torch.testing.assert_close(model(*args, **kwargs), ref, rtol=0, atol=0)
        assert compile_count() - before == 1
        for h, w, l in ((8, 6, 9), (2, 4, 12), (6, 6, 7)):
            _, args2, kwargs2 = MODELS[name](h=h, w=w, l=l)
            assert model(*args2, **kwargs2).shape[1] == args2[0].shape[1]
    assert compile_count() - before == 1


def test_static_shapes_compile_once_per_token_count():
    model, args, kwargs = _flux()
    compile_transformer(model, backend="eager", dynamic_tokens=False)
    before = compile_count()
    with torch.no_grad():
        for h, w in ((4, 6), (2, 2), (4, 6), (2, 2)):
            _, args2, kwargs2 = _flux(h, w)
            model(*args2, **kwargs2)
    assert compile_count() - before == 2


def test_feature_cache_runs_eager():
    """With a stack hook set (a feature cache) the compiled model runs its eager forward: the hook is called,
    nothing is compiled; without it the compiled graph serves again."""
    model, args, kwargs = _flux()
    with torch.no_grad():
        compile_transformer(model, backend="eager")
        ref = model(*args, **kwargs)
        before, calls = compile_count(), []

        def hook(run, img, txt):
            calls.append(img.shape)
            return run(img, txt)

        with stack_hook(model, hook):
            torch.testing.assert_close(model(*args, **kwargs), ref, rtol=0, atol=0)
        assert len(calls) == 1 and compile_count() == before
        model(*args, **kwargs)
    assert compile_count() == before


def test_options_and_errors():
    model, _, _ = _flux()
    with pytest.raises(ValueError, match="compile mode 'fast' is unknown; choose from None, default"):
        CompileOptions(mode="fast")
    with pytest.raises(ValueError, match="compile mode 'reduce-overhead' needs the inductor backend"):
        CompileOptions(mode="reduce-overhead", backend="eager")
    with pytest.raises(ValueError, match="compile backend 'tensorrtx' is unknown"):
        compile_transformer(model, backend="tensorrtx")
    compile_transformer(model, CompileOptions(backend="eager"))
    with pytest.raises(ValueError, match="Flux is compiled already"):
        compile_transformer(model, backend="eager")
    offloaded, _, _ = _flux()
    offloaded.block_offload = object()  # what models.offload.offload_blocks leaves
    with pytest.raises(ValueError, match="Flux streams its blocks .* compile a resident transformer"):
        compile_transformer(offloaded, backend="eager")
    keys = set(model.state_dict())
    assert is_compiled(model) and not is_compiled(uncompile(model)) and set(model.state_dict()) == keys


@pytest.mark.slow
def test_no_recompiles_after_warmup_across_seeds_and_buckets():
    """Acceptance: a tiny Kontext edit with static token budgets (specedit-9-static, FeatureVerifier(buckets=
    STATIC_BUCKETS)); after one warm-up edit, three edits with other seeds and other verifier outcomes compile
    nothing and match the eager edits."""
    from specedit.kontext.family import FAMILY, tiny_editor
    from specedit.presets import methods

    static = methods(FAMILY)["specedit-9-static"]
    method = replace(static, verifier=replace(static.verifier, tau=1.85))  # random weights: scores ~1.2-2.2
    editor = tiny_editor()
    with torch.no_grad():
        eager = {seed: method.run(editor, seed) for seed in (1, 2, 3)}
        compile_transformer(editor.model, backend="eager")
        method.run(editor, 0)  # warm-up
        after = compile_count()
        runs = {seed: method.run(editor, seed) for seed in (1, 2, 3)}
    assert compile_count() - after == 0
    fractions = [r.verdict.fraction for r in runs.values()]
    assert set(fractions) <= set(STATIC_BUCKETS) and len(set(fractions)) > 1, fractions
    for seed, r in runs.items():
        torch.testing.assert_close(r.latent, eager[seed].latent, rtol=1e-4, atol=1e-4)


def test_cli_flag_errors(capsys):
    from specedit.cli import main

    bench = ["bench", "--model", "kontext", "--config", "tiny", "--random-weights"]
    assert main([*bench, "--compile", "fast"]) == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err
    assert main([*bench, "--attention", "flash2"]) == 2
    assert "attention backend 'flash2' is unknown" in capsys.readouterr().err
    assert main([*bench, "--compile", "--compile-backend", "nope"]) == 2
    assert "compile backend 'nope' is unknown to torch._dynamo" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_cli_reports_zero_recompiles(capsys):
    """``specedit bench --config tiny --random-weights --compile --json`` reports recompiles (0 after the
    warm-up) and the attention backend that ran."""
    import json

    from specedit.cli import main

    args = ["bench", "--model", "kontext", "--config", "tiny", "--random-weights", "--compile", "--compile-backend",
            "eager", "--attention", "math", "--methods", "specedit-9-static", "--height", "64", "--width", "64",
            "--repeats", "1", "--json"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["method"], r["recompiles"], r["attention"], r["compile"]) for r in rows] == [
        ("specedit-9-static", 0, "math", "default")
    ]


@pytest.mark.slow
def test_pipeline_compile_and_attention(tmp_path, capsys):
    """``EditPipeline.compile`` / ``use_attention`` (and ``specedit edit --compile --attention``): the first
    edit compiles, edits with other seeds compile nothing, the output matches the eager pipeline's."""
    import json

    import numpy as np
    from PIL import Image
    from refs_kontext import write_tiny_kontext_repo

    from specedit.cli import main
    from specedit.kontext.pipeline import KontextPipeline

    repo = write_tiny_kontext_repo(tmp_path / "FLUX.1-Kontext-dev")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    kw = dict(method="baseline", steps=2, height=64, width=64, output="latent")
    eager = KontextPipeline.from_pretrained(repo, dtype=torch.float32)
    ref = eager.edit(image, "x", seed=2, **kw).latent
    pipe = (
        KontextPipeline.from_pretrained(repo, dtype=torch.float32)
        .use_attention("math")
        .compile(backend="eager")
    )
    pipe.edit(image, "x", seed=0, **kw)
    before = compile_count()
    out = [pipe.edit(image, "x", seed=s, **kw).latent for s in (1, 2)][-1]
    assert compile_count() == before
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="attention backend 'fa4' is unknown"):
        pipe.use_attention("fa4")
    image.save(tmp_path / "in.png")
    args = ["edit", "--weights", str(repo), "--image", str(tmp_path / "in.png"), "--prompt", "x", "--out",
            str(tmp_path / "out.png"), "--steps", "2", "--dtype", "fp32", "--device", "cpu", "--quiet",
            "--height", "64", "--width", "64", "--compile", "--compile-backend", "eager",
            "--attention", "flash"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["attention"], summary["compile"]) == ("flash", "default")
