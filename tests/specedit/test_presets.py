"""Presets: NT-DM refits, the paper's FLOPs speedups (meta, 25 % expanded), bench CLI."""

import json

import pytest

from samplers.ntdm import fit_ntdm, objective
from specedit.bench import meta_rows
from specedit.cli import main
from specedit.families import families, get_family
from specedit.presets import RALU, SPLITS, get, methods

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


@pytest.mark.parametrize("family,nfe", [(f, n) for f in ("kontext", "qwen", "toy") for n in SPLITS])
def test_preset_values_are_the_fits(family, nfe):
    """The 1000-point grid makes the objective piecewise smooth, so a refit on another CPU (other rounding)
    may stop in a neighbouring kink (Qwen's 11-step split moves its second shift by 0.06), and the presets'
    three decimals cost up to 2e-4 in JS distance: the presets must be as good as the refit, and close to it."""
    import torch

    fam = get_family(family)
    steps, ends = SPLITS[nfe]
    shifts, z, jsd = fit_ntdm(steps, ends, fam.h_ori, z_bounds=(fam.z_floor, 100.0))
    preset_shifts, preset_z = fam.fitted[nfe]
    preset_jsd = float(objective(list(steps), list(ends), torch.tensor(preset_shifts, dtype=torch.float64),
                                 torch.tensor(preset_z, dtype=torch.float64), fam.h_ori))  # fmt: skip
    assert preset_jsd <= jsd + 3e-4
    assert shifts == pytest.approx(preset_shifts, abs=0.1) and z == pytest.approx(preset_z, rel=0.05)


def test_free_fit_ablation_is_the_unfloored_fit():
    toy = get_family("toy")
    shifts, z, _ = fit_ntdm(*SPLITS[18], toy.h_ori, z_bounds=(1.0, 100.0))
    assert shifts == pytest.approx(toy.free_fit[18][0], abs=2e-3)
    assert z == pytest.approx(toy.free_fit[18][1], abs=2e-3) and z < toy.z_floor
    ablation = methods("toy")["specedit-18-z1"].sampler
    assert (ablation.shifts, ablation.z) == toy.free_fit[18]
    assert "specedit-18-z1" not in methods("kontext")


def test_no_silent_default_family():
    with pytest.raises(TypeError):
        methods()
    with pytest.raises(ValueError, match="unknown method 'nope' for family 'qwen'; choose from baseline-50"):
        get("nope", "qwen")
    assert get("specedit-18", "flux-kontext-dev") == methods("kontext")["specedit-18"]


def test_meta_flops_speedups_match_the_paper():
    rows = meta_rows(
        list(PAPER_FLUX_SPEEDUP), family="kontext", height=1024, width=1024, expand_fraction=0.25
    )
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


def test_every_named_method_exists_for_every_built_in_family():
    """The same methods everywhere, except the step-distilled ones, whose NFE follow each family's students."""
    plain = lambda family: {n for n in methods(family) if "distill" not in n}  # noqa: E731
    names = plain("kontext")
    assert plain("qwen") == names and names <= plain("toy")
    assert {n for n in methods("kontext") if "distill" in n} == {
        "distilled-8",
        "distilled-6",
        "specedit-distill-8",
        "specedit-distill-6",
    }
    assert {n for n in methods("qwen") if "distill" in n} == {
        "distilled-8",
        "distilled-4",
        "specedit-distill-8",
        "specedit-distill-4",
    }
    assert {f for f in families() if f in ("kontext", "qwen", "toy")} == {"kontext", "qwen", "toy"}


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
    from specedit.toy.family import TOY_DRAFTER, TOY_VERIFIER

    table = methods("toy")
    for name in ("specedit-30", "specedit-18", "specedit-11", "specedit-9"):
        assert table[name].drafter == TOY_DRAFTER and table[name].verifier == TOY_VERIFIER, name
    assert table["specedit-18-tau0.4"].verifier.reference == "roundtrip"
    assert (
        table["specedit-18-draft4"].drafter.factor == 4
        and methods("kontext")["specedit-18"].drafter.factor == 4
    )


