"""The README's main job: ``specedit demo`` with the weights that ship in the package."""

import json

import pytest

from specedit.cli import main
from specedit.toy.model import WEIGHTS


@pytest.mark.skipif(not (WEIGHTS / "config.json").is_file(), reason="no shipped toy weights in this checkout")
def test_demo_with_shipped_weights(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["method"]: r for r in report["methods"]}
    assert set(rows) == {"baseline-50", "specedit-18", "specedit-9"}
    assert rows["specedit-18"]["nfe"] == 18 and rows["specedit-18"]["flops_speedup"] > 1
    assert len(list(tmp_path.glob("panel_*.png"))) == len(report["examples"]) >= 3
    assert "specedit-18" in capsys.readouterr().out
