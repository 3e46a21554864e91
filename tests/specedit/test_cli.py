"""`specedit flops` prints one JSON object with the issue's figures."""

import json

import pytest

from specedit.cli import main


def test_flops_paper_setting(capsys):
    args = "flops --model flux-kontext-dev --height 1024 --width 1024 --ref-height 1024 --ref-width 1024"
    assert main([*args.split(), "--text-tokens", "512", "--steps", "50"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tflops_per_forward"] == pytest.approx(165.46, rel=5e-3)
    assert out["tflops_per_forward"] == out["tflops_per_forward_analytic"]
    assert out["tflops_total"] == pytest.approx(8299.54, rel=1e-2)
    assert abs(out["vs_paper_pct"]) < 1.0
    assert out["tokens"] == {"target": 4096, "reference": 4096, "text": 512}


def test_flops_other_sizes_scale(capsys):
    main(["flops", "--height", "512", "--width", "768", "--steps", "10", "--analytic"])
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"]["target"] == 32 * 48 and "paper_tflops_total" not in out
    assert out["tflops_per_forward"] < 165


def test_flops_bad_size(capsys):
    assert main(["flops", "--height", "1000"]) == 2
    assert "multiples of 16" in capsys.readouterr().err


def test_bench_memory_modes_on_a_tiny_config(capsys):
    """--fp8 and --transformer-offload apply to the random-weight transformer and are reported per row."""
    import json

    from specedit.cli import main

    args = "bench --config tiny --random-weights --height 128 --width 128 --methods specedit-18 --warmup 0 --repeats 1"
    assert main([*args.split(), "--fp8", "--transformer-offload", "2", "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["fp8"] is True and row["transformer_offload"] == 2 and row["latency_s"] > 0