# the paper's Table 7 (FLUX.1-Kontext-dev, against its 50-step base model)
PAPER_DISTILL_SPEEDUP = {"distilled-8": 6.25, "distilled-6": 8.33, "specedit-distill-8": 9.68,
                         "specedit-distill-6": 13.03}  # fmt: skip


def test_distilled_flops_speedups_match_the_paper():
    rows = meta_rows(
        list(PAPER_DISTILL_SPEEDUP), family="kontext", height=1024, width=1024, expand_fraction=0.25
    )
    for r in rows:
        assert r["flops_speedup"] == pytest.approx(PAPER_DISTILL_SPEEDUP[r["method"]], rel=0.10), r
    assert [r["nfe"] for r in rows] == [8, 6, 8, 6]


def test_distilled_qwen_runs_without_cfg_in_its_costs():
    """Lightning runs the conditional branch only, so its 8 steps cost 8 / (2 * 50) of the CFG baseline."""
    (row,) = meta_rows(["distilled-8"], family="qwen", height=1024, width=1024, expand_fraction=0.25)
    assert row["flops_speedup"] == pytest.approx(12.5, rel=1e-6)
    fam = get_family("qwen")
    assert not fam.cfg_for(methods(fam)["specedit-distill-4"]) and fam.cfg_for(methods(fam)["specedit-18"])
    assert fam.distilled.match("Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors") == 4
    assert fam.distilled.match("my_style_lora.safetensors") is None


@pytest.mark.parametrize("family,nfe", [("qwen", 8), ("qwen", 4), ("kontext", 8), ("kontext", 6)])
def test_distill_stages_visit_the_students_sigmas(family, nfe):
    """specedit-distill-N's stages, joined, are the distilled N-step schedule at the fit size; no rewind."""
    import torch

    from samplers.schedules import flow_sigmas

    fam = get_family(family)
    method = methods(fam)[f"specedit-distill-{nfe}"]
    schedule = fam.distilled.schedule or fam.schedule
    stages = method.sampler.stage_sigmas(fam.fit_tokens, schedule)
    joined = torch.cat([stages[0], *(s[1:] for s in stages[1:])])
    assert torch.allclose(joined, flow_sigmas(nfe, fam.fit_tokens, schedule), atol=1e-6)
    assert method.sampler.z == 1.0 and method.weights == "distilled"  # no rewind: the student's own sigmas
    assert methods("toy")[f"specedit-distill-{nfe}"].sampler.z == get_family("toy").z_floor == 12.0
    assert (
        method.drafter.steps == fam.distilled.steps[nfe] and method.drafter.schedule is fam.distilled.schedule
    )
    base = methods(fam)[f"distilled-{nfe}"]
    assert base.sampler.steps == nfe and base.sampler.schedule is fam.distilled.schedule


# the paper's caching rows (Tables 1-3 and 7): FLOPs speedups against each 50-step base model
PAPER_CACHE_SPEEDUP = {
    "kontext": {"taylorseer-6": 5.00, "taylorseer-9": 6.24, "specedit-30-taylorseer": 6.70},
    "qwen": {"fora-5": 5.00, "taylorseer-6": 5.00, "taylorseer-9": 6.25, "freqca-9": 6.25},
}


@pytest.mark.parametrize("family", list(PAPER_CACHE_SPEEDUP))
def test_caching_flops_speedups_match_the_paper(family):
    paper = PAPER_CACHE_SPEEDUP[family]
    rows = meta_rows(list(paper), family=family, height=1024, width=1024, expand_fraction=0.25)
    for r in rows:
        assert r["flops_speedup"] == pytest.approx(paper[r["method"]], rel=0.10), r
        assert r["nfe"] == (30 if r["method"].startswith("specedit") else 50) and r["cache_mib"] > 0
