"""``scripts/gpu_check.sh``'s set-up on the GPU image's layout, built here without a GPU or a network.

The GPU image's ``python3`` is itself a venv (``/opt/torch/.venv``) with torch installed in it. Here: a venv made from
this venv's base interpreter, torch and the image's other packages that DeepSpeed needs linked into its
site-packages, first on PATH as ``python3``. Wheels: the set of ``scripts/gpu_wheels.sh`` less megatron-core
(DeepSpeed, pydantic, pydantic-core, annotated-types, typing-inspection, hjson) repacked from this venv's installed
files into wheels in a temporary folder (no network, a few seconds). The check runs with
``GPU_CHECK_STOP=setup`` (everything before the first CUDA call), pip cannot reach an index (``PIP_NO_INDEX``, a dead
proxy), and:

* the old recipe's failure is reproduced first: ``python3 -m venv --system-site-packages`` from that interpreter
  cannot import torch (it links the *base* interpreter's site-packages);
* the set-up step passes and writes ``$OUT/summary.json``;
* in the check's environment torch imports from the image venv, every wheel is installed offline at its version, and
  ds_ext's attention op imports.
"""
import base64
import hashlib
import importlib.metadata as metadata
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# what the image has installed (linked here): torch and what importing it needs; DeepSpeed's other dependencies
IMAGE = ["torch", "filelock", "typing_extensions", "sympy", "mpmath", "networkx", "jinja2", "MarkupSafe", "fsspec",
         "numpy", "setuptools", "psutil", "py-cpuinfo", "msgpack", "ninja", "packaging", "tqdm", "einops"]
# what .whl/ carries (scripts/gpu_wheels.sh), less megatron-core: repacked from this venv
WHEELS = ["deepspeed", "pydantic", "pydantic_core", "annotated_types", "typing_inspection", "hjson"]


def _top_levels(dist):
    return sorted({pathlib.PurePath(str(f)).parts[0] for f in dist.files
                   if not str(f).startswith("..") and "__pycache__" not in str(f)})


def link_installed(name: str, site: pathlib.Path) -> None:
    """``name``'s installed top-level packages and dist-info linked into ``site`` (an "installed" copy, no bytes)."""
    dist = metadata.distribution(name)
    for top in _top_levels(dist):
        src = pathlib.Path(dist.locate_file(top))
        if src.exists() and not (site / top).exists():
            (site / top).symlink_to(src)


def repack(name: str, dest: pathlib.Path) -> str:
    """A wheel of ``name`` from its installed files (its own WHEEL tag, a fresh RECORD); returns the file name."""
    dist = metadata.distribution(name)
    tag = next(line.split(": ")[1] for line in dist.read_text("WHEEL").splitlines() if line.startswith("Tag: "))
    info = f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}.dist-info"
    wheel = f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}-{tag}.whl"
    record = []
    with zipfile.ZipFile(dest / wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for f in dist.files:
            path = str(f)
            if (path.startswith("..") or "__pycache__" in path
                    or path.startswith(info) and f.name in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")):
                continue
            data = pathlib.Path(dist.locate_file(f)).read_bytes()
            z.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


def image_venv(tmp: pathlib.Path) -> pathlib.Path:
    """The GPU image's interpreter: a venv (with pip) whose site-packages hold torch; returns its bin folder."""
    image = tmp / "image"
    subprocess.run([os.path.join(sys.base_prefix, "bin", "python3"), "-m", "venv", str(image)], check=True,
                   capture_output=True, timeout=240)
    site = pathlib.Path(subprocess.run([str(image / "bin" / "python3"), "-c", "import site; "
                                        "print(site.getsitepackages()[0])"], check=True, capture_output=True,
                                       text=True).stdout.strip())
    for name in IMAGE:
        link_installed(name, site)
    return image / "bin"


@pytest.mark.slow
def test_gpu_check_setup_on_the_gpu_images_layout(tmp_path):
    bin_dir = image_venv(tmp_path)
    offline = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PIP_NO_INDEX="1",
                   http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", PYTHONPATH="")
    offline.pop("VIRTUAL_ENV", None)
    # the old recipe on this layout: a venv of the venv sees the base interpreter's site-packages, no torch
    old = tmp_path / "old"
    subprocess.run(["python3", "-m", "venv", "--without-pip", "--system-site-packages", str(old)], env=offline,
                   check=True, timeout=120)
    assert subprocess.run([str(old / "bin" / "python"), "-c", "import torch"], env=offline,
                          capture_output=True).returncode != 0

    wheels_dir = tmp_path / "whl"
    wheels_dir.mkdir()
    wheels = [repack(name, wheels_dir) for name in WHEELS]
    out, deps = tmp_path / "out", tmp_path / "deps"
    env = dict(offline, OUT=str(out), GPU_DEPS=str(deps), GPU_WHEELS=str(wheels_dir), GPU_CHECK_STOP="setup",
               GPU_CHECK_IMPORTS="deepspeed pydantic ds_ext")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and [s["name"] for s in summary["steps"]] == ["setup"], summary
    setup_log = (out / "setup.log").read_text()
    assert f"prefix {bin_dir.parent}" in setup_log  # python3 was the image venv's

    # the check's environment (what every later step runs in): torch from the image, each wheel from deps
    probe = ("import importlib.metadata as m, json, sys, torch, ds_ext.ops.attention; "
             "print(json.dumps({'torch': torch.__file__, 'prefix': sys.prefix, 'dists': {n: [m.version(n), "
             "str(m.distribution(n).locate_file(''))] for n in sys.argv[1:]}}))")
    names = [w.split("-")[0] for w in wheels]
    check_env = dict(offline, PYTHONPATH=f"{ROOT}{os.pathsep}{deps}")
    got = subprocess.run(["python3", "-c", probe, *names], env=check_env, capture_output=True, text=True,
                         timeout=120)
    assert got.returncode == 0, got.stderr[-3000:]
    seen = json.loads(got.stdout.strip().splitlines()[-1])
    assert seen["prefix"] == str(bin_dir.parent) and seen["torch"].startswith(str(bin_dir.parent))
    for wheel, name in zip(wheels, names):
        version, where = seen["dists"][name]
        assert version == wheel.split("-")[1] and os.path.realpath(where) == os.path.realpath(deps), (name, where)
