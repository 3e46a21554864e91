"""Presets: NT-DM refits, the paper's FLOPs speedups (meta, 25 % expanded), bench CLI."""

import json

import pytest

from samplers.ntdm import fit_ntdm, objective
from specedit.bench import meta_rows
from specedit.cli import main
from specedit.presets import FITTED, FREE_FIT, H_ORI, RALU, SPLITS, Z_FLOOR, methods

PAPER_FLUX_SPEEDUP = {"specedit-30": 3.31, "specedit-18": 5.38, "specedit-11": 6.92, "specedit-9": 7.37}


def test_ntdm_refits_ralu_4x():
    steps, ends, shifts, z, _ = RALU["4x"]
    got_shifts, got_z, jsd = fit_ntdm(steps, ends, 3.0)
    assert got_shifts == pytest.approx(shifts, rel=2e-3) and got_z == pytest.approx(z, rel=5e-3)
    assert jsd == pytest.approx(0.01746, abs=1e-4)  # RALU's (scipy L-BFGS-B) optimum


def test_ntdm_at_least_as_good_as_ralu_7x():
    import torch

    steps, ends, shifts, z, _ = RALU["7x"]
    ralu_jsd = float(objective(list(steps), list(ends), torch.tensor(shifts, dtype=torch.float64),
                               torch.tensor(z, dtype=torch.float64), 3.0))  # fmt: skip
    assert fit_ntdm(steps, ends, 3.0)[2] <= ralu_jsd + 1e-5


@pytest.mark.parametrize("family,nfe", [("flux", 18), ("flux", 9), ("qwen", 18), ("toy", 18), ("toy", 11)])
def test_preset_values_are_the_fits(family, nfe):
    steps, ends = SPLITS[nfe]
    shifts, z, _ = fit_ntdm(steps, ends, H_ORI[family], z_bounds=(Z_FLOOR[family], 100.0))
    assert shifts == pytest.approx(FITTED[(family, nfe)][0], abs=2e-3)
    assert z == pytest.approx(FITTED[(family, nfe)][1], abs=2e-3)


def test_free_fit_ablation_is_the_unfloored_fit():
    steps, ends = SPLITS[18]
    shifts, z, _ = fit_ntdm(steps, ends, H_ORI["toy"], z_bounds=(1.0, 100.0))
    assert shifts == pytest.approx(FREE_FIT[("toy", 18)][0], abs=2e-3)
    assert z == pytest.approx(FREE_FIT[("toy", 18)][1], abs=2e-3) and z < Z_FLOOR["toy"]
    ablation = methods("toy")["specedit-18-z1"].sampler
    assert (ablation.shifts, ablation.z) == FREE_FIT[("toy", 18)]
    assert "specedit-18-z1" not in methods("flux")


def test_meta_flops_speedups_match_the_paper():
    rows = meta_rows(list(PAPER_FLUX_SPEEDUP), height=1024, width=1024, expand_fraction=0.25)
    for r in rows:
        assert r["flops_speedup"] == pytest.approx(PAPER_FLUX_SPEEDUP[r["method"]], rel=0.10), r
        assert r["expanded_fraction"] == 0.25
    assert [r["nfe"] for r in rows] == [30, 18, 11, 9]


def test_bench_cli_json(capsys):
    assert main(["bench", "--meta", "--methods", "baseline-50,specedit-18,ralu-4x", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    keys = {"method", "nfe", "tflops", "flops_speedup", "latency_s", "latency_speedup", "expanded_fraction"}
    assert all(keys <= set(r) for r in rows) and rows[0]["flops_speedup"] == 1.0
    assert main(["bench", "--meta", "--methods", "nope"]) == 2


def test_bench_latency_runs_on_a_tiny_config(capsys):
    args = "bench --config tiny --random-weights --height 128 --width 128 --methods specedit-18 --warmup 0 --repeats 1"
    assert main([*args.split(), "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["nfe"] == 18 and row["latency_s"] > 0 and row["expanded_fraction"] == 0.25
    assert row["forward_s"] + row["vae_s"] + row["overhead_s"] == pytest.approx(row["latency_s"], rel=0.2)


def test_every_named_method_exists_for_both_families():
    assert set(methods("flux")) == set(methods("qwen"))


def test_qwen_meta_speedups_near_the_paper_at_its_setting():
    """At the paper's apparent Qwen setting (about 1328^2 output, 1024^2 reference, ~1.4k text tokens with CFG)
    the 30/18/11-NFE FLOPs speedups land within 10 % of the paper's 3.27/5.40/7.07."""
    names = ["specedit-30", "specedit-18", "specedit-11"]
    rows = meta_rows(
        names, height=1344, width=1344, expand_fraction=0.25, family="qwen", ref_size=(1024, 1024)
    )
    for r, paper in zip(rows, (3.27, 5.40, 7.07)):
        assert r["flops_speedup"] == pytest.approx(paper, rel=0.10), r


def test_toy_family_uses_its_calibration():
    from specedit.presets import TOY_DRAFTER, TOY_VERIFIER

    table = methods("toy")
    for name in ("specedit-30", "specedit-18", "specedit-11", "specedit-9"):
        assert table[name].drafter == TOY_DRAFTER and table[name].verifier == TOY_VERIFIER, name
    assert table["specedit-18-tau0.4"].verifier.reference == "roundtrip"
    assert (
        table["specedit-18-draft4"].drafter.factor == 4 and methods("flux")["specedit-18"].drafter.factor == 4
    )
