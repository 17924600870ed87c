import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# The engine tests import helpers that live beside them.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The test volumes are tiny: one thread is as fast as two and does not collapse when another
# process keeps the second core busy (OpenMP threads then wait on each other). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The OpenVINO backend's converted networks go to a cache of this test session, never the user's.
os.environ["MAML_CACHE"] = tempfile.mkdtemp(prefix="maml-test-cache-")
atexit.register(shutil.rmtree, os.environ["MAML_CACHE"], True)


@pytest.fixture(autouse=True)
def _seed_torch():
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(0)
