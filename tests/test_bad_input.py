"""Bad input through the real command line (issue #7): one `error:` line, exit code 2, no traceback.

Each case builds its bad input and runs `demucs-dist ...` through the command line's error handling:
in this process (`cli.main`), or as a real command under `accelerate launch` for the cases that
need ranks. Most errors come before any training.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from helpers import SHARD_ARGS, TINY, cli_here, cpu_env, launch_command, run

from demucs_dist.modelfile import FORMAT

TRAIN = [*TINY, "--global-batch", "8", "--max-device-batch", "2", "--workers", "0", "--timeout", "20"]
SONGS = ["Synth Train 000", "Synth Train 001", "Synth Train 002", "Synth Valid 000"]
VALID = ["--valid-tracks", "Synth Valid 000"]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "demucs_dist.cli", *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def error_lines(stderr: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]", stderr) if line.startswith("error:")]  # \r: progress bars


@pytest.fixture(scope="session")
def small_root(synth_root, tmp_path_factory) -> Path:
    """Four songs of the synthetic MUSDB root (wav layout); cases copy it and damage one file."""
    root = tmp_path_factory.mktemp("small") / "musdb"
    for song in SONGS:
        shutil.copytree(synth_root / "train" / song, root / "train" / song)
    return root


def damaged(root: Path, folder: Path, song: str, change: Callable[[Path], None], stems=("drums.wav",)) -> Path:
    copy = folder / "musdb"
    shutil.copytree(root, copy)
    for stem in stems:
        change(copy / "train" / song / stem)
    return copy


def rewrite(path: Path, audio_of: Callable[[np.ndarray], np.ndarray], rate: int | None = None) -> None:
    audio, original = soundfile.read(path, dtype="float32", always_2d=True)
    soundfile.write(path, audio_of(audio), rate or original, subtype="PCM_16")


def edited_shards(shards: Path, folder: Path, **changes) -> Path:
    """A copy of the shard folder whose manifest has `changes` (the tars are linked, not copied)."""
    copy = folder / "shards"
    shutil.copytree(shards, copy, copy_function=os.symlink)
    manifest = json.loads((shards / "manifest.json").read_text())
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").write_text(json.dumps({**manifest, **changes}))
    return copy


@dataclass
class Case:
    """Bad input: `make(tmp_path, root, shards)` returns (argv, extra env)."""

    make: Callable[[Path, Path, Path], tuple[list, dict]]
    message: str
    launched: bool = False  # under accelerate launch: each of the 2 ranks prints the line


def accelerate_train(args: list) -> list:
    """argv for `accelerate launch` with 2 CPU processes running the trainer (not through cli)."""
    return launch_command(["-m", "demucs_dist.train", *args], 2)


def empty_root(tmp: Path) -> Path:
    (tmp / "empty" / "train").mkdir(parents=True)
    return tmp / "empty"


CASES = {
    "musdb root missing": Case(
        lambda tmp, root, shards: (["shard", "--musdb", tmp / "nowhere", "--is-wav"], {}), "MUSDB root not found"
    ),
    "musdb root empty": Case(
        lambda tmp, root, shards: (["shard", "--musdb", empty_root(tmp), "--is-wav"], {}), "no songs found in"
    ),
    "no official validation song": Case(
        lambda tmp, root, shards: (["shard", "--musdb", root, "--is-wav", "--valid-tracks", "official"], {}),
        "none of musdb's official validation songs",
    ),
    "empty validation list": Case(
        lambda tmp, root, shards: (["shard", "--musdb", root, "--is-wav", "--valid-tracks", ","], {}),
        "(empty list)",
    ),
    "shards without validation songs": Case(
        lambda tmp, root, shards: (
            ["train", "--shards", edited_shards(shards, tmp, valid=[]), "--logdir", tmp / "run", *TRAIN],
            {},
        ),
        "the shards hold no validation songs",
    ),
    "every song shorter than one example": Case(
        lambda tmp, root, shards: (["shard", "--musdb", root, "--is-wav", *VALID, "--segment", "30"], {}),
        "every training song is shorter than one chunk",
    ),
    "training segment longer than the stored chunks": Case(
        lambda tmp, root, shards: (
            ["train", "--shards", shards, "--logdir", tmp / "run", *TRAIN, "--segment", "3"],
            {},
        ),
        "training needs",
    ),
    "stem not at 44.1 kHz": Case(
        lambda tmp, root, shards: (
            [
                "shard",
                "--musdb",
                damaged(root, tmp, SONGS[1], lambda p: rewrite(p, lambda a: a, 22050)),
                "--is-wav",
                *VALID,
                "--out",
                tmp / "out",
            ],
            {},
        ),  # fmt: skip
        "is at 22050 Hz; MUSDB18 and the model use 44100 Hz",
    ),
    "unreadable audio file": Case(
        lambda tmp, root, shards: (
            [
                "shard",
                "--musdb",
                damaged(root, tmp, SONGS[1], lambda p: p.write_bytes(b"not audio" * 100)),
                "--is-wav",
                *VALID,
                "--out",
                tmp / "out",
            ],
            {},
        ),  # fmt: skip
        "drums.wav: Error opening",
    ),
    "model file that is not a model": Case(
        lambda tmp, root, shards: (["info", write(tmp / "notes.th", b"hello")], {}),
        "is not a demucs_dist model file",
    ),
    "model file of another format version": Case(
        lambda tmp, root, shards: (["info", save(tmp / "future.th", {"format": FORMAT, "format_version": 99})], {}),
        "format version 99, this demucs_dist reads version 1",
    ),
    "global batch the world size cannot make": Case(
        lambda tmp, root, shards: (
            accelerate_train(["--shards", shards, "--logdir", tmp / "run", *TRAIN, "--global-batch", "7"]),
            {"DEMUCS_DIST_NPROC": "2"},
        ),
        "--global-batch 7 cannot be split over 2 processes",
        launched=True,
    ),
    "fp16 on CPU": Case(
        lambda tmp, root, shards: (
            ["train", "--shards", shards, "--logdir", tmp / "run", *TRAIN, "--mixed-precision", "fp16"],
            {},
        ),
        "fp16 mixed precision needs a GPU",
    ),
    "world size mismatch": Case(
        lambda tmp, root, shards: (
            ["train", "--shards", shards, "--logdir", tmp / "run", *TRAIN],
            {"DEMUCS_DIST_NPROC": "2"},
        ),
        "launched as 2 processes but running as 1",
    ),
    "shards at another sample rate": Case(
        lambda tmp, root, shards: (
            ["train", "--shards", edited_shards(shards, tmp, samplerate=22050), "--logdir", tmp / "run", *TRAIN],
            {},
        ),
        "the shards are at 22050 Hz but the model works at 44100 Hz",
    ),
    "shards in another source order": Case(
        lambda tmp, root, shards: (
            [
                "train",
                "--shards",
                edited_shards(shards, tmp, sources=["vocals", "other", "bass", "drums"]),
                "--logdir",
                tmp / "run",
                *TRAIN,
            ],
            {},
        ),  # fmt: skip
        "source order",
    ),
}


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def save(path: Path, package: dict) -> Path:
    torch.save(package, path)
    return path


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if not case.launched])
def test_bad_input_is_one_clear_line(name, small_root, synth_shards, tmp_path, monkeypatch, capfd):
    """`demucs-dist` run in this process (a traceback would fail the test; test_debug_shows_the_traceback
    and the launched cases run it as a command)."""
    argv, env = CASES[name].make(tmp_path, small_root, synth_shards)
    for key, value in {"ACCELERATE_USE_CPU": "1", **env}.items():
        monkeypatch.setenv(key, value)
    result = cli_here(argv, capfd)
    errors = error_lines(result.stderr)
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert CASES[name].message in errors[0], errors


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.launched])
def test_bad_input_under_a_launcher_is_one_clear_line_per_rank(name, small_root, synth_shards, tmp_path):
    case = CASES[name]
    argv, env = case.make(tmp_path, small_root, synth_shards)
    result = run(argv, cpu_env(**env), timeout=120)
    # Each rank prints the line and exits 2; the launcher then reports the failed child with its
    # own traceback (torch.distributed.elastic's ChildFailedError), none from demucs_dist's code.
    # The two ranks write to one pipe, so their lines may run together: count the messages.
    assert result.returncode != 0 and result.stderr.count(f"error: {case.message}") == 2, result.stderr[-3000:]
    assert 'demucs_dist/train.py", line' not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = cli("shard", "--musdb", tmp_path / "nowhere", "--is-wav", "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UserError: MUSDB root not found" in result.stderr


def test_mono_silent_and_short_songs_are_converted_normalised_or_skipped(small_root, tmp_path, capfd):
    """Accepted with care: a mono stem is duplicated to stereo, a silent song keeps std 1 (no
    division by zero), a song shorter than one example is skipped and named."""
    root = tmp_path / "musdb"
    shutil.copytree(small_root, root)
    mono, silent, short = SONGS[:3]
    stems = ["mixture.wav", "drums.wav", "bass.wav", "other.wav", "vocals.wav"]
    rewrite(root / "train" / mono / "bass.wav", lambda a: a.mean(1))
    for stem in stems:
        rewrite(root / "train" / silent / stem, np.zeros_like)
        rewrite(root / "train" / short / stem, lambda a: a[: len(a) // 20])  # 0.25 s of 5 s
    out = tmp_path / "shards"
    result = cli_here(["shard", "--musdb", root, "--is-wav", *VALID, "--out", out, *SHARD_ARGS], capfd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipped (shorter than one chunk): {short}" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["songs"]["skipped"] == [short] and short not in manifest["songs"]["train"]
    assert manifest["stats"][silent] == {"mean": 0.0, "std": 1.0, "length": manifest["stats"][silent]["length"]}
    mono_chunks = [
        np.load(io.BytesIO(tar.extractfile(member.name.replace(".json", ".sources.npy")).read()))
        for record in manifest["train"]
        for tar in [tarfile.open(out / record["name"])]
        for member in tar
        if member.name.endswith(".json") and json.loads(tar.extractfile(member).read())["song"] == mono
    ]
    assert mono_chunks and all(np.array_equal(chunk[1, 0], chunk[1, 1]) for chunk in mono_chunks)  # bass: L == R
    verify = cli_here(["shard", "--verify", "--out", out], capfd)
    assert verify.returncode == 0, verify.stdout + verify.stderr
