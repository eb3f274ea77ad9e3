#!/usr/bin/env bash
# Train on several nodes: run this same command on every node, changing only MACHINE_RANK.
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_IP=10.0.0.1 launch/multinode.sh --shards /data/shards --logdir /shared/runs/demucs
#   NUM_MACHINES=2 MACHINE_RANK=1 MAIN_IP=10.0.0.1 launch/multinode.sh --shards /data/shards --logdir /shared/runs/demucs
# MAIN_IP: an address of node 0 the others reach; MAIN_PORT: a free port there (default 29500).
# GPUS_PER_NODE: default, the GPUs this node may use (nvidia-smi -L, restricted by CUDA_VISIBLE_DEVICES;
# see count_gpus in run.sh). --logdir must be on storage all nodes share
# (checkpoints are written by rank 0 and read by every rank on resume). Shards can be local copies
# on each node or one URL all nodes stream from (--shards 'pipe:curl -s http://host/shards' style bases work).
# Paths in the arguments are relative to the folder you run it from.
# The global batch stays what you ask (default 64): more processes means less accumulation.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/run.sh
source "$root/launch/run.sh"  # count_gpus
: "${NUM_MACHINES:?set NUM_MACHINES}" "${MACHINE_RANK:?set MACHINE_RANK}" "${MAIN_IP:?set MAIN_IP}"
gpus=${GPUS_PER_NODE:-$(count_gpus)}
if [ "$gpus" -lt 1 ]; then
  echo "error: no GPU on $(hostname) (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}); multi-node training needs GPUs" >&2
  exit 2
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # `-m demucs_dist.train` from any folder
export DEMUCS_DIST_NPROC=$((NUM_MACHINES * gpus))  # the trainer checks that this many processes joined
accelerate="${VENV:-$root/.venv}/bin/accelerate"
[ -x "$accelerate" ] || accelerate=accelerate
echo "[launch] node $MACHINE_RANK of $NUM_MACHINES: $gpus GPU(s) (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset})" >&2
exec "$accelerate" launch --config_file "$root/accelerate_config.yaml" \
  --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" \
  --main_process_ip "$MAIN_IP" --main_process_port "${MAIN_PORT:-29500}" \
  --num_processes $((NUM_MACHINES * gpus)) \
  -m demucs_dist.train "$@"
