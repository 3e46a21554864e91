"""The notebooks are committed without outputs and run top to bottom on a throwaway toy editor (small n)."""

import contextlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from specedit.toy.recipe import train_toy

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("00_quickstart.ipynb", "10_ablations.ipynb", "20_baselines.ipynb")
MISSING = [
    m for m in ("nbclient", "nbformat", "ipykernel", "matplotlib") if importlib.util.find_spec(m) is None
]


@pytest.fixture(scope="session")
def toy_weights(tmp_path_factory):
    """A throwaway toy editor trained for a few steps (the same folder as tests/specedit/toy's)."""
    run = tmp_path_factory.getbasetemp() / "toy-throwaway"
    if not (run / "weights" / "config.json").is_file():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        with contextlib.ExitStack() as stack:
            stack.callback(torch.set_num_threads, before)
            train_toy(run, ae_steps=3, n_train=16, steps=3, batch=4)
    return run / "weights"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    nb = json.loads((ROOT / "notebooks" / name).read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{name}: clear the outputs"


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"running notebooks needs {MISSING}: pip install -e '.[notebooks]'")
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, toy_weights, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("SPECEDIT_TOY_WEIGHTS", str(toy_weights))
    monkeypatch.setenv("SPECEDIT_NB_N", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's torch threads: the toy model is small
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
