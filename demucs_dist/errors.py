"""How a command ends: errors that are the user's to fix as one line (no traceback), SIGTERM and
Ctrl-C as clean stops, and pool workers that die with the process that started them."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """Bad input, a wrong path or an impossible setting, explained in words."""


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler's cancel, a launcher stopping its ranks). Raised in the main
    thread so that `with` blocks clean up on the way out, as for Ctrl-C: worker pools are killed
    rather than left scoring into the output folder. A BaseException: no `except Exception`
    swallows it."""


_handler_pid = 0  # the process that installed the SIGTERM handler (forked children inherit it)


def _raise_terminated(signum: int, _frame: object) -> None:
    # A forked shard-pool worker: die as by default (DataLoader workers set their own: data/loader.py).
    if os.getpid() != _handler_pid:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    # Once: a second SIGTERM kills at once (a rank stuck in C code, e.g. a hung collective, never
    # returns to Python to see the first).
    signal.signal(signum, signal.SIG_DFL)
    raise Terminated()


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a stage's `main`, turning UserError into one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    global _handler_pid
    _handler_pid = os.getpid()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        main(argv)
    except UserError as exc:
        if debug:
            raise
        # One write per line: several ranks share stderr, and print() writes text and newline apart.
        sys.stderr.write(f"error: {exc}\n")
        sys.stderr.flush()
        return 2
    except OSError as exc:  # a path that is missing, not a folder, read-only, on a full disk...
        if debug:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"error: {exc.strerror or exc}{where}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int | None = None) -> None:
    """Pool worker initializer: have the kernel kill this worker when its parent process dies
    (Linux's PR_SET_PDEATHSIG; elsewhere nothing), so that a killed `shard` or `evaluate` leaves
    no worker blocked on its task queue, or scoring into `--out`, for good. `parent`: the pid
    the worker was started from; if it is already gone (it died before the call), exit now."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(1)
