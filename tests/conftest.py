"""Shared test setup: CPU accelerator, the venv's bin first on PATH (DeepSpeed's JIT ops rebuild when the ninja
on PATH changes), and the repository root importable from spawned ranks."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def repo_root() -> Path:
    return ROOT
