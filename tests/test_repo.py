"""Repository invariants: CI runs the README's test command, and imports flow one way."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# which of our packages each package may import
ALLOWED = {
    "models": {"models"},
    "samplers": {"samplers", "models"},
    "verify": {"verify", "models"},
    "specedit": {"specedit", "models", "samplers", "verify"},
}


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    commands = _readme_commands()
    assert len(commands) >= 2, "README must open with two set-up commands"
    assert "pytest" in commands[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci_lines


def test_imports_flow_one_way():
    bad = []
    for package, allowed in ALLOWED.items():
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top in ALLOWED and top not in allowed:
                        bad.append(f"{path.relative_to(ROOT)} imports {name}")
                    if top in ("diffusers", "transformers"):
                        bad.append(f"{path.relative_to(ROOT)} imports the test-only reference {name}")
    assert not bad, bad


def test_no_print_in_library():
    offenders = []
    for package in ("models", "samplers", "verify"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                    offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
