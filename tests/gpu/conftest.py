"""GPU tests: marked ``gpu`` and skipped without CUDA (``bash run.sh test -m gpu`` runs just them; CI has no
GPU and skips them). They compare each CUDA path with its CPU-tested reference."""

import os

import pytest
import torch

from tests.generative.test_streaming import corpus  # noqa: F401  (fixtures the GPU tests share with the CPU ones)
from tests.serve.conftest import recformer_model  # noqa: F401


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture
def cuda():
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def one_gpu_test_at_a_time(tmp_path_factory):
    """Under pytest-xdist (``bash run.sh test`` runs the suite on several workers, a file to each) the GPU
    tests of different files take turns on the one device: some measure its memory, and two at once could
    run out of it."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    from filelock import FileLock

    with FileLock(str(tmp_path_factory.getbasetemp().parent / "lmrec-gpu-tests.lock")):
        yield
