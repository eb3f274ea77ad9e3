#!/usr/bin/env bash
# Train on several nodes: run this same command on every node, changing only MACHINE_RANK.
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_IP=10.0.0.1 launch/multinode.sh --shards /data/shards --logdir /shared/runs/demucs
#   NUM_MACHINES=2 MACHINE_RANK=1 MAIN_IP=10.0.0.1 launch/multinode.sh --shards /data/shards --logdir /shared/runs/demucs
# MAIN_IP: an address of node 0 the others reach; MAIN_PORT: a free port there (default 29500).
# GPUS_PER_NODE: default, the GPUs this node sees. --logdir must be on storage all nodes share
# (checkpoints are written by rank 0 and read by every rank on resume). Shards can be local copies
# on each node or one URL all nodes stream from (--shards 'pipe:curl -s http://host/shards' style bases work).
# The global batch stays what you ask (default 64): more processes means less accumulation.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NUM_MACHINES:?set NUM_MACHINES}" "${MACHINE_RANK:?set MACHINE_RANK}" "${MAIN_IP:?set MAIN_IP}"
gpus=${GPUS_PER_NODE:-$(nvidia-smi -L | grep -c '^GPU')}
accelerate="${VENV:-.venv}/bin/accelerate"
[ -x "$accelerate" ] || accelerate=accelerate
exec "$accelerate" launch --config_file accelerate_config.yaml \
  --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" \
  --main_process_ip "$MAIN_IP" --main_process_port "${MAIN_PORT:-29500}" \
  --num_processes $((NUM_MACHINES * gpus)) \
  -m demucs_dist.train "$@"
