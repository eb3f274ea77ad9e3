#!/usr/bin/env bash
# make demo: the whole pipeline on a generated MUSDB-format dataset, on every local GPU or 2 CPU processes:
#   synth -> shard -> train (accelerate launch) -> evaluate (accelerate launch) -> results table vs baseline.
# Everything goes to demo/ (DEMO_DIR). Rerunning resumes: finished training and scored songs are kept.
# Sizes are chosen to finish in ~15 minutes on 2 CPU cores; see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${VENV:-.venv}/bin
demo=${DEMO_DIR:-demo}
# Sizes (the test suite runs this script smaller through these variables).
train_songs=${DEMO_TRAIN_SONGS:-10} test_songs=${DEMO_TEST_SONGS:-3} seconds=${DEMO_SECONDS:-20}
epochs=${DEMO_EPOCHS:-12} repeat=${DEMO_REPEAT:-2} lr=${DEMO_LR:-1e-3}
# The demo model: Demucs v1 at a size a CPU trains in minutes (the paper's is --channels 100 --depth 6).
read -r -a model <<< "${DEMO_MODEL:---channels 16 --depth 5 --lstm-layers 1}"
step() { printf '\n== %s ==\n' "$*"; }

step "1/5 synthetic MUSDB18-format dataset"
"$bin/demucs-dist" synth --out "$demo/musdb" --train "$train_songs" --valid 2 --test "$test_songs" --seconds "$seconds" --seed 0

step "2/5 shards"
"$bin/demucs-dist" shard --musdb "$demo/musdb" --is-wav --out "$demo/shards" --segment 2 --shard-size 16 --workers 2

step "3/5 training"
launch/train.sh --shards "$demo/shards" --logdir "$demo/runs/demo" "${model[@]}" --segment 2 \
  --epochs "$epochs" --repeat "$repeat" --valid-every 3 --global-batch 16 --max-device-batch 8 --workers 1 --lr "$lr"

step "4/5 evaluation: shift trick on the test songs, museval's metrics"
# Two floors: the mixture as every estimate (no separation at all), and the same model untrained
# (its initial weights, init.th, through the same pipeline): the gain over it is what training bought.
launch/evaluate.sh --baseline mixture --musdb "$demo/musdb" --is-wav --out "$demo/eval/mixture" --label "mixture baseline"
launch/evaluate.sh --model "$demo/runs/demo/init.th" --musdb "$demo/musdb" --is-wav --out "$demo/eval/untrained" \
  --shifts 2 --label "untrained model"
launch/evaluate.sh --model "$demo/runs/demo/best.th" --musdb "$demo/musdb" --is-wav --out "$demo/eval/model" \
  --shifts 2 --label "demo model" --logdir "$demo/runs/demo" \
  --compare "$demo/eval/untrained/results.json" "$demo/eval/mixture/results.json"

step "5/5 done"
echo "results: $demo/eval/model/results.md"
echo "TensorBoard: $bin/tensorboard --logdir $demo/runs"
