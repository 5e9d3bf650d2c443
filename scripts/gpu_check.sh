#!/usr/bin/env bash
# The GPU checks as ONE command, run on the GPU machine from the repository root; everything lands under $OUT and
# $OUT/summary.json says how each step ended:
#
#   bash scripts/gpu_wheels.sh                     # here, once (network): .whl/ with what the GPU image lacks
#   device run, carry [".whl"], timeout_s 600:  bash scripts/gpu_check.sh
#
# 1. setup: the image's own python3 (itself a venv, /opt/torch/.venv, that holds CUDA torch and transformers) runs
#    everything. A venv made from it would not do: `python3 -m venv --system-site-packages` links the venv to the
#    *base* interpreter's site-packages, where torch is not. So the wheels of .whl/ are installed offline
#    (`pip --no-index --no-deps --target`) into a separate folder ($GPU_DEPS) that goes first on PYTHONPATH, beside
#    the repository; the image's packages stay as they are. Then the imports are checked (torch must be the image's).
# 2. env.txt: GPU, driver, torch/CUDA/DeepSpeed/transformers versions (for benchmarks/RESULTS.md);
# 3. pytest -m cuda: the CUDA kernels of the merged attention op, StreamBP's layer-input offload, and megatron's
#    DotProductAttention vs our core attention (pytest_cuda.log);
# 4. benchmarks/prefix_grouper.py --device cuda --quick and benchmarks/streambp.py --device cuda (bf16, 32k and 64k):
#    logs (last line one JSON object, copied into summary.json) and PNGs.
#
# Each step has its own time limit, cut to what is left of GPU_CHECK_BUDGET (default 540 s, so the whole check fits
# one 600 s device call with the start included); a failed step does not stop the next; the exit status is the
# first failure. GPU_PYTHON=/path/to/python: that interpreter instead of python3. GPU_CHECK_STOP=setup: stop after
# step 1 (tests/test_gpu_layout.py runs the set-up on a CPU machine that way).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PY=${GPU_PYTHON:-python3}
DEPS=${GPU_DEPS:-/tmp/ds_ext_gpu_deps}
WHEELS=${GPU_WHEELS:-.whl}  # the wheels to install (tests point it elsewhere)
BUDGET=${GPU_CHECK_BUDGET:-540}
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$DEPS${PYTHONPATH:+:$PYTHONPATH}" PIP_NO_INDEX=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$DEPS.torch_extensions}
status=0
: >"$OUT/steps.tsv"
step() {  # step NAME SECONDS CMD...: run with a limit, tee into $OUT/NAME.log, remember the first failure
  local name=$1 limit=$2 t0=$SECONDS rc; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -le 5 ]; then
    rc=124; echo "== $name: skipped, the ${BUDGET}s budget is spent" | tee "$OUT/$name.log"
  else
    echo "== $name (limit ${limit}s): $*"
    if declare -F "$1" >/dev/null; then  # a function of this script (timeout runs programs only)
      ( "$@" ) 2>&1 | tee "$OUT/$name.log"
    else
      timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    fi
    rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >>"$OUT/steps.tsv"
  [ "$rc" = 0 ] || [ "$status" != 0 ] || status=$rc
}

summary() {  # $OUT/summary.json: every step's exit/seconds/limit, the versions, the benchmarks' last-line JSON
  "$PY" - "$OUT" "$status" <<'EOF' || echo '{"error": "gpu_check: could not write the summary"}' >"$OUT/summary.json"
import json, os, sys
out, status = sys.argv[1], int(sys.argv[2])
steps = []
for line in open(os.path.join(out, "steps.tsv")):
    name, rc, seconds, limit = line.rstrip("\n").split("\t")
    entry = {"name": name, "exit": int(rc), "seconds": int(seconds), "limit": int(limit)}
    log = os.path.join(out, name + ".log")
    lines = open(log, errors="replace").read().splitlines() if os.path.exists(log) else []
    for last in reversed(lines):
        if last.startswith("{"):
            try:
                entry["result"] = json.loads(last)
            except ValueError:
                pass
            break
    if int(rc) != 0:
        entry["log_tail"] = lines[-15:]
    steps.append(entry)
env = os.path.join(out, "env.txt")
json.dump({"exit": status, "ok": status == 0, "steps": steps,
           "env": open(env).read().splitlines() if os.path.exists(env) else []},
          open(os.path.join(out, "summary.json"), "w"), indent=1)
EOF
}

install_wheels() {  # the wheels of .whl/ into $DEPS, offline; without pip in $PY, unpacked (a wheel is a zip)
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || {
    echo "gpu_check: no $WHEELS/*.whl: run scripts/gpu_wheels.sh here first" >&2; return 1; }
  rm -rf "$DEPS" && mkdir -p "$DEPS" || return 1
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
      --target "$DEPS" "$WHEELS"/*.whl || return 1
  else
    for w in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$w" "$DEPS" || return 1; done
  fi
  echo "installed into $DEPS: $(ls "$WHEELS" | tr '\n' ' ')"
}

check_imports() {  # torch from the image (not from $DEPS), the rest importable
  "$PY" - "$DEPS" ${GPU_CHECK_IMPORTS:-deepspeed transformers pydantic ds_ext} <<'EOF'
import importlib, os, sys
deps = os.path.realpath(sys.argv[1])
import torch
assert not os.path.realpath(torch.__file__).startswith(deps), f"torch came from {deps}, not the image"
print("python", sys.executable, sys.version.split()[0], "prefix", sys.prefix, "base", sys.base_prefix)
print("torch", torch.__version__, "from", os.path.dirname(torch.__file__))
for name in sys.argv[2:]:
    module = importlib.import_module(name)
    print(name, getattr(module, "__version__", getattr(module, "VERSION", "")), "from", os.path.dirname(module.__file__))
EOF
}

setup() { install_wheels && check_imports; }
step setup 120 setup
if [ "${GPU_CHECK_STOP:-}" = setup ]; then summary; exit "$status"; fi

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch, deepspeed, transformers, pydantic; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'device', torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability(), \
'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'pydantic', pydantic.VERSION)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step pytest_cuda 150 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs tests/test_attention_kernels.py \
  tests/test_streambp_offload.py tests/test_megatron.py
step prefix_grouper_cuda 120 "$PY" benchmarks/prefix_grouper.py --device cuda --quick \
  --plot "$OUT/prefix_grouper_cuda.png"
step streambp_cuda 240 "$PY" benchmarks/streambp.py --device cuda --lengths 32768,65536 \
  --full_logits_lengths 32768,65536 --budget_length 65536 --grad_length 512 --point_timeout 100 \
  --plot "$OUT/streambp_cuda.png"
summary
echo "gpu_check: exit $status; results in $OUT (summary.json)"
exit "$status"
