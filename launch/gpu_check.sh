#!/usr/bin/env bash
# The GPU path checked in one command (bench/gpu_check.py), on every GPU this job may use: ~20
# training steps in fp32, bf16 and fp16, with --compile and --activation-checkpointing, a killed and
# resumed run, an evaluation with 10 shifts and the separation of a 10-minute file. It prints a table
# and writes it to runs/gpu-check/gpu_check.md; exit status 1 if a check failed. docs/gpu.md reads it.
#   launch/gpu_check.sh                          # a GPU node (make gpu-check)
#   launch/gpu_check.sh --cpu                    # the CPU part (a tiny model), on any machine
#   launch/gpu_check.sh --out /scratch/check --precisions bf16 --variants plain,compile
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python="${VENV:-$root/.venv}/bin/python"
[ -x "$python" ] || python=python3
exec "$python" "$root/bench/gpu_check.py" "$@"
