"""Progress in a job log: plain lines, at most one per interval, never a carriage return."""

from __future__ import annotations

import io

from demucs_dist import progress
from demucs_dist.progress import LineProgress, progress_bar


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_log_gets_one_plain_line_per_interval_and_one_at_the_end(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    monkeypatch.setenv(progress.INTERVAL_ENV, "30")
    log = io.StringIO()  # not a terminal, as a SLURM output file
    bar = progress_bar(100, "epoch 1", "steps", stream=log)
    assert isinstance(bar, LineProgress)
    for _ in range(100):  # a step every 2 s: 200 s in all
        clock.now += 2.0
        bar.update()
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 200 // 30 + 1  # one per 30 s, and the last one
    assert lines[0].startswith("epoch 1: 15/100 steps (15%)") and "ETA" in lines[0]
    assert lines[-1].startswith("epoch 1: 100/100 steps (100%)")


def test_a_terminal_gets_a_bar():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = progress_bar(10, "shards", "shard", stream=Terminal())
    assert not isinstance(bar, LineProgress)
    bar.close()
