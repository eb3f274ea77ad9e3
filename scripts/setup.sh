#!/usr/bin/env bash
# Create .venv and install everything demucs_dist needs; safe to run again (installs what is missing).
#   torch: the CPU build (torch==2.13.0) where no NVIDIA GPU is visible, the default build otherwise.
#   ffmpeg: musdb/museval need the ffmpeg and ffprobe executables, even for wav data.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
say() { echo "[setup] $*"; }

if ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing ffmpeg (Debian package)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
  else
    echo "error: ffmpeg and ffprobe are needed (musdb reads audio through them)." >&2
    echo "       Install them, e.g. 'sudo apt-get install ffmpeg' or 'conda install ffmpeg', then run this again." >&2
    exit 1
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is needed"'
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    say "NVIDIA GPU found: installing torch (CUDA build)"
    $PIP install torch
  else
    say "no NVIDIA GPU: installing the CPU build of torch"
    $PIP install "torch==${TORCH_CPU_VERSION:-2.13.0}"
  fi
fi

say "installing demucs_dist and its dependencies"
$PIP install -e ".[test]"
say "ready: $VENV"
