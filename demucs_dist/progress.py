"""Progress that reads well in a terminal and in a job log.

In a terminal: a tqdm bar. Anywhere else (SLURM output files, nohup, tee, a pipe): tqdm's
carriage-return redraws would fill the log, so progress becomes a plain line every
`DEMUCS_DIST_PROGRESS_SECONDS` seconds (default 30) and one at the end:

    epoch 3: 120/480 steps (25%) | loss 0.1810 | 212.4 examples/s | 14.1 steps/min | ETA 25:31
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

from tqdm import tqdm

INTERVAL_ENV = "DEMUCS_DIST_PROGRESS_SECONDS"


def progress_bar(
    total: int | None,
    desc: str,
    unit: str = "it",
    *,
    initial: int = 0,
    disable: bool = False,
    position: int = 0,
    stream: IO[str] | None = None,
) -> Any:
    """A progress counter with tqdm's `update`, `set_postfix` and `close`: a bar on a terminal,
    plain periodic lines otherwise. `disable` silences it (other ranks)."""
    stream = stream or sys.stderr
    if disable or stream.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, position=position,
                    leave=False, dynamic_ncols=True, file=stream)  # fmt: skip
    return LineProgress(total, desc, unit, initial=initial, stream=stream)


class LineProgress:
    """Plain-line progress for logs: at most one line per interval, and a last one at `close`."""

    def __init__(self, total: int | None, desc: str, unit: str, *, initial: int = 0, stream: IO[str]):
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.n = self.start_n = initial
        self.postfix = ""
        self.interval = float(os.environ.get(INTERVAL_ENV) or 30.0)
        self.started = self.last_line = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last_line >= self.interval:
            self.last_line = now
            self._write()

    def refresh(self) -> None:  # tqdm's redraw after `total` changed: the next line shows it
        pass

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " | ".join(f"{key.replace('_', ' ')} {value}" for key, value in values.items())

    def write(self, text: str) -> None:
        """A line of its own on stdout (as tqdm's `write`, which keeps a terminal bar intact)."""
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def close(self) -> None:
        if not self.closed and self.n > self.start_n:
            self._write()
        self.closed = True

    def _write(self) -> None:
        elapsed = max(1e-9, time.monotonic() - self.started)
        rate = (self.n - self.start_n) / elapsed
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total} {self.unit}" if self.total else f" {self.unit}")]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if self.postfix:
            parts.append(self.postfix)
        parts.append(f"{rate * 60:.1f} {self.unit}/min")
        if self.total and rate > 0:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        self.stream.write(" | ".join(parts) + "\n")  # one write: lines of several ranks do not interleave
        self.stream.flush()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
