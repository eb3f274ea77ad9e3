"""Hostile and clumsy input to the shard writer, the evaluation and the scorers (issue 13).

Each test plays one mistake or one hostile input on real files and real processes: the program
must refuse it in one line (exit 2, no traceback), never reuse stale results, never delete files
it did not write, and never leave a process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from helpers import SHARD_ARGS, output, run

from demucs_dist import SAMPLERATE
from demucs_dist.data.shard import main as shard_main
from demucs_dist.errors import UserError

TRAIN_SONG = "Synth Train 001"


@pytest.fixture
def musdb_copy(synth_root, tmp_path) -> Path:
    """A private copy of the session's synthetic MUSDB root (wav layout), free to damage."""
    return Path(shutil.copytree(synth_root, tmp_path / "musdb"))


def shard_args(root: Path, out: Path) -> list[str]:
    return ["--musdb", str(root), "--is-wav", "--out", str(out), *SHARD_ARGS]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    """The pids still alive after up to `seconds` (a bound far above normal, to catch a hang)."""
    deadline = time.monotonic() + seconds
    while [p for p in pids if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# shard


def test_shard_refuses_a_foreign_webdataset_folder_and_keeps_its_files(musdb_copy, tmp_path):
    foreign = tmp_path / "theirs"
    (foreign / "train").mkdir(parents=True)
    (foreign / "train" / "000000.tar").write_bytes(b"their shard")
    (foreign / "train" / "000042.tar").write_bytes(b"another of their shards")
    (foreign / "manifest.json").write_text(json.dumps({"shards": ["train/000000.tar"]}))
    before = files_of(foreign)

    result = run([sys.executable, "-m", "demucs_dist.data.shard", *shard_args(musdb_copy, foreign)], timeout=120)
    assert result.returncode == 2, output(result)
    assert "not written by demucs-dist" in result.stderr and str(foreign) in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert files_of(foreign) == before

    file_out = tmp_path / "a_file"
    file_out.write_text("not a folder")
    with pytest.raises(UserError, match="is a file, not a folder"):
        shard_main(shard_args(musdb_copy, file_out))


def test_shard_rerun_deletes_only_the_shards_it_wrote(musdb_copy, tmp_path):
    out = tmp_path / "ours"
    shard_main(shard_args(musdb_copy, out))
    stray = {out / "train" / "000900.tar": b"someone else's", out / "train" / "notes.txt": b"mine"}
    for path, data in stray.items():
        path.write_bytes(data)
    # Fewer shards this time (bigger ones): our stale shards go, the stray files stay.
    shard_main([*shard_args(musdb_copy, out), "--shard-size", "100"])
    manifest = json.loads((out / "manifest.json").read_text())
    ours = {r["name"] for r in manifest["train"] + manifest["valid"]}
    tars = {str(p.relative_to(out)) for p in out.rglob("*.tar")}
    assert tars == ours | {"train/000900.tar"}
    assert all(path.read_bytes() == data for path, data in stray.items())


def write_stem(root: Path, song: str, stem: str, audio: np.ndarray) -> Path:
    path = root / "train" / song / f"{stem}.wav"
    soundfile.write(path, audio, SAMPLERATE, subtype="FLOAT")
    return path


def test_shard_refuses_nan_audio_empty_files_and_missing_stems(musdb_copy, tmp_path):
    bass = musdb_copy / "train" / TRAIN_SONG / "bass.wav"
    original = bass.read_bytes()
    audio, _ = soundfile.read(bass, dtype="float32", always_2d=True)
    audio[1000:1010] = np.nan
    write_stem(musdb_copy, TRAIN_SONG, "bass", audio)
    out = tmp_path / "shards"
    result = run([sys.executable, "-m", "demucs_dist.data.shard", *shard_args(musdb_copy, out)], timeout=120)
    assert result.returncode == 2, output(result)
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]  # one line (after progress bars)
    assert TRAIN_SONG in line and str(bass) in line and "NaN" in line
    assert not (out / "manifest.json").exists()

    write_stem(musdb_copy, TRAIN_SONG, "bass", audio[:0])
    with pytest.raises(UserError, match=f"{TRAIN_SONG}.*bass.wav has no samples"):
        shard_main(shard_args(musdb_copy, out))

    bass.unlink()
    with pytest.raises(UserError, match=f"{TRAIN_SONG}.*bass.wav missing"):
        shard_main(shard_args(musdb_copy, out))

    bass.write_bytes(original)
    shard_main(shard_args(musdb_copy, out))  # fixed: the run goes through

    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    for path in out.rglob("*.json"):
        json.loads(path.read_text(), parse_constant=refuse)


def test_shard_rerun_rewrites_the_shards_of_a_changed_song(musdb_copy, tmp_path):
    out = tmp_path / "shards"
    shard_main(shard_args(musdb_copy, out))
    before = files_of(out)
    # The song's audio changes (same size, same names): a fixed or replaced recording.
    drums = musdb_copy / "train" / TRAIN_SONG / "drums.wav"
    audio, _ = soundfile.read(drums, dtype="int16", always_2d=True)
    soundfile.write(drums, audio // 2, SAMPLERATE, subtype="PCM_16")
    shard_main(shard_args(musdb_copy, out))
    after = files_of(out)

    fresh = tmp_path / "fresh"
    shard_main(shard_args(musdb_copy, fresh))
    assert after == files_of(fresh)  # every shard as a first run writes it
    manifest = json.loads((out / "manifest.json").read_text())
    with_song = {r["name"] for r in manifest["train"] if TRAIN_SONG in r["songs"]}
    without = {r["name"] for r in manifest["train"]} - with_song
    assert with_song and all(after[name] != before[name] for name in with_song)
    assert all(after[name] == before[name] for name in without)  # the others were skipped, not rewritten


def test_killed_shard_leaves_no_worker_behind(musdb_copy, tmp_path):
    out = tmp_path / "shards"
    args = [*shard_args(musdb_copy, out), "--shard-size", "1.5", "--workers", "2"]  # 16 small train shards
    process = subprocess.Popen(
        [sys.executable, "-m", "demucs_dist.data.shard", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not workers and process.poll() is None and time.monotonic() < deadline:
            if list((out / "train").glob("*.tar.json")):
                workers = children_of(process.pid)
            time.sleep(0.01)
        assert workers, "no worker seen before the run ended"
        process.kill()
        process.wait()
        assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
        assert wait_gone(workers, 30) == [], "pool workers outlived the killed shard process"
    finally:
        process.kill()
        kill_all(workers)
