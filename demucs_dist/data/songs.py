"""MUSDB18 songs through the `musdb` package, with the checks musdb does not make.

musdb returns 0 songs for a root that does not exist and an empty validation split for names
that do not match, both silently; here both are errors that say what was expected.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import os
import random
from collections.abc import Generator, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import soundfile

from .. import SAMPLERATE, SOURCES
from ..audio import require_ffmpeg
from ..errors import UserError

# A MUSDB-format root may list its own validation songs here, one name per line (`synth` writes it).
VALIDATION_FILE = "validation_tracks.txt"
SILENCE_STD = 1e-8  # a song whose mono mixture has a smaller std is treated as silent and not scaled


def song_statistics(mix: np.ndarray) -> tuple[float, float]:
    """(mean, std) of a song's mono mix-down `mix` (channels, samples): the z-score every song gets,
    the one definition used by the shard writer and by `apply.normalize` at inference.

    The std is the unbiased one; a silent song (std <= SILENCE_STD, or NaN) keeps std 1, so it is
    centred but not divided by ~0. numpy in float64: the writer runs in forked worker processes,
    where torch's thread pool inherited from a parent that used it can deadlock.
    """
    ref = np.asarray(mix).mean(0, dtype=np.float64)
    mean = float(ref.mean()) if ref.size else 0.0
    std = float(ref.std(ddof=1)) if ref.size > 1 else 0.0
    return mean, std if std > SILENCE_STD else 1.0


@dataclass
class Song:
    """One song, float32 (channels, samples) arrays at `samplerate`."""

    name: str
    mix: np.ndarray  # (channels, samples)
    sources: np.ndarray  # (len(SOURCES), channels, samples), in SOURCES order
    samplerate: int

    @property
    def seconds(self) -> float:
        return self.mix.shape[-1] / self.samplerate


def open_tracks(root: str | os.PathLike, is_wav: bool, subset: str = "train") -> list:
    """The musdb tracks of `subset` ('train' or 'test') under `root`, sorted by name; never empty."""
    require_ffmpeg()
    import musdb  # imported late: it checks for ffmpeg at import time

    root = Path(root)
    layout = (
        "<root>/{train,test}/<song>/{mixture,drums,bass,other,vocals}.wav"
        if is_wav
        else "<root>/{train,test}/*.stem.mp4"
    )
    if not root.is_dir():
        raise UserError(f"MUSDB root not found: {root}")
    if not (root / subset).is_dir():
        raise UserError(f"no '{subset}' folder in {root}: expected the MUSDB18 layout {layout}")
    tracks = musdb.DB(root=str(root), is_wav=is_wav, subsets=subset).tracks
    if not tracks:
        other = "without --is-wav (.stem.mp4 files)" if is_wav else "with --is-wav (wav folders)"
        raise UserError(f"no songs found in {root / subset} (expected {layout}); try {other}?")
    return sorted(tracks, key=lambda t: t.name)


def official_validation_names() -> list[str]:
    """The 14 validation songs of MUSDB18's official split, as listed by musdb."""
    require_ffmpeg()
    import musdb
    import yaml

    with open(Path(musdb.__file__).parent / "configs" / "mus.yaml") as f:
        return list(yaml.safe_load(f)["validation_tracks"])


def choose_validation(names: list[str], root: str | os.PathLike, spec: str = "auto", seed: int = 0) -> list[str]:
    """Pick the validation songs among the train subset's `names`.

    spec: 'auto' (the root's validation_tracks.txt if present, else 'official'), 'official'
    (musdb's 14 songs), an integer N (N songs drawn with `seed`, e.g. 16 as in the report), a
    file with one name per line, or comma-separated names.
    """
    listing = Path(root) / VALIDATION_FILE
    if spec == "auto":
        spec = str(listing) if listing.is_file() else "official"
    if spec == "official":
        wanted = official_validation_names()
        chosen = [n for n in names if n in wanted]
        if not chosen:
            raise UserError(
                f"none of musdb's official validation songs are in {root}/train; "
                "name your own with --valid-tracks (a count, a file, or comma-separated names)"
            )
        return chosen
    if spec.isdigit():
        count = int(spec)
        if not 0 < count < len(names):
            raise UserError(f"--valid-tracks {count}: need between 1 and {len(names) - 1} of the {len(names)} songs")
        return sorted(random.Random(seed).sample(names, count))
    wanted = Path(spec).read_text().split("\n") if os.path.isfile(spec) else spec.split(",")
    wanted = [w.strip() for w in wanted if w.strip()]
    missing = [w for w in wanted if w not in names]
    if missing or not wanted:
        raise UserError(f"validation songs not found in {root}/train: {', '.join(missing) or '(empty list)'}")
    return [n for n in names if n in wanted]


