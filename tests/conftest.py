import os

import pytest
import torch

# Keep CPU tests small and deterministic on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models run fastest single-threaded, and two OpenMP threads on a
    loaded 2-core machine spin-wait many times slower. Use with pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
