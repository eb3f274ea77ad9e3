"""Runs whose processes are forked from a server that has already imported torch.

A rank started by `accelerate launch` spends ~2.5 CPU-seconds importing torch, accelerate and
torch._dynamo (which the first optimizer imports) before it runs a line of demucs_dist, and the
launcher itself ~2 more: on 2 cores that start-up was a third of the suite's time. Tests whose
subject is what training or evaluation computes, not the launcher, start their processes here
instead: each is a real process, forked from a server that imported those libraries once (one
server per pytest worker), running `python -m MODULE ARGS` or `python SCRIPT ARGS` as its
__main__. Ranks get the variables of a launch (RANK, WORLD_SIZE, MASTER_ADDR, ...) and meet
through torch.distributed's env:// rendezvous over gloo, as under any launcher; demucs_dist itself
is imported by each process, as in a real run. What the launcher does (torchrun's restarts, its
SIGTERM to the other ranks, the process count check, `launch/*.sh`) is tested under the real one
(helpers.launch_command).

Like torchrun, when a rank fails the others get SIGTERM (SIGKILL GRACE_SECONDS later). The result's
stdout and stderr hold every rank's, interleaved as written; its exit code is the first failing
rank's own (2, 143, -9, ...), where `accelerate launch` exits 1 for any failure.

Where a forked process differs from a launched one, so that the launched tests (`make demo`'s,
the GPU check's, the killed ranks') are the ones to catch what depends on these:
- What Python and the libraries read when they start or load comes from the server: one compute
  thread whatever the request's environment says (torch and BLAS read OMP_NUM_THREADS and
  OPENBLAS_NUM_THREADS when they load; every test's launch asks for one anyway), PYTHON* and
  TORCH_* variables, warnings already shown once, the string-hash seed, numpy's global random
  state and multiprocessing's authkey, all the same in every rank and every run (a rank whose
  work depended on set order would agree with the others here and not under a launcher).
- Rank 0 hosts the rendezvous store, as in a plain env:// launch (srun); torchrun's agent hosts it
  under `accelerate launch` (TORCHELASTIC_USE_AGENT_STORE), which matters only after a restart.
- No interpreter teardown: threads are joined, atexit handlers run and stdout/stderr are flushed,
  but a file left unclosed keeps its unwritten buffer; Ctrl-C gives exit code 1, not -2.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRACE_SECONDS = 10.0  # after a rank fails, before the others are killed
# The variables `accelerate launch --multi_gpu --mixed_precision no --dynamo_backend no` sets that
# accelerate or demucs_dist read (besides the ranks' RANK, WORLD_SIZE, MASTER_ADDR, ...).
ACCELERATE_ENV = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_forked(
    target: list, processes: int, env: dict[str, str], timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run `target` (["-m", "module", args...] or [script, args...]) with environment `env` in
    `processes` forked ranks, each with its launcher variables added, or with processes 1 in one
    plain process (`python TARGET`: no launcher variables); wait for them and return their exit
    code and output, as subprocess.run does (TimeoutExpired after `timeout` seconds)."""
    global _server
    if _server is None or _server.process.poll() is not None:
        _server = _ServerHandle()
    target = [str(part) for part in target]
    request = {"target": target, "processes": processes, "env": {k: str(v) for k, v in env.items()},
               "cwd": str(cwd or os.getcwd()), "timeout": timeout}  # fmt: skip
    reply = _server.request(request, wait=timeout + GRACE_SECONDS + 30)
    if reply["timed_out"]:
        raise subprocess.TimeoutExpired(target, timeout, reply["stdout"], reply["stderr"])
    return subprocess.CompletedProcess(target, reply["returncode"], reply["stdout"], reply["stderr"])


class _ServerHandle:
    """The test's side of the server: one request at a time, one JSON line each way."""

    def __init__(self) -> None:
        env = dict(os.environ, **ONE_THREAD)
        self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env=env, text=True)  # fmt: skip
        atexit.register(self.close)

    def request(self, message: dict, wait: float) -> dict:
        """Send `message` and return the reply. A request that does not end normally (no reply in
        `wait` seconds, the test interrupted) takes the server and its processes with it, so that
        a late reply never answers the next request."""
        assert self.process.stdin and self.process.stdout
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
            ready, _, _ = select.select([self.process.stdout], [], [], wait)
            reply = self.process.stdout.readline() if ready else ""
            if not reply:
                raise RuntimeError(f"the forking server gave no reply (exit code {self.process.poll()})")
            return json.loads(reply)
        except BaseException:
            self.process.kill()  # its processes get SIGKILL from the kernel (PR_SET_PDEATHSIG)
            self.process.wait()
            raise

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # type: ignore[union-attr]
            self.process.wait(timeout=30)


