#!/usr/bin/env bash
# Fetch (and build) into .whl/ the wheels the GPU machine lacks, for its Python (3.12, x86-64, manylinux): the GPU
# machine reaches no package registry, so scripts/gpu_check.sh installs from .whl/ only (`pip --no-index`).
#
# What the GPU image already has (/work/.library/device/KINDS.md): CUDA PyTorch (2.11+cu130 when last read),
# transformers, tokenizers, safetensors, numpy, einops, ninja, psutil, py-cpuinfo, msgpack, nvidia-ml-py, tqdm,
# matplotlib, mpi4py, pytest, pytest-timeout. What ds_ext needs beside those: DeepSpeed 0.19.8 (an sdist on PyPI:
# built here into a pure-Python wheel, ops JIT-compiled there), its hjson, pydantic 2 (+ pydantic-core,
# annotated-types, typing-inspection) and megatron-core 0.16.1.
#
# Not fetched: a CUDA torch==2.13.0 wheel. PyPI's CUDA build is ~900 MB plus multi-GB nvidia-* wheels, far over the
# 64 MiB a device call may carry, and the GPU image's own CUDA torch serves (the aten ops ds_ext calls have the same
# schemas there; tests/test_attention_kernels.py checks them on the GPU). The CPU torch on this machine cannot run
# CUDA code, so it is no substitute either.
#
# Usage (repository root, network to PyPI):  bash scripts/gpu_wheels.sh      (~1 min; .whl/ is git-ignored, ~15 MB)
# PYTHON=/path/to/python picks the interpreter that runs pip (default: .venv/bin/python, else python3); it needs
# pip only: pydantic's version comes from it when it has pydantic (else PYDANTIC_VERSION / PYDANTIC_CORE_VERSION,
# default the pair tested here), DeepSpeed's wheel builds in pip's build isolation when it lacks setuptools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
"$PY" -m pip --version >/dev/null || { echo "gpu_wheels: $PY has no pip (set PYTHON=)" >&2; exit 2; }
DEST=.whl
mkdir -p "$DEST"

PLATFORMS=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do PLATFORMS+=(--platform "manylinux_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)

fetch() {  # binary wheels for CPython 3.12 on x86-64 Linux, exactly the pinned versions, no dependencies
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --abi abi3 --abi none "${PLATFORMS[@]}" -d "$DEST" "$@"
}

# pydantic: the version pinned here, and the pydantic-core it requires (exact pin in pydantic's metadata)
PYDANTIC=${PYDANTIC_VERSION:-$("$PY" -c "import pydantic; print(pydantic.VERSION)" 2>/dev/null || echo 2.14.4)}
CORE=${PYDANTIC_CORE_VERSION:-$("$PY" -c "import pydantic_core; print(pydantic_core.__version__)" 2>/dev/null \
  || echo 2.50.5)}
fetch "pydantic==$PYDANTIC" "pydantic-core==$CORE" annotated-types typing-inspection hjson "megatron-core==0.16.1"

# DeepSpeed: sdist only; its setup.py imports torch if it can (and works without) and builds no op
# (DS_BUILD_OPS=0), so the wheel is pure Python and JIT-builds its ops on the GPU machine as on any other.
if ! ls "$DEST"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  isolation=--no-build-isolation
  "$PY" -c "import setuptools, wheel" 2>/dev/null || isolation=
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps $isolation -w "$DEST" deepspeed==0.19.8
fi

# one version of each package: two would stop the install there
dups=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dups" ] || { echo "gpu_wheels: more than one wheel of: $dups (remove the older from $DEST)" >&2; exit 1; }
du -sh "$DEST"
ls "$DEST"
