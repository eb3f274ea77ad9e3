#!/usr/bin/env bash
# Train on every GPU of this node (2 CPU processes where there is none).
#   launch/train.sh --shards shards --logdir runs/demucs            # paper defaults, global batch 64
#   launch/train.sh --shards shards --logdir runs/report --global-batch 8 --epochs 240 --repeat 1
# Relaunch the same command to resume from the newest checkpoint; add --restart to start over.
# Mixed precision, GPU count and such come from accelerate_config.yaml (NPROC=4 to use 4 GPUs).
# Watch it: tensorboard --logdir runs
exec "$(dirname "$0")/run.sh" demucs_dist.train "$@"
