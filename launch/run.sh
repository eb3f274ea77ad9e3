#!/usr/bin/env bash
# Launch a demucs_dist stage on every GPU this job may use, or on CPU processes where there is none:
#   launch/run.sh demucs_dist.train --shards shards --logdir runs/demucs
# Paths in the arguments are relative to the folder you run it from (it does not change folder).
# Environment:
#   NPROC   processes to start (default: the number of GPUs this job may use, or 2 without GPUs)
#   VENV    virtualenv holding accelerate (default: the repository's .venv; falls back to accelerate on PATH)
#   CUDA_VISIBLE_DEVICES  when set, only the GPUs it names are counted (indices or UUIDs; empty: none)
# Without GPUs it sets ACCELERATE_USE_CPU=1 and --multi_gpu: `accelerate launch --cpu` would start ONE
# process, and --multi_gpu without the CPU switch starts independent processes with no DDP.
# `source launch/run.sh` only defines count_gpus (used by multinode.sh and the tests).

# The number of GPUs this process may use: those `nvidia-smi -L` lists, restricted to
# CUDA_VISIBLE_DEVICES when it is set. A scheduler that gives a job 2 GPUs of 8 sets it; counting
# nvidia-smi alone would start 8 processes and NCCL would fail on a "duplicate GPU".
# CUDA reads CUDA_VISIBLE_DEVICES up to its first invalid entry (an index or UUID this machine does
# not have, -1, a repeat) and ignores the rest; this counts the same way. Without nvidia-smi (a
# container without the driver's utilities) the driver's device files /dev/nvidiaN are counted.
count_gpus() {
  local listing="" physical=0 entry count=0 seen="," device
  local -a entries=()
  if command -v nvidia-smi >/dev/null 2>&1; then
    listing=$(nvidia-smi -L 2>/dev/null) || listing=""
    physical=$(grep -c '^GPU ' <<< "$listing" || true)
  else
    for device in /dev/nvidia[0-9]*; do
      if [ -e "$device" ]; then physical=$((physical + 1)); fi
    done
  fi
  if [ -z "${CUDA_VISIBLE_DEVICES+set}" ] || [ "$physical" -eq 0 ]; then
    echo "$physical"
    return 0
  fi
  IFS=, read -r -a entries <<< "$CUDA_VISIBLE_DEVICES"
  for entry in "${entries[@]}"; do
    entry=${entry//[[:space:]]/}
    if [[ $entry =~ ^[0-9]+$ ]]; then
      entry=$((10#$entry))
      [ "$entry" -lt "$physical" ] || break
    elif [[ $entry == GPU-* || $entry == MIG-* ]]; then
      # CUDA also takes a UUID's unique prefix; without nvidia-smi's listing a UUID cannot be checked
      [ -z "$listing" ] || grep -qF "UUID: $entry" <<< "$listing" || break
    else
      break
    fi
    case $seen in *",$entry,"*) break ;; esac
    seen+="$entry,"
    count=$((count + 1))
  done
  echo "$count"
}

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
  return 0  # sourced: count_gpus only
fi

set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # `-m demucs_dist.x` from any folder
module=$1
shift
accelerate="${VENV:-$root/.venv}/bin/accelerate"
[ -x "$accelerate" ] || accelerate=accelerate

gpus=$(count_gpus)
if [ "$gpus" -gt 0 ]; then
  nproc=${NPROC:-$gpus}
  if [ "$nproc" -gt "$gpus" ]; then
    echo "error: NPROC=$nproc but this job may use $gpus GPU(s) (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}): one process per GPU at most" >&2
    exit 2
  fi
  echo "[launch] $nproc process(es) on $gpus GPU(s) (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset})" >&2
  export DEMUCS_DIST_NPROC=$nproc  # the stage checks that this many processes joined
  exec "$accelerate" launch --config_file "$root/accelerate_config.yaml" --num_processes "$nproc" -m "$module" "$@"
fi

nproc=${NPROC:-2}
export DEMUCS_DIST_NPROC=$nproc
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ] && [ "$(unset CUDA_VISIBLE_DEVICES; count_gpus)" -gt 0 ]; then
  echo "[launch] CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' leaves no GPU: $nproc CPU process(es) with gloo" >&2
else
  echo "[launch] no GPU found: $nproc CPU process(es) with gloo" >&2
fi
export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}
multi=(--multi_gpu)
[ "$nproc" -gt 1 ] || multi=()
exec "$accelerate" launch "${multi[@]}" --num_processes "$nproc" --num_machines 1 \
  --mixed_precision no --dynamo_backend no -m "$module" "$@"
