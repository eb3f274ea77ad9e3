"""Exponential moving averages of the weights (--ema): the arithmetic, and a best.th that says
which weights it holds. Their exact resume after a SIGKILL is checked in test_reliability.py."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from demucs_dist import SOURCES
from demucs_dist.ema import EMA
from demucs_dist.modelfile import load_model, read_model_file


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


@pytest.mark.slow
def test_best_th_says_which_weights_it_holds_and_evaluate_and_separate_take_it(two_epochs, synth_root, tmp_path):
    """conftest's `two_epochs` trains with --ema 0.5 0.9 (its exact resume after a SIGKILL:
    test_reliability.py): each average is validated, and best.th holds the best of them or the raw
    weights, says which, and is what evaluate and separate take."""
    work, result, _ = two_epochs
    assert "ema0.5" in result.stdout and "ema0.9" in result.stdout  # the epoch lines' validation losses
    best = work / "run" / "best.th"
    assert read_model_file(best)["info"]["weights"] in {"raw", "ema0.5", "ema0.9"}
    assert load_model(best).kwargs["channels"] == 4
    from demucs_dist.evaluate import main as evaluate_main
    from demucs_dist.separate import main as separate_main

    evaluate_main(["--model", str(best), "--musdb", str(synth_root), "--is-wav", "--out", str(tmp_path / "eval"),
                   "--shifts", "1", "--no-progress"])  # fmt: skip
    assert (tmp_path / "eval" / "results.json").is_file()
    (song,) = sorted((synth_root / "test").iterdir())
    separate_main([str(song / "mixture.wav"), "--model", str(best), "--out", str(tmp_path / "sep"), "--shifts", "1",
                   "--no-progress"])  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "sep" / "mixture").iterdir()) == [f"{s}.wav" for s in sorted(SOURCES)]
