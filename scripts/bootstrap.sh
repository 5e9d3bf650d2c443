#!/usr/bin/env bash
# Set up everything ds_ext needs on a fresh Debian machine with Python 3.11, idempotently:
# Debian's Open MPI (for mpi4py and mpirun), a venv in .venv with the CPU build of torch installed *before*
# deepspeed (otherwise pip pulls a multi-GB CUDA build), the package with its test/mpi/monitor/hf/megatron/vllm/trl extras
# (megatron-core 0.16.1 from PyPI; never PyPI's unrelated `apex`), and
# DeepSpeed's CPU comm op compiled once into the torch extensions cache (~55 s the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! command -v mpirun >/dev/null 2>&1 || ! command -v mpicc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q && apt-get install -y -q openmpi-bin libopenmpi-dev
  else
    sudo apt-get update -q && sudo apt-get install -y -q openmpi-bin libopenmpi-dev
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PATH="$PWD/.venv/bin:$PATH"
# One JIT cache per venv (ds-ext and the tests use the same): a cache built with another ninja is rebuilt.
export TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions"
if ! python -c "import torch" 2>/dev/null; then
  pip install -q --upgrade pip
  pip install -q torch==2.13.0
fi
if ! python -c "import ds_ext, deepspeed, mpi4py, pytest, pytest_timeout, tensorboard, transformers, megatron.core, einops, vllm, trl" \
    2>/dev/null; then
  pip install -q -e ".[test,mpi,monitor,hf,megatron,vllm,trl]"
fi
# vllm's dependencies pull torchvision / torchaudio / torchcodec from PyPI as CUDA builds; against the CPU torch they
# break transformers' model modules (operator torchvision::nms does not exist; seen only when a model class is
# imported, transformers loads lazily) and vLLM (libnvrtc): remove any of them that does not import
for pkg in torchvision torchaudio torchcodec; do
  if pip show -q "$pkg" >/dev/null 2>&1 && ! python -c "import $pkg" >/dev/null 2>&1; then
    pip uninstall -y -q "$pkg"
  fi
done
python -c "from transformers import LlamaConfig, Qwen2ForCausalLM" >/dev/null 2>&1 \
  || echo "bootstrap: warning: transformers' model classes do not import (see: python -c 'from transformers import LlamaConfig')" >&2
DS_ACCELERATOR=cpu python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()" \
  >/dev/null 2>&1 || echo "bootstrap: warning: DeepSpeed's CPU comm op did not build; runs will try again" >&2
echo "bootstrap: ready ($(python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null))"
