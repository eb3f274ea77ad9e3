"""Multi-process runs whose ranks are forked from a process that has already imported torch.

A rank started by `accelerate launch` spends ~2.5 CPU-seconds importing torch, accelerate and
torch._dynamo (which the first optimizer imports) before it runs a line of demucs_dist, and the
launcher itself ~2 more: on 2 cores that start-up was a third of the suite's time. Tests whose
subject is the training or evaluation, not the launcher, start their ranks here instead: each rank is
a real process, forked from a server that imported those libraries once (one server per pytest
worker), with the environment `accelerate launch` gives a rank (RANK, WORLD_SIZE, MASTER_ADDR, ...),
running `python -m MODULE ARGS` or `python SCRIPT ARGS` as its __main__; the ranks meet through
torch.distributed's env:// rendezvous over gloo, as under any launcher. demucs_dist itself is imported
by each rank, as in a real run. What the launcher does (torchrun's restarts, its SIGTERM to the other
ranks, the process count check) is tested with `accelerate launch` itself (helpers.launch_command).

Like torchrun, when a rank fails the others get SIGTERM (SIGKILL 10 s later); the result's exit code
is the first failing rank's, its stdout and stderr every rank's, interleaved as they were written.

Where a forked rank differs from a launched one: it computes with one thread whatever its
environment says (torch and BLAS read OMP_NUM_THREADS when they load, in the server, as every
test's launch asks anyway), and all ranks share the server's string-hash seed (each process of a
real launch has its own), so a rank that depended on set order would agree with the other ranks
here and not under a launcher: the launched tests (`make demo`'s, the GPU check's, the killed
ranks') are the ones to catch that.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRACE_SECONDS = 10.0  # after a rank fails, before the others are killed
# What `accelerate launch --multi_gpu --mixed_precision no --dynamo_backend no` adds for each rank.
ACCELERATE_ENV = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}


class _Server:
    """The client side: one server process, one request at a time, one JSON line each way."""

    def __init__(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
        self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env=env, text=True)  # fmt: skip
        atexit.register(self.close)

    def request(self, message: dict) -> dict:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        if not reply:
            raise RuntimeError(f"the forking server died (exit code {self.process.wait()})")
        return json.loads(reply)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # type: ignore[union-attr]
            self.process.wait(timeout=30)


_server: _Server | None = None


def run_forked(
    target: list, processes: int | None, env: dict[str, str], timeout: float = 240, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run `target` (["-m", "module", args...] or [script, args...]) in `processes` forked ranks
    with environment `env` plus each rank's launcher variables, or in one process with `env` alone
    (processes None, as `python TARGET`); like `helpers.run`, wait for them and return their exit
    code and output."""
    global _server
    if _server is None or _server.process.poll() is not None:
        _server = _Server()
    target = [str(part) for part in target]
    reply = _server.request(
        {"target": target, "processes": processes, "env": env, "cwd": str(cwd or os.getcwd()), "timeout": timeout}
    )
    if reply["timed_out"]:
        raise subprocess.TimeoutExpired(target, timeout, reply["stdout"], reply["stderr"])
    return subprocess.CompletedProcess(target, reply["returncode"], reply["stdout"], reply["stderr"])


# ---------------------------------------------------------------------------------------------
# The server: imports what a rank imports, then forks ranks on request.


def _preload() -> None:
    import accelerate  # noqa: F401
    import numpy  # noqa: F401
    import soundfile  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401  (the first optimizer would import it in every rank)
    import torch.utils.tensorboard  # noqa: F401
    import webdataset  # noqa: F401

    # Optimizer.add_param_group caches its torch._dynamo wrapper on first use: do it once here.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(target: list[str], env: dict[str, str], cwd: str, output: tuple[int, int]) -> None:
    """In the forked child: become `python TARGET` with `env`, then exit with its exit code."""
    import runpy
    import threading

    for fd in _protocol_fds:
        os.close(fd)
    os.dup2(output[0], 1)
    os.dup2(output[1], 2)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    code = 0
    try:
        if target[0] == "-m":
            sys.argv = [target[1], *target[2:]]  # runpy sets argv[0] to the module's file
            sys.path[0] = cwd  # as `python -m` does
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(target)
            sys.path[0] = str(Path(target[0]).resolve().parent)
            runpy.run_path(target[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    # What the interpreter does on its way out: wait for threads, run atexit, flush.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def _launch(request: dict) -> dict:
    """Fork the request's processes, wait for them, and reply with their exit code and output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pids: list[int] = []
        for env in _environments(request["env"], request["processes"]):
            sys.stdout.flush()  # nothing of the server's own for the child to write out
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os.setpgid(0, pids[0] if pids else 0)  # one process group: the ranks and their workers
                _rank(request["target"], env, request["cwd"], (out.fileno(), err.fileno()))
            try:  # also here, so that the group exists before the next rank joins it
                os.setpgid(pid, pids[0] if pids else pid)
            except OSError:
                pass  # the child did it first
            pids.append(pid)
        codes, timed_out = _wait(pids, request["timeout"])
        out.seek(0)
        err.seek(0)
        return {
            "returncode": next((code for code in codes.values() if code != 0), 0),  # the first failure's
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
            "timed_out": timed_out,
        }


def _environments(env: dict[str, str], processes: int | None) -> list[dict[str, str]]:
    """Each process's environment: `env` for a plain process, plus the launcher's variables for ranks."""
    if processes is None:
        return [env]
    ranks = dict(env, **ACCELERATE_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                 WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes), GROUP_RANK="0")  # fmt: skip
    return [dict(ranks, RANK=str(rank), LOCAL_RANK=str(rank)) for rank in range(processes)]


def _wait(pids: list[int], timeout: float) -> tuple[dict[int, int], bool]:
    """Each process's exit code, in the order they ended, and whether the time ran out. As torchrun
    does, the first failure sends SIGTERM to the others (SIGKILL GRACE_SECONDS later)."""
    group, codes, failed_at = pids[0], {}, None
    deadline = time.monotonic() + timeout
    while len(codes) < len(pids) and time.monotonic() < deadline:
        for pid in set(pids) - set(codes):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        if failed_at is None and any(codes.values()):
            failed_at = time.monotonic()
            _signal_group(group, signal.SIGTERM)
        if failed_at is not None and time.monotonic() > failed_at + GRACE_SECONDS:
            _signal_group(group, signal.SIGKILL)
        time.sleep(0.02)
    timed_out = len(codes) < len(pids)
    _signal_group(group, signal.SIGKILL)  # what is left: a timed-out run, or a rank's stray worker
    for pid in set(pids) - set(codes):
        codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return codes, timed_out


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        pass


_protocol_fds: list[int] = []  # the server's requests and replies, closed in its children


def _serve() -> None:
    _protocol_fds.extend([os.dup(0), os.dup(1)])
    protocol_in, protocol_out = os.fdopen(_protocol_fds[0], "r"), os.fdopen(_protocol_fds[1], "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # the server's own prints go nowhere; the ranks get their own files
    _preload()
    for line in protocol_in:
        reply = _launch(json.loads(line))
        protocol_out.write(json.dumps(reply) + "\n")
        protocol_out.flush()


if __name__ == "__main__":
    _serve()
