#!/usr/bin/env bash
# Multi-node through DeepSpeed's runner (pdsh by default; --launcher openmpi|mpich|slurm also work).
# Needs passwordless ssh from the first node to the others and ds_ext installed at the same path on every node.
#   launcher/multinode.sh HOSTFILE MASTER_ADDR CONFIG [script args...]
set -euo pipefail
HOSTFILE=${1:?hostfile}; MASTER=${2:?master address}; CONFIG=${3:?config}; shift 3
exec ds-ext --hostfile "$HOSTFILE" --master_addr "$MASTER" --config "$CONFIG" examples/train.py "$@"
