"""The ``compat`` tier: the HF-model tests under each transformers version of the supported range (setup.py's
``transformers>=5.17,<5.20``: 5.17 is the GPU image's, the top is what the set-up installs).

The venv's own transformers runs the whole suite; every other version of :data:`VERSIONS` is installed once
(``pip install --no-deps --target``, cached under ``DS_EXT_COMPAT_CACHE``, default ``~/.cache/ds_ext/compat``) with
those of its requirements the venv does not satisfy (read from the wheel's metadata and compared with the installed
versions), and the HF-model tests (:data:`HF_TESTS`: StreamBP and Prefix Grouper parity on HF Qwen2/Llama, HF
pipeline stages, the HF export round trip) run in a subprocess with that folder first on ``PYTHONPATH``. The shared
venv is never changed. Installing needs PyPI once per version; later runs are offline.
"""
import importlib.metadata as metadata
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
VERSIONS = ["5.17.0", "5.19.0"]
HF_TESTS = ["tests/test_streambp.py::test_hf_decoder_layers_stream_exactly",
            "tests/test_streambp.py::test_hf_mask_other_than_causal_padding_is_refused",
            "tests/test_streambp_packed.py", "tests/test_prefix_grouper.py::test_hf_llama_grouped_matches_repeated_baseline",
            "tests/test_hf_pipeline.py", "tests/test_hf_train.py"]
CACHE = pathlib.Path(os.environ.get("DS_EXT_COMPAT_CACHE", pathlib.Path.home() / ".cache" / "ds_ext" / "compat"))


def _pip(*args):
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                           *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install {' '.join(args)} failed (needs PyPI once):\n{proc.stderr[-2000:]}"


def unmet_requirements(dist, target: pathlib.Path) -> list:
    """``dist``'s unconditional requirements that neither ``target`` nor this venv satisfies (their installed
    versions asked from their metadata)."""
    from packaging.requirements import Requirement
    unmet = []
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        local = [d.version for d in metadata.distributions(path=[str(target)], name=req.name)]
        try:
            have = local[0] if local else metadata.version(req.name)
        except metadata.PackageNotFoundError:
            have = None
        if have is None or not req.specifier.contains(have, prereleases=True):
            unmet.append(str(req))
    return unmet


def installed(version: str) -> pathlib.Path:
    """A folder holding transformers ``version`` and the requirements (transitively) the venv does not meet for it
    (cached)."""
    target = CACHE / f"transformers-{version}"
    done = target / ".complete"
    if not done.exists():
        _pip("--target", str(target), "--upgrade", f"transformers=={version}")
        added = []
        for _ in range(5):  # what an added requirement needs in turn (huggingface-hub 1.x: httpx)
            unmet = sorted({r for d in metadata.distributions(path=[str(target)]) for r in unmet_requirements(d, target)})
            if not unmet:
                break
            _pip("--target", str(target), "--upgrade", *unmet)
            added += unmet
        done.write_text("\n".join(added) + "\n")
    return target


@pytest.mark.compat
@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_hf_model_tests_pass_with_transformers(version):
    own = metadata.version("transformers")
    if own == version:
        pytest.skip(f"transformers {own} is the venv's own: the whole suite runs with it")
    target = installed(version)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]), OMP_NUM_THREADS="1")
    probe = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == version, probe.stderr[-2000:]
    # the HF-model tests' fast tier (their multi-process runs stay in the venv's own tier: < 4 minutes here)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                           *HF_TESTS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout.splitlines()[-1] and "skipped" not in proc.stdout.splitlines()[-1], tail
