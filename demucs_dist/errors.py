"""Errors that are the user's to fix: the command line prints them as one line, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """Bad input, a wrong path or an impossible setting, explained in words."""


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a stage's `main`, turning UserError into one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
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
    return 0
