import os
import sys
from pathlib import Path

import pytest

# The engine tests import helpers that live beside them.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(autouse=True)
def _seed_torch():
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(0)
