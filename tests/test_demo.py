"""`make demo`'s pipeline (launch/demo.sh) end to end at a smaller size: synth -> shard -> 2-process
training -> 2-process evaluation, and the trained model beats the mixture baseline on every source."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from demucs_dist import SOURCES

pytestmark = pytest.mark.slow  # real multi-process runs: `make test-fast` skips them

ROOT = Path(__file__).parents[1]
# A small demo: 4 training songs of 12 s, 1 test song, 18 optimizer steps at 3x the demo's learning
# rate (27 steps at its own 1e-3 gained less: 2.7 dB on 'other', against 3.8 dB).
SMALL = dict(DEMO_TRAIN_SONGS="4", DEMO_TEST_SONGS="1", DEMO_SECONDS="12", DEMO_EPOCHS="2", DEMO_REPEAT="4",
             DEMO_LR="3e-3")  # fmt: skip
# The full demo must gain 3 dB on every source; this run gained 3.8-6.9 dB when measured, so 2 dB
# leaves room for another machine's rounding without passing an untrained model.
MIN_GAIN_DB = 2.0


@pytest.mark.first
def test_demo_pipeline_beats_the_mixture_baseline(tmp_path):
    env = dict(os.environ, DEMO_DIR=str(tmp_path), NPROC="2", VENV=str(Path(os.sys.executable).parents[1]), **SMALL)
    result = subprocess.run(["bash", "launch/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    model = json.loads((tmp_path / "eval/model/results.json").read_text())["scores"]
    baseline = json.loads((tmp_path / "eval/mixture/results.json").read_text())["scores"]
    gains = {s: model[s]["SDR"] - baseline[s]["SDR"] for s in SOURCES}
    assert all(gain >= MIN_GAIN_DB for gain in gains.values()), gains
    untrained = json.loads((tmp_path / "eval/untrained/results.json").read_text())["scores"]
    assert model["All"]["SDR"] > untrained["All"]["SDR"], (model["All"], untrained["All"])
    assert "SDR gain over untrained model" in result.stdout
    # The table it prints holds the model's rows and the baseline's SDR row.
    assert "SDR (mixture baseline)" in result.stdout and "demo model" in result.stdout
    assert (tmp_path / "runs/demo/best.th").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "runs/demo").iterdir())