_server: _ServerHandle | None = None


# ---------------------------------------------------------------------------------------------
# The server: imports what a rank imports, then forks processes on request.

_protocol_fds: list[int] = []  # the server's requests and replies, closed in its children


def _serve() -> None:
    _protocol_fds.extend([os.dup(0), os.dup(1)])
    protocol_in, protocol_out = os.fdopen(_protocol_fds[0], "r"), os.fdopen(_protocol_fds[1], "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # the server's own prints go nowhere; its children get their own files
    _preload()
    # fork copies only the calling thread: a thread started by an import would be missing in the children
    assert len(os.listdir("/proc/self/task")) == 1, "the forking server must have one thread"
    for line in protocol_in:
        reply = _serve_request(json.loads(line))
        protocol_out.write(json.dumps(reply) + "\n")
        protocol_out.flush()


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


def _serve_request(request: dict) -> dict:
    """Fork the request's processes, wait for them, and reply with their exit code and output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pids: list[int] = []
        server = os.getpid()
        try:
            for env in _environments(request["env"], request["processes"]):
                sys.stdout.flush()  # nothing of the server's own for a child to write out
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    try:
                        os.setpgid(0, pids[0] if pids else 0)  # one group: the ranks and their workers
                        _become(request["target"], env, request["cwd"], (out.fileno(), err.fileno()), server)
                    finally:
                        os._exit(1)  # never back into the server's frames
                try:  # also here, so that the group exists before the next rank joins it
                    os.setpgid(pid, pids[0] if pids else pid)
                except OSError:
                    pass  # the child did it first
                pids.append(pid)
            codes, timed_out = _wait(pids, request["timeout"])
        finally:
            _signal_group(pids, signal.SIGKILL)  # what is left: a stray worker, an interrupted server
        out.seek(0)
        err.seek(0)
        return {
            "returncode": next((code for code in codes.values() if code != 0), 0),  # the first failure's
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
            "timed_out": timed_out,
        }


def _environments(env: dict[str, str], processes: int) -> list[dict[str, str]]:
    """Each process's environment: `env` for one plain process, plus the launcher's variables for ranks."""
    from helpers import free_port  # (tests/ is this script's folder)

    if processes == 1:
        return [env]
    ranks = dict(env, **ACCELERATE_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(),
                 WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes), GROUP_RANK="0")  # fmt: skip
    return [dict(ranks, RANK=str(rank), LOCAL_RANK=str(rank)) for rank in range(processes)]


def _become(target: list[str], env: dict[str, str], cwd: str, output: tuple[int, int], server: int) -> None:
    """In a forked child: become `python TARGET` with `env`, then exit with its exit code."""
    import runpy
    import threading

    from demucs_dist.errors import die_with_parent

    die_with_parent(server)
    for fd in _protocol_fds:
        os.close(fd)
    os.dup2(output[0], 1)
    os.dup2(output[1], 2)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
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
    # What the interpreter does on its way out: join threads, run atexit, flush.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def _wait(pids: list[int], timeout: float) -> tuple[dict[int, int], bool]:
    """Each process's exit code, in the order they ended, and whether the time ran out. As torchrun
    does, the first failure sends SIGTERM to the others (SIGKILL GRACE_SECONDS later)."""
    codes: dict[int, int] = {}
    failed_at = None
    deadline = time.monotonic() + timeout
    while len(codes) < len(pids) and time.monotonic() < deadline:
        for pid in set(pids) - set(codes):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        if failed_at is None and any(codes.values()):
            failed_at = time.monotonic()
            _signal_group(pids, signal.SIGTERM)
        if failed_at is not None and time.monotonic() > failed_at + GRACE_SECONDS:
            _signal_group(pids, signal.SIGKILL)
        time.sleep(0.02)
    timed_out = len(codes) < len(pids)
    _signal_group(pids, signal.SIGKILL)  # a timed-out run, or a rank's stray worker
    for pid in set(pids) - set(codes):
        codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return codes, timed_out


def _signal_group(pids: list[int], signum: int) -> None:
    """Signal the process group of the forked processes `pids` (the first one's): them and their workers."""
    try:
        if pids:
            os.killpg(pids[0], signum)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    _serve()
