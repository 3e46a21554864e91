import pytest
import torch

# The test models are tiny: one intra-op thread per process is several times faster than two on this
# 2-core CI machine (thread hand-off dominates), and pytest-xdist (-n 2, pyproject) runs two processes.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