def _as_stereo(audio: np.ndarray, where: str) -> np.ndarray:
    """(samples, channels) -> (2, samples) float32; mono is duplicated."""
    if audio.ndim == 1 or audio.shape[1] == 1:
        audio = np.repeat(audio.reshape(-1, 1), 2, axis=1)
    if audio.shape[1] != 2:
        raise UserError(f"{where}: {audio.shape[1]} channels, expected mono or stereo")
    return np.ascontiguousarray(audio.T, dtype=np.float32)


def check_rate(rate: float, where: str) -> None:
    if int(rate) != SAMPLERATE:
        raise UserError(
            f"{where} is at {int(rate)} Hz; MUSDB18 and the model use {SAMPLERATE} Hz "
            f"(convert it first, e.g. ffmpeg -i IN -ar {SAMPLERATE} OUT)"
        )


def audio_paths(track) -> list[str]:
    """The files a song's audio comes from: the .stem.mp4, or (wav layout) mixture.wav and the four
    stems in SOURCES order. UserError naming the song and the file for a missing stem (musdb
    silently leaves it out of `track.sources`)."""
    if not track.is_wav:
        return [track.path]
    folder = Path(track.path).parent
    missing = [f"{name}.wav" for name in SOURCES if name not in track.sources]
    if missing or not os.path.isfile(track.path):
        missing = ([] if os.path.isfile(track.path) else [Path(track.path).name]) + missing
        raise UserError(f"song {track.name!r}: {', '.join(missing)} missing in {folder}")
    return [track.path] + [track.sources[name].path for name in SOURCES]


HASHED_BYTES = 1 << 20  # file_identity hashes the first and the last MB


