"""Hostile inputs, one table: each case and the outcome it must keep (a one-line error before any heavy work,
exit code 2, no traceback). Library-level cases live next to their code and are listed in ``ELSEWHERE``."""

import pytest

from specedit.cli import main

# case -> (argv, the message on stderr)
CLI_CASES = {
    "flops --steps -5": ("flops --steps -5", "argument --steps: must be >= 1, got -5"),
    "flops --text-tokens 0 (was silently 512)": ("flops --text-tokens 0", "argument --text-tokens: must be >= 1, got 0"),
    "flops --height 100000": ("flops --height 100000", "argument --height: must be at most 8192 px, got 100000"),
    "flops --height 1000 (not a grid multiple)": ("flops --height 1000", "must be positive multiples of 16 px"),
    "bench --expand-fraction -0.5": ("bench --meta --expand-fraction -0.5", "must be a fraction in [0, 1], got -0.5"),
    "bench --repeats 0": ("bench --random-weights --repeats 0", "argument --repeats: must be >= 1, got 0"),
    "bench --device banana": ("bench --random-weights --device banana", "not a torch device: 'banana'"),
    "bench unknown method": ("bench --meta --methods nope", "unknown methods ['nope']"),
    "bench --model nope": ("bench --meta --model nope", "argument --model: invalid choice: 'nope'"),
    "edit --steps 0 (was silently 28)": ("edit --image {img} --prompt p --out {out} --steps 0", "argument --steps: must be >= 1"),
    "edit --seed 2**70": ("edit --image {img} --prompt p --out {out} --seed 1180591620717411303424", "must be in [0, 2**64 - 1]"),
    "edit --area 0": ("edit --model qwen-image-edit --image {img} --prompt p --out {out} --area 0", "argument --area: must be >= 1, got 0"),
    "edit missing image": ("edit --image {tmp}/none.png --prompt p --out {out}", "no such file: "),
    "edit a text file named .png, before loading": ("edit --image {txt} --prompt p --out {out} --weights {tmp}", "is not a readable image"),
    "edit --out equal to --image": ("edit --image {img} --prompt p --out {img} --weights {tmp}", "is the input file"),
    "edit --out exists": ("edit --image {img} --prompt p --out {old} --weights {tmp}", "exists: pass --overwrite"),
    "edit --save-mask equal to --out": ("edit --image {img} --prompt p --out {out} --save-mask {out} --weights {tmp}",
                                        "is the --out file"),
    "edit unknown method before loading": ("edit --image {img} --prompt p --out {out} --method nope --weights {tmp}",
                                           "unknown method 'nope' for family 'kontext'"),
    "edit distilled method without a LoRA": ("edit --image {img} --prompt p --out {out} --method distilled-8",
                                             "--method distilled-8 expects step-distilled weights: add --lora"),
    "edit --lora missing file": ("edit --image {img} --prompt p --out {out} --lora {tmp}/none.safetensors:0.5",
                                 "none.safetensors: no such LoRA file"),
    "edit --lora not safetensors": ("edit --image {img} --prompt p --out {out} --lora {txt}",
                                    "a LoRA must be a .safetensors file"),
    "edit --lora scale not finite": ("edit --image {img} --prompt p --out {out} --lora x.safetensors:nan",
                                     "LoRA scale must be finite, got 'nan'"),
    "edit --distilled without --lora": ("edit --image {img} --prompt p --out {out} --distilled",
                                        "--distilled says the --lora files are step-distilled, but no --lora"),
    "edit --transformer-offload 0": ("edit --image {img} --prompt p --out {out} --transformer-offload 0",
                                     "argument --transformer-offload: must be >= 1, got 0"),
    "edit unknown --schedule": ("edit --image {img} --prompt p --out {out} --schedule turbo",
                                "argument --schedule: unknown schedule 'turbo': choose from flux, qwen, lightning"),
}  # fmt: skip
ELSEWHERE = {
    "NaN/inf image tensors": "tests/models/test_imageio.py (check_finite)",
    "NaN text states / guidance, bf16 inputs to an fp32 model": "tests/specedit/kontext/test_kontext_editor.py",
    "NaN in the source latent; NaN during sampling (stage and step named)": "tests/specedit/test_conformance.py",
    "train-toy counts/paths/--overwrite, kills and resume; eval resume; demo stale panels": "tests/specedit/toy/",
    "EXIF orientation, 16-bit and float images, RGBA": "tests/models/test_imageio.py",
    "text file named .png, truncated PNG": "tests/models/test_imageio.py",
    "aliasing / reversed / out-of-range offsets, byte length, int32 for float": "tests/models/test_loading.py",
    "broken config.json (file and position)": "tests/models/test_loading.py",
    "verifier tau 5, -1, NaN; bad sampler options": "tests/test_hardening.py::test_bad_part_fields, "
    "tests/samplers/test_mixed_res.py",
    "LoRA files: unmatched keys, shapes, other family, DoRA/LoHa, corrupt": "tests/models/test_lora.py",
    "distilled method on base weights; LoRA not .safetensors, missing, NaN scale": "tests/specedit/qwen/"
    "test_qwen_lightning.py",
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_case(case, tmp_path, capsys):
    from PIL import Image

    img, old, txt = tmp_path / "in.png", tmp_path / "old.png", tmp_path / "notes.png"
    txt.write_text("not an image")
    Image.new("RGB", (64, 64)).save(img)
    Image.new("RGB", (64, 64)).save(old)
    argv, message = CLI_CASES[case]
    argv = argv.format(img=img, out=tmp_path / "out.png", old=old, tmp=tmp_path, txt=txt)
    assert main(argv.split()) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "build,message",
    [
        ("FeatureVerifier(tau=5.0)", r"tau must lie in \[0, 4\] for score_norm 'none', got 5.0"),
        ("FeatureVerifier(tau=-1.0)", r"tau must lie in \[0, 4\]"),
        ("FeatureVerifier(tau=float('nan'))", r"tau must lie in \[0, 4\] for score_norm 'none', got nan"),
        ("FeatureVerifier(tau=0.9, score_norm='minmax', budget=1.5)", r"budget must be a fraction in \[0, 1\], got 1.5"),
        ("FeatureVerifier(pool='median')", r"FeatureVerifier.pool must be one of \('mean', 'max'\), got 'median'"),
        ("CannyVerifier(up_ratio=2)", r"CannyVerifier.up_ratio must be a fraction in \[0, 1\], got 2"),
        ("VarianceVerifier(stat='range')", r"VarianceVerifier.stat must be one of"),
        ("LowResDrafter(steps=0)", "a draft needs factor >= 1 and at least one step, got 4, 0"),
    ],
)  # fmt: skip
def test_bad_part_fields(build, message):
    """Parts validate their fields when built, so a bad ablation fails before any run."""
    from specedit.drafters import LowResDrafter  # noqa: F401
    from verify.verifiers import CannyVerifier, FeatureVerifier, VarianceVerifier  # noqa: F401

    with pytest.raises(ValueError, match=message):
        eval(build)


def test_seed_out_of_range_in_the_api():
    from specedit.kontext.family import tiny_editor
    from specedit.presets import get

    with pytest.raises(
        ValueError, match=r"seed must be an integer in \[0, 2\*\*64 - 1\], got 1180591620717411303424"
    ):
        get("steps-9", "kontext").run(tiny_editor(), seed=2**70)
