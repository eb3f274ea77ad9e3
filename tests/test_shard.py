"""`demucs-dist shard`: z-scored chunks that match musdb's audio, honest manifests, restartable runs."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from helpers import SHARD_ARGS

from demucs_dist import SAMPLERATE, SOURCES
from demucs_dist.data.shard import ShardConfig, main, make_plan
from demucs_dist.data.songs import open_tracks
from demucs_dist.data.synth import synthesize
from demucs_dist.errors import UserError


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of a tar shard, read with the standard library (not our loader)."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for member in tar:
            key, extension = member.name.split(".", 1)
            samples[key][extension] = tar.extractfile(member).read()
    return samples


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data))


@functools.cache
def musdb_tracks(root: Path, is_wav: bool) -> dict:
    return {t.name: t for t in open_tracks(root, is_wav)}


def musdb_song(root: Path, name: str, is_wav: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mixture (C, T), sources (S, C, T)) float64 as musdb itself decodes them."""
    track = musdb_tracks(root, is_wav)[name]
    sources = np.stack([track.targets[s].audio.T for s in SOURCES])
    return track.audio.T, sources


def z_stats(mixture: np.ndarray) -> tuple[float, float]:
    ref = mixture.mean(0)
    return ref.mean(), ref.std(ddof=1)  # torch's std (apply.normalize) is the unbiased one


def check_train_samples(out: Path, root: Path, is_wav: bool, songs: int) -> None:
    """Every stored chunk equals (source - mean) / std of musdb's audio within float16 precision."""
    manifest = json.loads((out / "manifest.json").read_text())
    cache: dict[str, tuple] = {}
    checked = set()
    for shard in manifest["train"]:
        for sample in tar_samples(out / shard["name"]).values():
            info = json.loads(sample["json"])
            if info["song"] not in cache:
                cache[info["song"]] = musdb_song(root, info["song"], is_wav)
            mixture, sources = cache[info["song"]]
            mean, std = z_stats(mixture)
            assert info["mean"] == pytest.approx(mean, rel=1e-4, abs=1e-7)
            assert info["std"] == pytest.approx(std, rel=1e-4)
            chunk = npy(sample["sources.npy"])
            assert chunk.dtype == np.float16 and chunk.shape[:2] == (4, 2)
            expected = (sources[..., info["offset"] : info["offset"] + chunk.shape[-1]] - mean) / std
            assert chunk.shape == expected.shape
            np.testing.assert_allclose(chunk.astype(np.float64), expected, rtol=1e-3, atol=1e-3)
            checked.add(info["song"])
    assert len(checked) == songs


def test_train_samples_are_the_z_scored_musdb_sources(synth_shards, synth_root):
    check_train_samples(synth_shards, synth_root, is_wav=True, songs=4)


def test_valid_shards_rebuild_the_songs(synth_shards, synth_root):
    manifest = json.loads((synth_shards / "manifest.json").read_text())
    assert manifest["songs"]["valid"] == ["Synth Valid 000", "Synth Valid 001"]
    seen = []
    for shard in manifest["valid"]:
        for sample in tar_samples(synth_shards / shard["name"]).values():
            info = json.loads(sample["json"])
            mixture, sources = musdb_song(synth_root, info["song"])
            stored_mix, stored_sources = npy(sample["mix.npy"]), npy(sample["sources.npy"])
            assert stored_mix.shape == mixture.shape and stored_sources.shape == sources.shape
            peak = np.abs(mixture).max()
            np.testing.assert_allclose(stored_mix * info["std"] + info["mean"], mixture, atol=2e-3 * peak)
            np.testing.assert_allclose(stored_sources * info["std"] + info["mean"], sources, atol=2e-3 * peak)
            seen.append(info["song"])
    assert sorted(seen) == manifest["songs"]["valid"]


