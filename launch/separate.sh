#!/usr/bin/env bash
# Separate audio files into stems on every GPU of this node (the files are split across devices):
#   launch/separate.sh songs/*.mp3 --model runs/demucs/best.th --out separated
exec "$(dirname "$0")/run.sh" demucs_dist.separate "$@"
