"""Exponential moving averages of the weights (--ema): the arithmetic, exact resume after a
SIGKILL on every rank, and a best.th that says which weights it holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY, cpu_env, launch_command, output, run, tiny_model

from demucs_dist import SOURCES
from demucs_dist.ema import EMA
from demucs_dist.modelfile import load_model, read_model_file

PROBE = Path(__file__).with_name("train_probe.py")
OPTIONS = ["--global-batch", "8", "--max-device-batch", "2", "--workers", "0", "--timeout", "30", "--no-log-audio",
           "--epochs", "1", "--repeat", "3", "--checkpoint-every", "2", "--ema", "0.5", "0.9"]  # fmt: skip


def test_update_is_the_moving_average_and_swapping_restores_the_weights():
    model = tiny_model(depth=2)
    ema = EMA(model, [0.9])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    averaged = ema.state_dict()["ema0.9"]
    for name, value in averaged.items():
        assert torch.allclose(value, 0.9 * before[name] + 0.1 * model.state_dict()[name]), name
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_in(model, "ema0.9"):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in averaged.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in raw.items())


def probe(shards: Path, out: Path, logdir: Path, env: dict | None = None):
    out.mkdir(parents=True, exist_ok=True)
    args = [PROBE, out, "--shards", shards, "--logdir", logdir, *TINY, *OPTIONS]
    return run(launch_command(args, 2), cpu_env(2, **(env or {})), timeout=200)


@pytest.mark.slow
def test_averages_resume_exactly_after_a_sigkill_on_every_rank(synth_shards, synth_root, tmp_path):
    whole = probe(synth_shards, tmp_path / "whole", tmp_path / "run-whole")
    assert whole.returncode == 0, output(whole)
    killed = probe(synth_shards, tmp_path / "k", tmp_path / "run", env={"DEMUCS_DIST_FAULT_KILL": "1:3"})
    assert killed.returncode != 0 and "rank 1 kills itself at step 3" in killed.stderr, output(killed)
    resumed = probe(synth_shards, tmp_path / "resumed", tmp_path / "run")
    assert resumed.returncode == 0 and "step-00000002 (epoch 0, step 2)" in resumed.stdout, output(resumed)

    reference = torch.load(tmp_path / "whole" / "rank0.pt")
    assert set(reference["ema"]) == {"ema0.5", "ema0.9"}
    for rank in (0, 1):
        state = torch.load(tmp_path / "resumed" / f"rank{rank}.pt")
        for name, averages in reference["ema"].items():
            for key, value in averages.items():
                assert torch.equal(state["ema"][name][key], value), (rank, name, key)

    best = tmp_path / "run" / "best.th"
    assert read_model_file(best)["info"]["weights"] in {"raw", "ema0.5", "ema0.9"}
    assert "epoch 1/1" in resumed.stdout and "ema0.5" in resumed.stdout  # each average validated
    assert load_model(best).kwargs["channels"] == 4
    # ... and it is what evaluate and separate take, whichever weights it holds.
    from demucs_dist.evaluate import main as evaluate_main
    from demucs_dist.separate import main as separate_main

    evaluate_main(["--model", str(best), "--musdb", str(synth_root), "--is-wav", "--out", str(tmp_path / "eval"),
                   "--shifts", "1", "--no-progress"])  # fmt: skip
    assert (tmp_path / "eval" / "results.json").is_file()
    (song,) = sorted((synth_root / "test").iterdir())
    separate_main([str(song / "mixture.wav"), "--model", str(best), "--out", str(tmp_path / "sep"), "--shifts", "1",
                   "--no-progress"])  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "sep" / "mixture").iterdir()) == [f"{s}.wav" for s in sorted(SOURCES)]
