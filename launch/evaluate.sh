#!/usr/bin/env bash
# Evaluate a model on every GPU of this node (2 CPU processes where there is none): the test songs
# are split across the devices, each scores its songs with museval in a pool of CPU workers.
#   launch/evaluate.sh --model runs/demucs/best.th --musdb /data/musdb18 --out eval/demucs
#   launch/evaluate.sh --model best.th --musdb /data/musdb18hq --is-wav --out eval/demucs --shifts 10
#   launch/evaluate.sh --baseline mixture --musdb /data/musdb18 --out eval/mixture   # no separation at all
# Relaunch the same command after a crash: finished songs are kept and skipped.
# NPROC=4 uses 4 GPUs; --workers sets the museval processes per GPU (default: cores per GPU - 1).
exec "$(dirname "$0")/run.sh" demucs_dist.evaluate "$@"
