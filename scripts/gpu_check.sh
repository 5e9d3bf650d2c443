#!/usr/bin/env bash
# The GPU checks of issue 19 as one short script, run on the GPU machine from the repository root:
#
#   bash scripts/gpu_wheels.sh                     # here, once (network): .whl/ with what the GPU image lacks
#   device run, carry [".whl"]:  bash scripts/gpu_check.sh      # there (no network); results under $OUT
#
# 1. a venv (--system-site-packages: the image's CUDA torch, transformers, pytest) + the wheels of .whl/, offline;
# 2. env.txt: GPU, driver, torch/CUDA/DeepSpeed/transformers versions (for benchmarks/RESULTS.md);
# 3. pytest -m cuda: the CUDA kernels of the merged attention op, StreamBP's layer-input offload, and megatron's
#    DotProductAttention vs our core attention (pytest_cuda.log);
# 4. benchmarks/prefix_grouper.py --device cuda --quick (bf16; headline P=1024, S=128, G=16) and
#    benchmarks/streambp.py --device cuda (bf16; 32k and 64k tokens; none / checkpointing / ALST / StreamBP /
#    StreamBP with offload_layer_inputs): logs (last line one JSON object) and PNGs.
# GPU_PYTHON=/path/to/python skips 1 (an interpreter that has everything). Each step has its own time limit and a failed step does not stop the next; the exit status is the first failure.
# Within 10 minutes on an H200 (the whole device budget of a session is 15 minutes, start included).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
status=0
step() {  # step NAME SECONDS CMD...: run with a limit, tee into $OUT/NAME.log, remember the first failure
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  [ "$rc" = 0 ] || [ "$status" != 0 ] || status=$rc
}

if [ -n "${GPU_PYTHON:-}" ]; then  # an interpreter that already has everything (no venv, no wheels)
  PY=$GPU_PYTHON
  VENV=$("$PY" -c "import sys; print(sys.prefix)")
else
  VENV=${GPU_VENV:-/tmp/ds_ext_gpu}
  [ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV" || exit 1
  ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_check: no .whl/*.whl: run scripts/gpu_wheels.sh here first" >&2; exit 1; }
  "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || exit 1
  PY="$VENV/bin/python"
fi
export TORCH_EXTENSIONS_DIR="$VENV/torch_extensions"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch, deepspeed, transformers, pydantic; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'device', torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability(), \
'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'pydantic', pydantic.VERSION)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step pytest_cuda 180 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs tests/test_attention_kernels.py \
  tests/test_streambp_offload.py tests/test_megatron.py
step prefix_grouper_cuda 150 "$PY" benchmarks/prefix_grouper.py --device cuda --quick \
  --plot "$OUT/prefix_grouper_cuda.png"
step streambp_cuda 240 "$PY" benchmarks/streambp.py --device cuda --lengths 32768,65536 \
  --full_logits_lengths 32768,65536 --budget_length 65536 --grad_length 512 --point_timeout 120 \
  --plot "$OUT/streambp_cuda.png"
echo "gpu_check: exit $status; results in $OUT"
exit "$status"
