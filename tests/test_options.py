"""Bad option values are refused before any work, in one line, from the ranges the configuration
dataclasses declare (config.option(minimum=, maximum=); floats must be finite)."""

from __future__ import annotations

import pytest

from demucs_dist.errors import run_main

# (subcommand module, argv, what the one line says)
BAD_OPTIONS = [
    ("train", ["--max-device-batch", "0"], "--max-device-batch 0: must be at least 1"),
    ("train", ["--global-batch", "-8"], "--global-batch -8: must be at least 1"),
    ("train", ["--segment", "nan"], "--segment nan: must be a finite number"),
    ("train", ["--segment", "0"], "--segment 0.0: must be at least 0.01"),
    ("train", ["--lr", "nan"], "--lr nan: must be a finite number"),
    ("train", ["--lr", "1e30"], "--lr 1e+30: must be at most 1"),
    ("train", ["--lr", "0"], "--lr 0.0: must be at least 1e-12"),
    ("train", ["--workers", "-1"], "--workers -1: must be at least 0"),
    ("train", ["--valid-every", "0"], "--valid-every 0: must be at least 1"),
    ("train", ["--epochs", "0"], "--epochs 0: must be at least 1"),
    ("train", ["--repeat", "0"], "--repeat 0: must be at least 1"),
    ("train", ["--keep-checkpoints", "-1"], "--keep-checkpoints -1: must be at least 1"),
    ("train", ["--keep-checkpoints", "0"], "--keep-checkpoints 0: must be at least 1"),
    ("train", ["--checkpoint-every", "-2"], "--checkpoint-every -2: must be at least 0"),
    ("train", ["--checkpoint-minutes", "inf"], "--checkpoint-minutes inf: must be a finite number"),
    ("train", ["--max-nonfinite", "0"], "--max-nonfinite 0: must be at least 1"),
    ("train", ["--timeout", "0"], "--timeout 0.0: must be at least 1"),
    ("train", ["--log-every", "0"], "--log-every 0: must be at least 1"),
    ("train", ["--ema", "0.9", "1.5"], "--ema 1.5: must be at most 1"),
    ("train", ["--ema", "0"], "--ema 0.0: must be at least 1e-09"),
    ("train", ["--channels", "0"], "--channels 0: must be at least 1"),
    ("train", ["--depth", "-1"], "--depth -1: must be at least 1"),
    ("train", ["--lstm-layers", "-1"], "--lstm-layers -1: must be at least 0"),
    ("train", ["--valid-segment", "-1"], "--valid-segment -1.0: must be at least 0"),
    ("evaluate", ["--shifts", "-1"], "--shifts -1: must be at least 0"),
    ("evaluate", ["--overlap", "1"], "--overlap 1.0: must be at most 0.9"),
    ("evaluate", ["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    ("separate", ["song.wav", "--shifts", "-1"], "--shifts -1: must be at least 0"),
    ("separate", ["song.wav", "--segment", "nan"], "--segment nan: must be a finite number"),
    ("synth", ["--seconds", "0"], "--seconds 0.0: must be at least 0.1"),
    ("synth", ["--train", "-3"], "--train -3: must be at least 0"),
    ("train", ["--shift", "-1"], "--shift -1.0: must be at least 0"),
    ("train", ["--remix-group", "0"], "--remix-group 0: must be at least 1"),
    ("evaluate", ["--workers", "-2"], "--workers -2: must be at least 0"),
    ("evaluate", ["--timeout", "0"], "--timeout 0.0: must be at least 1"),
    ("shard", ["--segment", "nan"], "--segment nan: must be a finite number"),
    ("shard", ["--segment", "0"], "--segment 0.0: must be at least 0.01"),
    ("shard", ["--shift", "-0.5"], "--shift -0.5: must be at least 0"),
    ("shard", ["--stride", "-1"], "--stride -1.0: must be at least 0"),
    ("shard", ["--crops", "-1"], "--crops -1: must be at least 0"),
    ("shard", ["--chunks-per-minute", "0"], "--chunks-per-minute 0.0: must be at least 0.001"),
    ("shard", ["--shard-size", "0"], "--shard-size 0.0: must be at least 0.001"),
    ("shard", ["--workers", "0"], "--workers 0: must be at least 1"),
    ("score", ["--threads", "-1"], "--threads -1: must be at least 0"),
    ("score", ["--workers", "-1"], "--workers -1: must be at least 0"),
]


@pytest.mark.parametrize(("stage", "argv", "message"), BAD_OPTIONS, ids=[" ".join(c[1]) for c in BAD_OPTIONS])
def test_bad_option_is_one_line_before_any_work(stage, argv, message, capsys, tmp_path, monkeypatch):
    import importlib

    monkeypatch.chdir(tmp_path)  # nothing may be written: a stray file would show here
    module = importlib.import_module({"train": "demucs_dist.train", "evaluate": "demucs_dist.evaluate",
                                      "separate": "demucs_dist.separate",
                                      "synth": "demucs_dist.data.synth", "shard": "demucs_dist.data.shard",
                                      "score": "demucs_dist.score"}[stage])  # fmt: skip
    assert run_main(module.main, argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []
