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
from helpers import SHARD_ARGS, cli_here, cpu_env, output

from demucs_dist import SAMPLERATE
from demucs_dist.data.shard import main as shard_main
from demucs_dist.errors import UserError
from demucs_dist.evaluate import main as evaluate_main

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


def test_shard_refuses_a_foreign_webdataset_folder_and_keeps_its_files(musdb_copy, tmp_path, capfd):
    foreign = tmp_path / "theirs"
    (foreign / "train").mkdir(parents=True)
    (foreign / "train" / "000000.tar").write_bytes(b"their shard")
    (foreign / "train" / "000042.tar").write_bytes(b"another of their shards")
    (foreign / "manifest.json").write_text(json.dumps({"shards": ["train/000000.tar"]}))
    before = files_of(foreign)

    result = cli_here(["shard", *shard_args(musdb_copy, foreign)], capfd)
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


def test_shard_refuses_nan_audio_empty_files_and_missing_stems(musdb_copy, tmp_path, capfd):
    bass = musdb_copy / "train" / TRAIN_SONG / "bass.wav"
    original = bass.read_bytes()
    audio, _ = soundfile.read(bass, dtype="float32", always_2d=True)
    audio[1000:1010] = np.nan
    write_stem(musdb_copy, TRAIN_SONG, "bass", audio)
    out = tmp_path / "shards"
    result = cli_here(["shard", *shard_args(musdb_copy, out)], capfd)
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


# ---------------------------------------------------------------------------------------------
# evaluate (and score): the store's identity, silent stems, stopping


def song_folder(root: Path) -> Path:
    (folder,) = sorted((root / "test").iterdir())
    return folder


@pytest.fixture(scope="session")
def silent_bass_root(tmp_path_factory) -> Path:
    """One 3 s test song whose bass is all zeros (an instrumental-style song without bass); the
    mixture is still the exact sum of its stems."""
    from demucs_dist.data.synth import synthesize

    root = synthesize(tmp_path_factory.mktemp("silent") / "musdb", train=0, valid=0, test=1, seconds=3.0)
    folder = song_folder(root)
    stems = {}
    for stem in ("drums", "bass", "other", "vocals"):
        stems[stem], _ = soundfile.read(folder / f"{stem}.wav", dtype="int16", always_2d=True)
    stems["bass"][:] = 0
    mixture = sum(stems[s].astype(np.int32) for s in stems)
    soundfile.write(folder / "bass.wav", stems["bass"], SAMPLERATE, subtype="PCM_16")
    soundfile.write(folder / "mixture.wav", mixture.astype(np.int16), SAMPLERATE, subtype="PCM_16")
    return root


def baseline_args(root: Path, out: Path) -> list[str]:
    return ["--baseline", "mixture", "--musdb", str(root), "--is-wav", "--out", str(out), "--no-progress"]


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, output(result)
    assert "Traceback" not in result.stderr, output(result)
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: ")
    return line


def song_document(out: Path, root: Path) -> dict:
    return json.loads((out / "test" / f"{song_folder(root).name}.json").read_text())


def frames(document: dict, source: str, metric: str = "SDR") -> np.ndarray:
    (target,) = [t for t in document["targets"] if t["name"] == source]
    return np.array([float(frame["metrics"][metric]) for frame in target["frames"]])


def test_silent_stem_is_left_out_and_the_table_is_written(silent_bass_root, tmp_path, capsys):
    out = tmp_path / "eval"
    evaluate_main(baseline_args(silent_bass_root, out))
    printed = capsys.readouterr().out
    assert "| SDR |" in printed and (out / "results.md").is_file()
    assert "Left out" in printed and "bass (reference silent throughout)" in printed
    document = song_document(out, silent_bass_root)
    assert document["demucs_dist"]["left_out"] == {"bass": "reference silent throughout"}
    assert np.isnan(frames(document, "bass")).all()
    for source in ("drums", "other", "vocals"):  # scored (museval's rule may still NaN a window)
        assert np.isfinite(frames(document, source)).any()
    results = json.loads((out / "results.json").read_text())
    assert results["scores"]["bass"]["SDR"] != results["scores"]["bass"]["SDR"]  # NaN: no song to score it
    assert np.isfinite(results["scores"]["drums"]["SDR"])


@pytest.mark.slow
def test_museval_scorer_leaves_the_silent_stem_out_like_the_torch_scorer(silent_bass_root, tmp_path):
    import museval

    from demucs_dist.data.songs import open_tracks, read_song

    song = read_song(open_tracks(silent_bass_root, True, "test")[0])
    with pytest.raises(ValueError, match="silent"):  # museval's own rule: the whole song refused
        museval.metrics.validate(song.sources.transpose(0, 2, 1), song.sources.transpose(0, 2, 1))

    torch_out, museval_out = tmp_path / "torch", tmp_path / "museval"
    evaluate_main(baseline_args(silent_bass_root, torch_out))
    evaluate_main([*baseline_args(silent_bass_root, museval_out), "--scorer", "museval", "--workers", "1"])
    assert (museval_out / "results.md").is_file()
    by_torch, by_museval = song_document(torch_out, silent_bass_root), song_document(museval_out, silent_bass_root)
    assert (
        by_museval["demucs_dist"]["left_out"]
        == by_torch["demucs_dist"]["left_out"]
        == {"bass": "reference silent throughout"}
    )
    for source in ("drums", "bass", "other", "vocals"):
        for metric in ("SDR", "SIR", "ISR", "SAR"):
            # as in test_evaluate: the same frames NaN, the rest within 0.01 dB (float rounding of ~150 dB ISRs)
            a, b = frames(by_museval, source, metric), frames(by_torch, source, metric)
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
            np.testing.assert_allclose(a, b, atol=0.01, equal_nan=True)


@pytest.fixture(scope="session")
def two_datasets(tmp_path_factory) -> tuple[Path, Path]:
    """Two wav roots with the same song names and different audio (MUSDB18 vs MUSDB18-HQ, say)."""
    from demucs_dist.data.synth import synthesize

    base = tmp_path_factory.mktemp("datasets")
    first = synthesize(base / "first", train=0, valid=0, test=1, seconds=2.0, seed=0)
    second = synthesize(base / "second", train=0, valid=0, test=1, seconds=2.0, seed=1)
    assert song_folder(first).name == song_folder(second).name
    return first, second


@pytest.mark.slow
def test_evaluate_refuses_to_report_another_datasets_scores(two_datasets, tmp_path):
    first, second = two_datasets
    out = tmp_path / "eval"
    evaluate_main(baseline_args(first, out))
    scores = (out / "results.json").read_text()
    with pytest.raises(UserError, match=r"other settings \(dataset: .*first.* -> .*second"):
        evaluate_main(baseline_args(second, out))

    # The same root, one song's audio changed in place (same size): refused, not reused.
    copy = Path(shutil.copytree(first, tmp_path / "copy"))
    out = tmp_path / "eval_copy"
    evaluate_main(baseline_args(copy, out))
    vocals = song_folder(copy) / "vocals.wav"
    audio, _ = soundfile.read(vocals, dtype="int16", always_2d=True)
    soundfile.write(vocals, audio // 2, SAMPLERATE, subtype="PCM_16")
    with pytest.raises(UserError, match=f"audio of 1 song.*changed.*{song_folder(copy).name}"):
        evaluate_main(baseline_args(copy, out))
    assert (tmp_path / "eval" / "results.json").read_text() == scores  # nothing overwritten


@pytest.mark.slow
def test_evaluate_says_what_is_wrong_with_its_out_folder(two_datasets, tmp_path, capfd):
    first, _ = two_datasets
    out = tmp_path / "eval"
    out.mkdir()
    (out / "run.json").write_text('{"model_sha256": "abc", trailing garbage')
    line = one_error_line(cli_here(["evaluate", *baseline_args(first, out)], capfd))
    assert str(out / "run.json") in line and "not a run.json written by demucs-dist" in line

    file_out = tmp_path / "a_file"
    file_out.write_text("not a folder")
    line = one_error_line(cli_here(["evaluate", *baseline_args(first, file_out)], capfd))
    assert f"--out {file_out} is a file, not a folder" in line


# ---------------------------------------------------------------------------------------------
# Folders a run writes: locked while it writes, never another program's


@pytest.mark.slow
def test_a_second_shard_writer_or_evaluation_on_a_locked_folder_is_refused(musdb_copy, two_datasets, tmp_path):
    from demucs_dist.files import FolderLock

    shards = tmp_path / "shards"
    with FolderLock(shards, "shard writer", "--out"):  # as a running writer holds it
        with pytest.raises(UserError, match=r"shards is in use by a running shard writer \(pid \d+ on "):
            shard_main(shard_args(musdb_copy, shards))
    assert [p.name for p in shards.iterdir()] == [".lock"]  # nothing written
    shard_main(shard_args(musdb_copy, shards))  # released (or killed: the kernel drops it): a rerun works

    first, _ = two_datasets
    out = tmp_path / "eval"
    with FolderLock(out, "evaluation", "--out"):
        with pytest.raises(UserError, match=r"eval is in use by a running evaluation \(pid \d+ on "):
            evaluate_main(baseline_args(first, out))
    assert not (out / "run.json").exists()
    evaluate_main(baseline_args(first, out))
    assert (out / "results.json").is_file()


def test_foreign_output_folders_are_refused_and_left_alone(two_datasets, synth_shards, tmp_path):
    from demucs_dist.train import check_run_dir

    first, _ = two_datasets
    foreign = tmp_path / "someone_elses"
    foreign.mkdir()
    (foreign / "000000.tar").write_bytes(b"their data")
    (foreign / "results.json").write_text("{}")
    before = files_of(foreign)
    with pytest.raises(UserError, match="is not empty and holds no scores of demucs-dist"):
        evaluate_main(baseline_args(first, foreign))
    with pytest.raises(UserError, match="is not empty and holds no run of demucs-dist train"):
        check_run_dir(foreign)
    assert files_of(foreign) == before
    check_run_dir(tmp_path / "new")  # new, empty or a lock alone: fine
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / ".lock").write_text("pid 1 on elsewhere\n")
    check_run_dir(tmp_path / "locked")


# ---------------------------------------------------------------------------------------------
# Stopping an evaluation: SIGTERM (a scheduler's cancel) and Ctrl-C


def descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        children = [child for parent in frontier for child in children_of(parent)]
        found += children
        frontier = children
    return found


@pytest.mark.first
@pytest.mark.slow
@pytest.mark.parametrize(
    "stop, inferred, scored",
    [(signal.SIGTERM, 1, 0), (signal.SIGINT, 3, 1)],
    ids=["SIGTERM while songs are inferred", "Ctrl-C while the last songs are scored"],
)
def test_a_stopped_evaluation_leaves_no_worker_writing_into_out(synth_root, tmp_path, stop, inferred, scored):
    """With museval workers busy scoring, stop the evaluation: it and every process it started end
    within seconds (Ctrl-C used to take ~25 s, and after SIGTERM a worker went on writing scores).
    Once every song is inferred and the first is scored, the run is waiting for the pool's last
    songs (a Ctrl-C there used to wait for them, and they were written). (With none scored yet, the
    run may still be in `submit`, which blocks while 2 songs wait: a stop there takes another path.)"""
    root = synthesize_songs(tmp_path / "musdb", test=3, seconds=6.0)
    out = tmp_path / "eval"
    args = [*baseline_args(root, out), "--scorer", "museval", "--workers", "1"]
    env = cpu_env(PYTHONFAULTHANDLER="1")  # SIGABRT prints every thread's stack
    with open(tmp_path / "output", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "demucs_dist.evaluate", *args], env=env, stdout=log,
                                   stderr=log, preexec_fn=ctrl_c_as_in_a_terminal)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            (events := read_text(out / "events.log")).count("\tinferred\t") >= inferred
            and events.count("\tscored\t") >= scored
        ):
            time.sleep(0.05)  # songs have gone to the museval worker
        assert time.monotonic() < deadline, read_text(out / "events.log")
        time.sleep(0.5)
        workers = descendants(process.pid)
        assert workers, "the museval pool should be running"
        process.send_signal(stop)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            time.sleep(3)
            pytest.fail(f"still running 10 s after {stop.name}; its threads:\n{read_text(tmp_path / 'output')[-8000:]}")
        assert not wait_gone(workers, 10), "a worker outlived the evaluation"
        written = sorted((out / "test").glob("*.json"))  # glob of a missing folder: nothing
        time.sleep(2.0)
        assert sorted((out / "test").glob("*.json")) == written
        assert len(written) < 3  # stopped before the end: the rest is for a rerun
    finally:
        process.kill()
        kill_all(descendants(process.pid))
    evaluate_main(baseline_args(root, out))  # the torch scorer finishes what is left
    assert len(list((out / "test").glob("*.json"))) == 3


def ctrl_c_as_in_a_terminal() -> None:
    """A suite run in the background (`make test &`) ignores SIGINT, and Python keeps an inherited
    SIG_IGN: give the child the default, which Python turns into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def synthesize_songs(root: Path, test: int, seconds: float) -> Path:
    from demucs_dist.data.synth import synthesize

    return synthesize(root, train=0, valid=0, test=test, seconds=seconds)


def test_a_wrong_compare_file_is_refused_before_any_work(two_datasets, tmp_path):
    first, _ = two_datasets
    wrong = tmp_path / "notes.json"
    wrong.write_text('{"not": "a results file"}')
    out = tmp_path / "eval"
    for path, message in [
        (wrong, "is not a results.json written by demucs-dist"),
        (tmp_path / "nope.json", "no results file"),
    ]:
        with pytest.raises(UserError, match=f"--compare: .*{message}"):
            evaluate_main([*baseline_args(first, out), "--compare", str(path)])
        assert not out.exists()  # refused before any song was inferred


def test_one_unreadable_song_does_not_stop_the_others(two_datasets, tmp_path, capsys):
    first, _ = two_datasets
    root = Path(shutil.copytree(first, tmp_path / "musdb"))
    synthesize_songs(tmp_path / "more", test=1, seconds=2.0)  # a second song, renamed below
    (extra,) = sorted((tmp_path / "more" / "test").iterdir())
    broken = root / "test" / "Broken Song"
    shutil.copytree(extra, broken)
    (broken / "bass.wav").unlink()
    out = tmp_path / "eval"
    with pytest.raises(UserError, match=r"1 songs could not be scored.*Broken Song"):
        evaluate_main(baseline_args(root, out))
    assert (out / "test" / f"{song_folder(first).name}.json").is_file()  # the readable song is scored


def test_a_run_json_from_before_dataset_fingerprints_is_resumed(two_datasets, tmp_path, capsys):
    first, _ = two_datasets
    out = tmp_path / "eval"
    evaluate_main(baseline_args(first, out))
    older = json.loads((out / "run.json").read_text())
    del older["dataset"], older["songs"]
    (out / "run.json").write_text(json.dumps(older))
    capsys.readouterr()
    evaluate_main(baseline_args(first, out))
    assert "predates dataset fingerprints" in capsys.readouterr().out
    assert "songs" in json.loads((out / "run.json").read_text())  # recorded from now on


def test_a_shard_run_killed_before_its_first_shard_can_be_rerun(musdb_copy, tmp_path):
    out = tmp_path / "shards"
    (out / "train").mkdir(parents=True)
    (out / ".lock").write_text("pid 1 on elsewhere\n")
    leftover = out / "train" / ".000000.tar.tmp4242"  # atomic_path's temporary name
    leftover.write_bytes(b"half a shard")
    shard_main(shard_args(musdb_copy, out))
    assert not leftover.exists() and (out / "manifest.json").is_file()