def file_identity(path: str | os.PathLike) -> str:
    """A cheap fingerprint of an audio file's content: its size and the sha256 of its first and
    last MB. Reading two MB per file instead of the whole file keeps it cheap for a whole
    dataset; a change that keeps the size and touches neither end goes unseen."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(HASHED_BYTES))
        if size > HASHED_BYTES:
            f.seek(max(HASHED_BYTES, size - HASHED_BYTES))
            digest.update(f.read())
    return f"{size}:{digest.hexdigest()[:16]}"


def song_identity(track) -> str:
    """The fingerprints of all of a song's audio files (`file_identity`), as one string: what a
    shard digest and an evaluation's run.json record, so that changed audio is never mistaken for
    what was shard or scored before."""
    return ",".join(file_identity(path) for path in audio_paths(track))


def check_finite(name: str, streams: list[np.ndarray], paths: list[str]) -> None:
    """UserError naming the song and the file if a stream (mixture first, then SOURCES) holds NaN
    or infinite samples, or none at all: such audio would poison every statistic computed from it
    (shards of NaN, a z-score of NaN, a score of NaN) without any error later on."""
    labels = ["mixture", *SOURCES]
    for label, stream in zip(labels, streams):
        where = paths[min(len(paths) - 1, labels.index(label))]
        if stream.shape[-1] == 0:
            raise UserError(f"song {name!r}: the {label} in {where} has no samples (an empty file?)")
        bad = int(np.size(stream) - np.count_nonzero(np.isfinite(stream)))
        if bad:
            raise UserError(
                f"song {name!r}: the {label} in {where} has {bad} NaN or infinite samples: fix or remove the song"
            )


def read_song(track) -> Song:
    """Decode a musdb track into a Song (mixture and the four sources, SOURCES order).

    UserError for a missing stem, an empty stream and NaN or infinite samples (`check_finite`)."""
    if track.is_wav:  # soundfile is ~30x faster than musdb's ffmpeg subprocess per file
        paths = audio_paths(track)
        streams = []
        for path in paths:
            try:
                audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
            except (soundfile.LibsndfileError, RuntimeError) as exc:
                raise UserError(f"cannot read {path}: {exc}") from None
            check_rate(rate, path)
            streams.append(_as_stereo(audio, path))
    else:
        try:
            stems = track.stems  # (5, samples, channels): mixture then stems in stem_id order
        except Exception as exc:  # stempeg raises bare errors for unreadable files
            raise UserError(f"cannot read {track.path}: {exc}") from None
        check_rate(track.rate, track.path)
        order = {name: source.stem_id for name, source in track.sources.items()}
        if len(stems) < 1 + len(SOURCES) or any(order.get(n, len(stems)) >= len(stems) for n in SOURCES):
            raise UserError(
                f"song {track.name!r}: {track.path} has {len(stems)} audio streams, expected "
                f"{1 + len(SOURCES)} (mixture, {', '.join(SOURCES)})"
            )
        paths = [track.path]
        streams = [_as_stereo(stems[0], track.path)] + [_as_stereo(stems[order[n]], track.path) for n in SOURCES]
    check_finite(track.name, streams, paths)
    length = min(s.shape[-1] for s in streams)  # encoders may pad streams differently
    streams = [s[..., :length] for s in streams]
    return Song(track.name, streams[0], np.stack(streams[1:]), SAMPLERATE)


def read_songs_ahead(
    tracks: Mapping[str, Any], names: Iterable[str], ahead: int
) -> Generator[tuple[str, Song | UserError], None, None]:
    """(name, Song) of each of `names` in order, or (name, the UserError that reading it raised).

    Up to `ahead` songs are decoded in background threads while the caller works on the current
    one (ffmpeg and libsndfile decode outside the GIL, so the decodes run in parallel with each
    other and with inference). Memory: up to `ahead` decoded songs waiting, ~0.4 GB each for a
    4-minute song. `ahead` 0 reads each song when it is needed.
    """

    def read(name: str) -> Song | UserError:
        try:
            return read_song(tracks[name])
        except UserError as exc:  # one unreadable song is the caller's to report, not fatal here
            return exc

    if ahead <= 0:
        for name in names:
            yield name, read(name)
        return
    pending: collections.deque = collections.deque()
    remaining = iter(names)
    with ThreadPoolExecutor(ahead, thread_name_prefix="read-ahead") as pool:
        try:
            for name in itertools.islice(remaining, ahead):
                pending.append((name, pool.submit(read, name)))
            while pending:
                name, future = pending.popleft()
                following = next(remaining, None)
                if following is not None:
                    pending.append((following, pool.submit(read, following)))
                yield name, future.result()
        finally:  # the caller stopped early (an error): drop what was not started
            for _, future in pending:
                future.cancel()


class TrackSelection(Protocol):
    """The options `select_tracks` reads (evaluate's and score's configs)."""

    musdb: str
    is_wav: bool
    subset: str
    songs: list[str]


def select_tracks(config: TrackSelection) -> list:
    """The musdb tracks to score, by name; UserError for unknown names or an empty selection."""
    if not config.musdb:
        raise UserError("--musdb is required: the MUSDB18 root folder")
    tracks = open_tracks(config.musdb, config.is_wav, config.subset)
    wanted = list(config.songs)
    if len(wanted) == 1 and os.path.isfile(wanted[0]):
        wanted = [line.strip() for line in Path(wanted[0]).read_text().splitlines() if line.strip()]
    if not wanted:
        return tracks
    names = {t.name for t in tracks}
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise UserError(f"songs not found in {config.musdb}/{config.subset}: {', '.join(unknown)}")
    return [t for t in tracks if t.name in wanted]


def dataset_identity(musdb: str, is_wav: bool, tracks: Mapping) -> dict[str, Any]:
    """What the scores depend on in the dataset: its root (absolute), its format and every song's
    audio fingerprint (`songs.song_identity`: sizes and hashes of the first and last MB). MUSDB18
    and MUSDB18-HQ have the same song names: without this, scores of one would be reported as
    the other's."""

    def identity(track) -> str:
        try:
            return song_identity(track)
        except (UserError, OSError) as exc:  # reported as that song's failure when it is read
            return f"unreadable: {exc}"

    return {
        "dataset": {"root": os.path.abspath(musdb), "format": "wav" if is_wav else "stems"},
        "songs": {name: identity(track) for name, track in tracks.items()},
    }
