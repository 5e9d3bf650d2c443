#!/usr/bin/env bash
# Multi-node through DeepSpeed's runner: pdsh by default, LAUNCHER=openmpi|mpich|slurm for the others.
# Needs passwordless ssh from the first node to the others and ds_ext installed at the same path on every node.
#   launcher/multinode.sh HOSTFILE MASTER_ADDR CONFIG [script args...]
#   LAUNCHER=openmpi launcher/multinode.sh launcher/hostfile.example node1 configs/noloco.json --max_steps 100
# openmpi: DeepSpeed adds "--mca btl_tcp_if_include eth0"; other NIC names: LAUNCHER_ARGS="--mca btl_tcp_if_include X".
set -euo pipefail
HOSTFILE=${1:?hostfile}; MASTER=${2:?master address}; CONFIG=${3:?config}; shift 3
exec ds-ext --hostfile "$HOSTFILE" --master_addr "$MASTER" --launcher "${LAUNCHER:-pdsh}" \
  ${LAUNCHER_ARGS:+--launcher_args "$LAUNCHER_ARGS"} --config "$CONFIG" examples/train.py "$@"
