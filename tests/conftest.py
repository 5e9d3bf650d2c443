"""Shared test setup: CPU accelerator, the venv's bin first on PATH (DeepSpeed's JIT ops rebuild when the ninja
on PATH changes; one JIT cache per environment for the same reason), and the tests directory importable from
spawned ranks."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def repo_root() -> Path:
    return ROOT


SHM_BUFFERS = "deepspeed_allreduce_buffer_*"


@pytest.fixture(scope="session", autouse=True)
def remove_deepspeed_shm_buffers():
    """DeepSpeed's CPU shared-memory all-reduce (used by runs its launcher starts, which set LOCAL_SIZE) leaves a
    ~69 MB file per rank in /dev/shm; remove the ones this session created so repeated runs do not eat the RAM."""
    shm = Path("/dev/shm")
    before = set(shm.glob(SHM_BUFFERS)) if shm.is_dir() else set()
    yield
    for leftover in (set(shm.glob(SHM_BUFFERS)) - before) if shm.is_dir() else ():
        leftover.unlink(missing_ok=True)


# A fast-tier test that takes longer than this has hung or lost its way (they take < 30 s each on 2 busy cores);
# slow tests keep pytest.ini's global limit, and any test may set its own with @pytest.mark.timeout.
FAST_TIMEOUT_S = 120


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") is None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(FAST_TIMEOUT_S))
