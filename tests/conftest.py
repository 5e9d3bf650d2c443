"""Shared test setup: CPU accelerator, the venv's bin first on PATH (DeepSpeed's JIT ops rebuild when the ninja
on PATH changes; one JIT cache per environment for the same reason), and the tests directory importable from
spawned ranks."""
import json
import os
import subprocess
import sys
import threading
import time
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


@pytest.fixture
def launch_in_process(capsys, monkeypatch):
    """``launch(argv) -> (exit code, stderr)``: ``ds_ext.launch.main(argv)`` in this process, for the refusals
    that end before any worker exists (a ``python -m ds_ext.launch`` subprocess cost ~4 s of imports for the same
    code path; one test keeps the real subprocess for the exit status). Starting workers (torch elastic or
    DeepSpeed's runner) fails the test instead; the environment the launcher prepares for workers is undone."""
    import deepspeed.launcher.runner
    import ds_ext.launch

    def no_worker(*args, **kwargs):
        raise AssertionError(f"ds-ext started workers although it should have refused: {args}")
    monkeypatch.setattr(ds_ext.launch, "_run_elastic", no_worker)
    monkeypatch.setattr(deepspeed.launcher.runner, "main", no_worker)

    def launch(argv):
        saved = dict(os.environ)
        capsys.readouterr()
        try:
            code = ds_ext.launch.main([str(a) for a in argv])
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return code, capsys.readouterr().err
    return launch


# The reference run of examples/train.py that several subprocess tests compare with (the never-failed run of a
# kill -9 test, the straight run of a resume test): configs/baseline.json on 2 processes, a 2-layer model, eval only
# at the end. Each such run costs ~12 s (almost all of it process start), so it is run once per session.
QUICK_TRAIN = ["--layers", "2", "--hidden", "64", "--seq_len", "64", "--eval_batches", "2", "--eval_interval", "100"]
BASELINE_STEPS = 12


def ds_ext_run(argv, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``ds-ext ARGV`` as a user runs it (a subprocess in the repository root), on a free rendezvous port (not
    DeepSpeed's fixed 29500, which a previous test's lingering agent may still hold)."""
    from dist import free_port
    cmd = [sys.executable, "-m", "ds_ext.launch", "--master_port", str(free_port())] + [str(a) for a in argv]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, **kw)


def run_summary(proc: subprocess.CompletedProcess) -> dict:
    """Rank 0's JSON summary line of a successful run (the launcher's own log lines may follow it)."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="session")
def baseline_run() -> dict:
    """The summary of ``ds-ext --config configs/baseline.json examples/train.py`` for ``BASELINE_STEPS`` steps
    with ``QUICK_TRAIN`` (no checkpoint, no journal), computed once per session."""
    return run_summary(ds_ext_run(["--config", ROOT / "configs" / "baseline.json", ROOT / "examples" / "train.py",
                                   "--max_steps", BASELINE_STEPS] + QUICK_TRAIN))


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


# torch's JIT loader (DeepSpeed builds its CPU shared-memory comm op on every init_distributed) holds the file
# ``<TORCH_EXTENSIONS_DIR>/<op>/lock`` while it runs ninja, and waits forever for it to vanish. A rank that a fault
# test kills inside that window leaves the lock behind and every later DeepSpeed process of the session hangs (seen:
# an emulated-host test's kill at teardown). The build itself takes < 60 s; a lock older than this with no compiler
# or ninja running is stale.
STALE_JIT_LOCK_S = 120
BUILDERS = {"ninja", "c++", "g++", "cc1plus", "gcc", "ld"}


def _builder_running() -> bool:
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() in BUILDERS:
                return True
        except OSError:
            continue
    return False


def remove_stale_jit_locks(now: float = None) -> list:
    """Remove JIT build locks older than ``STALE_JIT_LOCK_S`` while no build runs; returns what was removed."""
    # torch's default root too: a worker started where TORCH_EXTENSIONS_DIR was not set builds there
    roots = {Path(os.environ["TORCH_EXTENSIONS_DIR"]), Path.home() / ".cache" / "torch_extensions"}
    now = time.time() if now is None else now
    stale = [lock for root in roots for lock in root.glob("**/lock")
             if now - lock.stat().st_mtime > STALE_JIT_LOCK_S]
    if not stale or _builder_running():
        return []
    for lock in stale:
        lock.unlink(missing_ok=True)
        print(f"conftest: removed a stale torch JIT build lock {lock}", file=sys.stderr)
    return stale


@pytest.fixture(scope="session", autouse=True)
def stale_jit_lock_sweeper():
    stop = threading.Event()

    def sweep():
        while not stop.wait(15):
            try:
                remove_stale_jit_locks()
            except OSError:
                pass
    thread = threading.Thread(target=sweep, name="stale-jit-lock-sweeper", daemon=True)
    thread.start()
    yield
    stop.set()


# A fast-tier test that takes longer than this has hung or lost its way (they take < 30 s each on 2 busy cores);
# slow tests keep pytest.ini's global limit, and any test may set its own with @pytest.mark.timeout.
FAST_TIMEOUT_S = 120


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") is None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(FAST_TIMEOUT_S))