def test_manifest_counts_bytes_and_hashes_match_the_tars(synth_shards):
    manifest = json.loads((synth_shards / "manifest.json").read_text())
    assert manifest["samplerate"] == SAMPLERATE and manifest["sources"] == list(SOURCES)
    assert manifest["dtype"] == "float16" and manifest["normalized"] is True
    assert len(manifest["train"]) >= 4  # enough for 2 ranks x 2 workers in the loader tests
    for shard in manifest["train"] + manifest["valid"]:
        path = synth_shards / shard["name"]
        assert shard["samples"] == len(tar_samples(path)) > 0
        assert shard["bytes"] == path.stat().st_size
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    on_disk = sorted(p.name for p in (synth_shards / "train").glob("*.tar"))
    assert on_disk == sorted(Path(s["name"]).name for s in manifest["train"])
    assert set(manifest["stats"]) == set(manifest["songs"]["train"]) | set(manifest["songs"]["valid"])


def test_lean_chunks_reach_every_start_position_at_about_twice_the_storage(synth_shards):
    """Each start position in [0, song - L] lies in some chunk's crop range; bytes <= 2.5x the raw stems."""
    manifest = json.loads((synth_shards / "manifest.json").read_text())
    L = manifest["chunking"]["training_length"]
    ranges = defaultdict(list)
    for shard in manifest["train"]:
        for sample in tar_samples(synth_shards / shard["name"]).values():
            info = json.loads(sample["json"])
            length = npy(sample["sources.npy"]).shape[-1]
            ranges[info["song"]].append((info["offset"], info["offset"] + length - L))
    for song, spans in ranges.items():
        reachable = np.zeros(manifest["stats"][song]["length"] - L + 1, dtype=bool)
        for first, last in spans:
            reachable[first : last + 1] = True
        assert reachable.all(), song
    stored = sum(s["bytes"] for s in manifest["train"])
    assert stored <= 2.5 * manifest["raw_train_bytes"]


def test_paper_and_report_chunkings_plan_the_documented_counts(synth_root):
    base = dict(musdb=str(synth_root), is_wav=True, segment=0.5, shift=0.25)
    length = 5 * SAMPLERATE
    paper, tasks, _ = make_plan(ShardConfig(chunking="paper", **base))
    L = paper.chunking.training_length
    chunks = sum(len(t.items) for t in tasks if t.name.startswith("train/"))
    assert chunks == 4 * ((length - L) // SAMPLERATE + 1)  # 4 songs, one chunk of L every second
    assert paper.chunking.chunk_length == L and paper.chunking.crops == 1
    report, tasks, _ = make_plan(ShardConfig(chunking="report", chunks_per_minute=60, **base))
    starts = [start for t in tasks if t.name.startswith("train/") for _, start, _ in t.items]
    assert len(starts) == 4 * 5 and all(0 <= s <= length - L for s in starts)  # 60/min of 5 s songs
    again, tasks_again, _ = make_plan(ShardConfig(chunking="report", chunks_per_minute=60, **base))
    assert [t.items for t in tasks] == [t.items for t in tasks_again]  # seeded positions
    counted, _, _ = make_plan(ShardConfig(valid_tracks="3", **base))  # a count, like the report's 16 of 100
    assert len(counted.songs.valid) == 3 and len(counted.songs.train) == 3


def test_every_song_is_spread_over_the_shards(synth_shards):
    """On disk, training chunks lie in a seeded random order over all shards, not song after song:
    consecutive chunks (across the shards, in order) rarely share a song, and most shards hold 2 songs."""
    manifest = json.loads((synth_shards / "manifest.json").read_text())
    order, per_shard = [], []
    for shard in manifest["train"]:
        songs = [json.loads(sample["json"])["song"] for sample in tar_samples(synth_shards / shard["name"]).values()]
        order += songs
        per_shard.append(len(set(songs)))
    assert len(order) == 16 and len(set(order)) == 4  # 4 songs x 4 chunks, 2 chunks per shard
    repeats = sum(a == b for a, b in zip(order, order[1:]))
    assert repeats <= 6  # a random order gives 3 on average; song after song gives 12
    assert sum(count > 1 for count in per_shard) >= len(per_shard) // 2  # song after song: none


def test_dry_run_prints_the_plan_and_writes_nothing(synth_root, tmp_path, capsys):
    main(["--musdb", str(synth_root), "--is-wav", "--out", str(tmp_path / "s"), "--dry-run", *SHARD_ARGS])
    printed = capsys.readouterr().out
    assert "examples per epoch" in printed and "x the raw 16-bit stems" in printed and "GB" in printed
    assert not (tmp_path / "s").exists()


def test_bad_input_is_a_clear_error(synth_root, tmp_path):
    with pytest.raises(UserError, match="--musdb is required"):
        main([])
    with pytest.raises(UserError, match="not found"):
        main(["--musdb", str(tmp_path / "nowhere"), "--is-wav"])
    with pytest.raises(UserError, match="shorter than one chunk"):
        main(["--musdb", str(synth_root), "--is-wav", "--segment", "30", "--dry-run"])
    with pytest.raises(UserError, match="validation songs not found"):
        main(["--musdb", str(synth_root), "--is-wav", "--valid-tracks", "No Such Song", "--dry-run"])


@pytest.mark.slow
def test_stem_mp4_songs_shard_like_wav(tmp_path):
    """synth --format stems, and the real MUSDB18 clip that ships with stempeg, through .stem.mp4."""
    import stempeg

    root = synthesize(tmp_path / "synth", train=1, valid=1, test=0, seconds=2.0, fmt="stems")
    out = tmp_path / "synth_shards"
    main(["--musdb", str(root), "--out", str(out), *SHARD_ARGS])
    check_train_samples(out, root, is_wav=False, songs=1)

    real = tmp_path / "real"
    (real / "train").mkdir(parents=True)
    for name in ("Clip A", "Clip B"):
        shutil.copy(stempeg.example_stem_path(), real / "train" / f"{name}.stem.mp4")
    out = tmp_path / "real_shards"
    main(["--musdb", str(real), "--out", str(out), "--valid-tracks", "Clip B", *SHARD_ARGS])
    check_train_samples(out, real, is_wav=False, songs=1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["songs"]["valid"] == ["Clip B"] and manifest["valid"][0]["samples"] == 1


def shard_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_killed_and_restarted_run_ends_with_the_same_shards(synth_root, tmp_path):
    # One chunk per shard: 16 train shards, so the kill lands mid-run.
    args = ["--musdb", str(synth_root), "--is-wav", "--segment", "0.5", "--shift", "0.25", "--shard-size", "1.5"]
    command = [sys.executable, "-m", "demucs_dist.data.shard", *args, "--workers", "1"]
    reference, restarted = tmp_path / "reference", tmp_path / "restarted"
    main([*args, "--workers", "2", "--out", str(reference)])  # uninterrupted, and in parallel

    process = subprocess.Popen(
        [*command, "--out", str(restarted)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = restarted / "train" / "000000.tar.json"
    deadline = time.monotonic() + 60
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (restarted / "manifest.json").exists(), "the run finished before it could be killed"
    complete_before = {
        p: p.stat().st_mtime_ns for p in (restarted / "train").glob("*.tar") if Path(f"{p}.json").exists()
    }
    assert complete_before

    main([*args, "--workers", "1", "--out", str(restarted)])
    assert shard_files(restarted) == shard_files(reference)  # tars, sidecars, manifest; no leftovers
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in complete_before.items())  # skipped, not rewritten
    assert not [p for p in restarted.rglob("*") if "tmp" in p.name]


def test_options_that_change_the_bytes_change_the_shard_digests(synth_root):
    base = dict(musdb=str(synth_root), is_wav=True, segment=0.5, shift=0.25)
    digests = {t.name: t.digest for t in make_plan(ShardConfig(**base))[1]}
    assert digests == {t.name: t.digest for t in make_plan(ShardConfig(**base))[1]}
    for change in (dict(dtype="float32"), dict(normalize=False), dict(seed=1)):
        other = {t.name: t.digest for t in make_plan(ShardConfig(**base, **change))[1]}
        assert not set(other.items()) & set(digests.items()), change
