"""Small file helpers: write so that a crash never leaves a half-written file behind; lock a folder
so that two runs never write it at once."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from .errors import UserError

LOCK_NAME = ".lock"  # in every folder a run writes (train --logdir, shard/evaluate/score --out)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it over `path` in one step.

    A reader sees either the old file or the whole new one, never a partial one. On an exception
    the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # flush to disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MB blocks (shards and model files are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class FolderLock:
    """An exclusive lock on a folder a run writes, so that two runs never write one folder.

    flock on `<folder>/.lock`, released by the kernel when the process dies, so a killed run never
    leaves a stale lock; the file names the holder (pid and host) for the line the second run
    prints. `what` names the run ("training"), `option` the option to change ("--logdir").
    """

    def __init__(self, folder: str | os.PathLike, what: str, option: str):
        self.path = Path(folder) / LOCK_NAME
        self.what, self.option = what, option
        self._file: IO[str] | None = None

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(
                f"{self.path.parent} is in use by a running {self.what} ({holder}); use another {self.option}"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *_) -> None:
        self.release()


def check_folder_is_ours(folder: Path, option: str, is_ours: Callable[[Path], bool], not_ours: str) -> None:
    """UserError (one line) unless `folder`, the value of `option`, is new, empty but for a lock
    (a run killed before it wrote anything), or `is_ours`: a folder a run writes and deletes in
    must never be another program's. `not_ours` says what is missing, for the error."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder} is a file, not a folder")
    if folder.is_dir() and any(path.name != LOCK_NAME for path in folder.iterdir()) and not is_ours(folder):
        raise UserError(
            f"{option} {folder} is not empty and {not_ours}: refusing to write or delete anything in it; "
            "choose a new or empty folder"
        )
