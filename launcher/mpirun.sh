#!/usr/bin/env bash
# Launch with Open MPI directly; DeepSpeed finds ranks through mpi4py (pip install -e .[mpi]).
#   launcher/mpirun.sh NP CONFIG [script args...]
#   MPI_ARGS="-H node1,node2" launcher/mpirun.sh 2 CONFIG ...      (several nodes: -H or -hostfile through MPI_ARGS;
#                                                                   Open MPI starts the other nodes' daemons by ssh)
# Passed on to every rank: PATH (every node finds this python and ninja) and, when set, PYTHONPATH, DS_ACCELERATOR,
# TORCH_EXTENSIONS_DIR. Not OMP_NUM_THREADS: each rank takes its threads from its own node's cores (examples/train.py).
set -euo pipefail
NP=${1:?number of processes}; CONFIG=${2:?config}; shift 2
python -m ds_ext.config check "$CONFIG"   # exit 2 on a bad config before any rank starts
ROOT_FLAG=$([ "$(id -u)" = 0 ] && echo --allow-run-as-root || true)
exec mpirun $ROOT_FLAG ${MPI_ARGS:-} -np "$NP" -x PATH ${PYTHONPATH:+-x PYTHONPATH} \
  ${DS_ACCELERATOR:+-x DS_ACCELERATOR} ${TORCH_EXTENSIONS_DIR:+-x TORCH_EXTENSIONS_DIR} \
  python examples/train.py --deepspeed_config "$CONFIG" "$@"
