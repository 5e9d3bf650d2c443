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
