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
# Each pytest-xdist worker gets its own temporary folder (subprocesses inherit TMPDIR): the tests
# that check that a run leaves no temporary files behind must not see another worker's.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _worker_tmp = Path(tempfile.gettempdir()) / f"maml-tests-{os.environ['PYTEST_XDIST_WORKER']}-{os.getpid()}"
    _worker_tmp.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(_worker_tmp)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    atexit.register(shutil.rmtree, str(_worker_tmp), True)
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


# The files that take longest (seconds of one core, measured with --durations=0 on 2026-11-29) run
# first: with `--dist loadfile` each file stays on one worker, and a long file started last would
# leave the other core idle for minutes (longest first: the two workers end within a minute).
LONGEST_FIRST = ("test_backends.py", "test_domain_check.py", "test_nnunet_import.py",
                 "test_slicer_engine.py", "test_registration.py", "test_training.py",
                 "test_learning.py", "test_pipeline.py", "test_batch.py", "test_dicomseg.py",
                 "test_evaluation.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
