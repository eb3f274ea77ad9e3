#!/usr/bin/env bash
# Launch a demucs_dist stage on every GPU of this node, or on CPU processes where there is none:
#   launch/run.sh demucs_dist.train --shards shards --logdir runs/demucs
# Environment:
#   NPROC   processes to start (default: the number of GPUs, or 2 without GPUs)
#   VENV    virtualenv holding accelerate (default .venv; falls back to accelerate on PATH)
# Without GPUs it sets ACCELERATE_USE_CPU=1 and --multi_gpu: `accelerate launch --cpu` would start ONE
# process, and --multi_gpu without the CPU switch starts independent processes with no DDP.
set -euo pipefail
cd "$(dirname "$0")/.."
module=$1; shift
accelerate="${VENV:-.venv}/bin/accelerate"
[ -x "$accelerate" ] || accelerate=accelerate

gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
if [ "$gpus" -gt 0 ]; then
  nproc=${NPROC:-$gpus}
  export DEMUCS_DIST_NPROC=$nproc  # the stage checks that this many processes joined
  exec "$accelerate" launch --config_file accelerate_config.yaml --num_processes "$nproc" -m "$module" "$@"
fi

nproc=${NPROC:-2}
export DEMUCS_DIST_NPROC=$nproc
echo "[launch] no GPU found: $nproc CPU process(es) with gloo" >&2
export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}
multi=(--multi_gpu)
[ "$nproc" -gt 1 ] || multi=()
exec "$accelerate" launch "${multi[@]}" --num_processes "$nproc" --num_machines 1 \
  --mixed_precision no --dynamo_backend no -m "$module" "$@"
