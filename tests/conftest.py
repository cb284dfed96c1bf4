import os

import pytest
import torch

# Keep CPU tests small and deterministic on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
