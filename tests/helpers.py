"""What several test files share: the tiny model, real multi-process launches, TensorBoard readers.

Imported as `from helpers import ...` (pytest puts the tests folder on sys.path).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
# A Demucs small enough for a CPU test (a few thousand parameters) with 0.5 s examples: as
# keyword arguments, as a model, and as the trainer's options.
TINY_KWARGS = dict(channels=4, depth=3, lstm_layers=1)
TINY_MODEL = [item for name, value in TINY_KWARGS.items() for item in (f"--{name.replace('_', '-')}", str(value))]
# Validation SDR (bss_eval on the validation songs, ~1 s of CPU per song) is off: the tests that
# check it ask for it with --valid-sdr.
TINY = [*TINY_MODEL, "--segment", "0.5", "--shift", "0.25", "--no-valid-sdr"]
# Shard options for tests: 0.5 s segments (+0.25 s shift) and ~2 chunks per shard, so the
# 4 training songs give 8 shards: enough for 2 ranks x 2 workers.
SHARD_ARGS = ["--segment", "0.5", "--shift", "0.25", "--shard-size", "3", "--workers", "1"]


def free_port() -> str:
    """A TCP port nobody listens on now, for one launch's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def cpu_env(processes: int | None = None, **extra: str) -> dict[str, str]:
    """Environment for CPU processes (gloo DDP), one BLAS thread each; DEMUCS_DIST_NPROC is the
    process count the trainer checks it runs with."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", **extra)
    if processes is not None:
        env["DEMUCS_DIST_NPROC"] = str(processes)
    return env


def launch_command(target: list[str], processes: int = 2, launcher: str = "accelerate", cpu_flag: bool = False):
    """argv starting `target` (["-m", "module", ...] or [script, ...]) in `processes` CPU processes.

    launcher: "accelerate" (`accelerate launch --multi_gpu`, or the single-process `--cpu` trap
    with cpu_flag), "torchrun" (one restart allowed), or "python" (one plain process).
    """
    if launcher == "python":
        return [sys.executable, *target]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(processes), "--max_restarts", "1",
                "--master_port", free_port(), *target]  # fmt: skip
    mode = "--cpu" if cpu_flag else "--multi_gpu"
    return [str(BIN / "accelerate"), "launch", mode, "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", free_port(), *target]  # fmt: skip


def run(command: list, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True, timeout=timeout)


def output(result: subprocess.CompletedProcess) -> str:
    """The tail of a finished process's output, for assertion messages."""
    return result.stdout[-3000:] + result.stderr[-3000:]


def scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard scalar, read with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [(e.step, e.value) for e in EventAccumulator(str(logdir)).Reload().Scalars(tag)]


def tiny_model(**overrides):
    """A freshly initialised tiny Demucs (TINY_KWARGS, with `overrides`)."""
    from demucs_dist.model import Demucs

    return Demucs(**{**TINY_KWARGS, **overrides})
