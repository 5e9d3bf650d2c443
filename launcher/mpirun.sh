#!/usr/bin/env bash
# Launch with Open MPI directly; DeepSpeed finds ranks through mpi4py (pip install -e .[mpi]).
#   launcher/mpirun.sh NP CONFIG [script args...]          (add -hostfile FILE through MPI_ARGS for several nodes)
set -euo pipefail
NP=${1:?number of processes}; CONFIG=${2:?config}; shift 2
python -m ds_ext.config check "$CONFIG"   # exit 2 on a bad config before any rank starts
ROOT_FLAG=$([ "$(id -u)" = 0 ] && echo --allow-run-as-root || true)
exec mpirun $ROOT_FLAG ${MPI_ARGS:-} -np "$NP" -x OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" -x DS_ACCELERATOR \
  python examples/train.py --deepspeed_config "$CONFIG" "$@"
