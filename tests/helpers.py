"""What several test files share: the tiny model, real multi-process launches, TensorBoard readers.

Imported as `from helpers import ...` (pytest puts the tests folder on sys.path).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

BIN = Path(sys.executable).parent
# A Demucs small enough for a CPU test (a few thousand parameters) with 0.5 s examples: as
# keyword arguments, as a model, and as the trainer's options.
TINY_KWARGS = dict(channels=4, depth=3, lstm_layers=1)
TINY_MODEL = [item for name, value in TINY_KWARGS.items() for item in (f"--{name.replace('_', '-')}", str(value))]
# Validation SDR (bss_eval on the validation songs, ~1 s of CPU per song) and the audio and
# spectrogram figure of a validation song (~1.5 s with matplotlib's import) are off: the tests that
# check them ask for them with --valid-sdr and --log-audio.
TINY = [*TINY_MODEL, "--segment", "0.5", "--shift", "0.25", "--no-valid-sdr", "--no-log-audio"]
# Shard options for tests: 0.5 s segments (+0.25 s shift) and ~2 chunks per shard, so the
# 4 training songs give 8 shards: enough for 2 ranks x 2 workers.
SHARD_ARGS = ["--segment", "0.5", "--shift", "0.25", "--shard-size", "3", "--workers", "1"]


def build_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """The folder `name`, filled by `build(folder)` once per test run however many pytest-xdist
    workers ask for it (each worker has its own session fixtures): the first builds it under a
    lock, in the temporary folder the workers share; the others wait and reuse it. For costly
    fixtures whose tests only read them."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


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


def run_ranks(target: list, processes: int, env: dict, timeout: float = 240, cwd: Path | None = None):
    """`target` (["-m", "module", ...] or [script, ...]) as `processes` ranks of a real multi-process
    run, or as one plain process (processes 1), forked from a server that has imported torch
    (tests/forked.py: the launcher's and the imports' start-up saved); its CompletedProcess. For
    runs about what training or evaluation does; the launcher's part is tested under `accelerate
    launch` itself (launch_command)."""
    from forked import run_forked

    return run_forked(target, processes, env, timeout, cwd)


def cli_here(argv: list, capfd) -> subprocess.CompletedProcess:
    """`demucs-dist ARGV` in this process, through the command line's error handling (one `error:`
    line and exit code 2 for bad input): for tests about a message, not about a process. Its exit
    code and output (pytest's `capfd`) as a CompletedProcess."""
    from demucs_dist.cli import main

    code = main([str(arg) for arg in argv])
    captured = capfd.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def keep_output(result: subprocess.CompletedProcess, path: Path) -> None:
    """Write a finished process's exit code and output next to `path` (for `build_once` fixtures)."""
    for suffix, text in ((".rc", str(result.returncode)), (".stdout", result.stdout), (".stderr", result.stderr)):
        path.with_suffix(suffix).write_text(text)


def kept_output(path: Path) -> subprocess.CompletedProcess:
    """What `keep_output` wrote, as the CompletedProcess it came from (args left out)."""
    code, stdout, stderr = (path.with_suffix(suffix).read_text() for suffix in (".rc", ".stdout", ".stderr"))
    return subprocess.CompletedProcess([], int(code), stdout, stderr)


def output(result: subprocess.CompletedProcess) -> str:
    """The tail of a finished process's output, for assertion messages."""
    return result.stdout[-3000:] + result.stderr[-3000:]


PROBE = Path(__file__).with_name("train_probe.py")
# global batch 8 over 2 processes holding at most 2 each: gradient accumulation 2
BATCHING = ["--global-batch", "8", "--max-device-batch", "2", "--workers", "1", "--timeout", "60"]
# The options of the uninterrupted 2-epoch run (conftest's `two_epochs`) and of every run whose
# weights are compared with it: 4 optimizer steps an epoch, a checkpoint every 2, two averages.
# The reference run alone adds --valid-sdr and --log-audio (what it logs is checked): validation
# draws no random numbers, so the weights are the same with or without them.
REFERENCE_RUN = [*TINY, *BATCHING, "--ema", "0.5", "0.9", "--checkpoint-every", "2"]


def run_probe(out: Path, shards: Path, logdir: Path, *extra: str, processes: int = 2, env: dict | None = None,
              check: bool = True, launcher: str = "forked"):  # fmt: skip
    """Train with REFERENCE_RUN's options (then `extra`) through tests/train_probe.py, which saves each
    rank's final state, in forked ranks (run_ranks; one process: a plain one) or under `accelerate
    launch` (launcher "accelerate"); returns (CompletedProcess, [state of each rank]), no states if
    it failed."""
    out.mkdir(parents=True, exist_ok=True)
    args = [PROBE, out, "--shards", shards, "--logdir", logdir, *REFERENCE_RUN, *extra]
    env = cpu_env(processes, DEMUCS_DIST_PROGRESS_SECONDS="0", **(env or {}))
    if launcher == "forked":
        result = run_ranks(args, processes, env)
    else:
        result = run(launch_command(args, processes, launcher=launcher), env)
    if check:
        assert result.returncode == 0, output(result)
    if result.returncode != 0:
        return result, []
    import torch

    return result, [torch.load(out / f"rank{rank}.pt") for rank in range(processes)]


def scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard scalar, read with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [(e.step, e.value) for e in EventAccumulator(str(logdir)).Reload().Scalars(tag)]


def tiny_model(**overrides):
    """A freshly initialised tiny Demucs (TINY_KWARGS, with `overrides`)."""
    from demucs_dist.model import Demucs

    return Demucs(**{**TINY_KWARGS, **overrides})
