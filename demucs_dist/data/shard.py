"""`demucs-dist shard`: cut MUSDB18 songs into z-scored chunks and write webdataset tar shards.

Output (`--out`):
    train/NNNNNN.tar   chunks of the four sources of the training songs (key.json, key.sources.npy)
    valid/NNNNNN.tar   whole validation songs (key.json, key.mix.npy, key.sources.npy)
    manifest.json      sample rate, sources, chunking, dtype, per-song statistics, per-shard counts,
                       bytes and sha256: everything the loader needs (`manifest.Manifest`)
Every stream of a song is z-scored with the mean and std of the song's mono mixture
(`songs.song_statistics`); each sample's json carries its song, offset (samples), mean and std.

Chunking (the training length L = the default model's valid_length(segment) + shift):
    lean    chunks of stride + L samples every stride (default stride = L); the loader draws
            `crops` random crops from each, so every start position is reachable at ~2x storage
    paper   chunks of L every stride (default 1 s), one crop each: ~11x storage
    report  1.25 chunks of L per minute of song at random (seeded) positions, one crop each

Songs are mixed on disk: the training chunks of all songs are put in one seeded random order
(`--seed`) and packed into shards in that order, so every shard holds chunks of many songs and a
song's chunks are spread over all shards. A loader reading a few shards then still sees many
songs. (Version 1 of the manifest packed songs one after another.) The cost: a shard task decodes
every song it holds a chunk of, one at a time (memory: one decoded song plus the shard's bytes),
so a set decodes each song about as many times as it has chunks (~20 for a MUSDB18 song, lean).

The plan (which chunk goes to which shard, in which order) depends only on the songs and the
options, so a rerun writes the same bytes: it skips shards that are complete (a sidecar
NNNNNN.tar.json is written after the tar; both must match) and a shard is written under a
temporary name and renamed when complete, so a killed run never leaves a partial shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import soundfile

from .. import AUDIO_CHANNELS, SAMPLERATE, SOURCES, available_cpus
from ..config import ModelConfig, option, parse
from ..errors import UserError, die_with_parent, run_main
from ..files import LOCK_NAME, FolderLock, atomic_path, check_folder_is_ours, sha256_of
from ..model import valid_length
from ..progress import progress_bar
from .manifest import (
    MANIFEST,
    MANIFEST_VERSION,
    Chunking,
    Manifest,
    PlannedBytes,
    ShardRecord,
    SongLists,
    SongStats,
    read_manifest,
    write_manifest,
)
from .songs import (
    audio_paths,
    check_rate,
    choose_validation,
    open_tracks,
    read_song,
    song_identity,
    song_statistics,
)

CHUNKINGS = ("lean", "paper", "report")
DTYPES = ("float16", "float32")
SHARD_FILE = re.compile(r"^\.?\d{6}\.tar(\.json)?(\.tmp\d+)?$")
MEMBER_OVERHEAD = 3 * 512 + 3 * 128  # tar headers, padding and .npy headers of one sample, roughly


@dataclasses.dataclass
class ShardConfig:
    """Shard writer"""

    musdb: str = option("", "MUSDB18 root: the folder holding train/ (and test/)")
    is_wav: bool = option(False, "read the MUSDB18-HQ wav layout (<song>/mixture.wav, ...) instead of .stem.mp4")
    out: str = option("shards", "output folder for manifest.json, train/*.tar and valid/*.tar")
    valid_tracks: str = option(
        "auto",
        "validation songs: auto (the root's validation_tracks.txt, else official), official (musdb's 14), "
        "a count N (drawn with --seed; the report used 16), a file with one name per line, or comma-separated names",
    )
    chunking: str = option(
        "lean",
        "lean: stride+L chunks every stride, several crops each (~2x storage); paper: L-sample chunks every "
        "1 s (~11x storage); report: 1.25 random L-sample chunks per minute",
        choices=CHUNKINGS,
    )
    segment: float = option(
        10.0, "training segment in seconds; L = the default model's valid_length of it + shift", minimum=0.01
    )
    shift: float = option(1.0, "random shift in seconds the loader may apply on top of the segment", minimum=0)
    stride: float = option(0.0, "seconds between chunk starts (0: lean = L, paper = 1 s; unused by report)", minimum=0)
    crops: int = option(
        0, "crops the loader draws per chunk and epoch (0: lean = stride in seconds, else 1)", minimum=0
    )
    chunks_per_minute: float = option(1.25, "report chunking: random chunks per minute of song", minimum=0.001)
    dtype: str = option("float16", "sample type stored in the shards", choices=DTYPES)
    normalize: bool = option(True, "z-score every song by its mono mixture's mean and std (else mean 0, std 1)")
    shard_size: float = option(256.0, "target shard size in MB (a whole validation song may exceed it)", minimum=0.001)
    workers: int = option(
        min(8, available_cpus()), "processes writing shards in parallel (1 = in this process)", minimum=1
    )
    seed: int = option(0, "seed for --valid-tracks N, report chunk positions and the order of chunks over the shards")
    dry_run: bool = option(False, "print what would be written, then stop")
    verify: bool = option(False, "check the shards in --out against manifest.json (present, size, sha256), then stop")


@dataclasses.dataclass
class Layout:
    """Chunk lengths in samples, derived from the options."""

    training_length: int  # L: what one training example needs (model input + shift)
    chunk_length: int  # nominal stored chunk length
    stride: int
    crops: int


def layout_of(config: ShardConfig) -> Layout:
    if config.segment <= 0 or config.shift < 0 or config.stride < 0 or config.crops < 0:
        raise UserError("--segment must be > 0 and --shift, --stride, --crops >= 0")
    # The default model's input length (its depth, kernel size, stride and context).
    model = ModelConfig()
    model_input = valid_length(
        int(round(config.segment * SAMPLERATE)),
        depth=model.depth,
        kernel_size=model.kernel_size,
        stride=model.stride,
        context=model.context,
    )
    training_length = model_input + int(round(config.shift * SAMPLERATE))
    if config.chunking == "lean":
        stride = int(round(config.stride * SAMPLERATE)) or training_length
        crops = config.crops or max(1, round(stride / SAMPLERATE))
        return Layout(training_length, stride + training_length, stride, crops)
    stride = int(round((config.stride or 1.0) * SAMPLERATE)) if config.chunking == "paper" else 0
    return Layout(training_length, training_length, stride, config.crops or 1)


def plan_chunks(config: ShardConfig, layout: Layout, name: str, length: int) -> list[tuple[int, int]]:
    """(start, end) sample ranges of the chunks of one training song of `length` samples."""
    L = layout.training_length
    if length < L:
        return []
    if config.chunking == "report":
        count = max(1, round(config.chunks_per_minute * length / SAMPLERATE / 60))
        rng = np.random.default_rng([config.seed, zlib.crc32(name.encode())])  # independent of other songs
        return [(int(s), int(s) + L) for s in sorted(rng.integers(0, length - L + 1, count))]
    # Every chunk holds at least one full example; lean chunks near the end are cut at the song's end.
    starts = range(0, length - L + 1, layout.stride)
    return [(start, min(length, start + layout.chunk_length)) for start in starts]


def song_length(track) -> int:
    """Samples of a song, without decoding it (for stems an estimate; shard tasks clamp to the truth).

    UserError naming the song and the file for a missing stem or an empty file: checked here, at
    plan time, rather than in a writer process later."""
    paths = audio_paths(track)
    if track.is_wav:
        frames = []
        for path in paths:
            try:
                info = soundfile.info(path)
            except (soundfile.LibsndfileError, RuntimeError) as exc:
                raise UserError(f"cannot read {path}: {exc}") from None
            check_rate(info.samplerate, path)
            if info.frames == 0:
                raise UserError(f"song {track.name!r}: {path} has no samples (an empty file?)")
            frames.append(info.frames)
        return min(frames)
    check_rate(track.rate, track.path)
    length = int((track.duration or 0) * SAMPLERATE)
    if length <= 0:
        raise UserError(f"song {track.name!r}: {track.path} has no samples (an empty file?)")
    return length


@dataclasses.dataclass
class ShardTask:
    """One shard to write: its relative name and what goes in it."""

    name: str  # e.g. 'train/000003.tar'
    items: list[tuple[str, int, int]]  # (song, start, end); valid: the whole song, end = -1
    digest: str  # identifies the content (items, options, audio): a shard of other options or audio is never reused


def pack(
    items: list[tuple[str, int, int]],
    sizes: list[int],
    target: int,
    split: str,
    salt: str,
    audio: dict[str, str] | None = None,
) -> list[ShardTask]:
    """Consecutive items into shards of at most `target` bytes (at least one item each).

    `salt` names everything besides the items that changes a shard's bytes (source, dtype, ...);
    `audio` ({song: songs.song_identity}) the audio files' fingerprints, so that a shard holding
    a song whose files changed (a fixed song) is rewritten rather than skipped as complete."""
    audio = audio or {}
    groups: list[list[tuple[str, int, int]]] = []
    total = 0
    for item, size in zip(items, sizes):
        if not groups or total + size > target:
            groups.append([])
            total = 0
        groups[-1].append(item)
        total += size
    tasks = []
    for number, group in enumerate(groups):
        name = f"{split}/{number:06d}.tar"
        songs = sorted({song for song, _, _ in group})
        identity = [salt, name, group] + ([[song, audio[song]] for song in songs] if audio else [])
        digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
        tasks.append(ShardTask(name, group, digest))
    return tasks


def make_plan(config: ShardConfig) -> tuple[Manifest, list[ShardTask], dict]:
    """Everything to write: (manifest without shards and statistics yet, shard tasks, tracks by
    name). Reads no audio."""
    if not config.musdb:
        raise UserError("--musdb is required: the MUSDB18 root folder")
    layout = layout_of(config)
    tracks = {t.name: t for t in open_tracks(config.musdb, config.is_wav, "train")}
    names = list(tracks)
    valid = choose_validation(names, config.musdb, config.valid_tracks, config.seed)
    train = [n for n in names if n not in valid]
    if not train:
        raise UserError(f"all {len(names)} songs of {config.musdb}/train are validation songs: none left to train on")
    lengths = {name: song_length(track) for name, track in tracks.items()}
    audio = {name: song_identity(track) for name, track in tracks.items()}
    itemsize = np.dtype(config.dtype).itemsize
    stream_bytes = AUDIO_CHANNELS * itemsize  # per sample per stream

    chunks, skipped = [], []
    for name in train:
        song_chunks = plan_chunks(config, layout, name, lengths[name])
        skipped += [] if song_chunks else [name]
        chunks += [(name, start, end) for start, end in song_chunks]
    if not chunks:
        raise UserError(
            f"every training song is shorter than one chunk ({layout.training_length / SAMPLERATE:.2f} s): "
            "use a shorter --segment or --shift"
        )
    # Songs mixed on disk: all chunks in one seeded order, then packed, so every shard holds many songs.
    chunks = [chunks[i] for i in np.random.default_rng([config.seed, MANIFEST_VERSION]).permutation(len(chunks))]
    target = int(config.shard_size * 1e6)
    chunk_sizes = [len(SOURCES) * (end - start) * stream_bytes + MEMBER_OVERHEAD for _, start, end in chunks]
    valid_items = [(name, 0, -1) for name in valid]
    valid_sizes = [(1 + len(SOURCES)) * lengths[name] * stream_bytes + MEMBER_OVERHEAD for name in valid]
    salt = json.dumps(
        [MANIFEST_VERSION, os.path.abspath(config.musdb), config.is_wav, config.dtype, config.normalize, config.seed]
    )
    tasks = pack(chunks, chunk_sizes, target, "train", salt, audio)
    tasks += pack(valid_items, valid_sizes, target, "valid", salt, audio)

    raw_bytes = sum(len(SOURCES) * AUDIO_CHANNELS * 2 * lengths[n] for n in train)  # 16-bit stems
    manifest = Manifest(
        version=MANIFEST_VERSION,
        samplerate=SAMPLERATE,
        sources=tuple(SOURCES),
        audio_channels=AUDIO_CHANNELS,
        dtype=config.dtype,
        normalized=config.normalize,
        chunking=Chunking(
            mode=config.chunking,
            segment=config.segment,
            shift=config.shift,
            training_length=layout.training_length,
            chunk_length=layout.chunk_length,
            min_chunk_length=min(end - start for _, start, end in chunks),  # planned; the written one replaces it
            stride=layout.stride,
            crops=layout.crops,
            chunks_per_minute=config.chunks_per_minute if config.chunking == "report" else None,
            seed=config.seed,
        ),
        songs=SongLists(train=tuple(sorted(set(train) - set(skipped))), valid=tuple(valid), skipped=tuple(skipped)),
        stats={},
        raw_train_bytes=raw_bytes,
        planned_bytes=PlannedBytes(train=sum(chunk_sizes), valid=sum(valid_sizes)),
        train=(),
        valid=(),
    )
    return manifest, tasks, tracks


def describe(manifest: Manifest, tasks: list[ShardTask]) -> str:
    """What a run will write, in words: samples, bytes and amplification over the raw stems."""
    chunking, planned = manifest.chunking, manifest.planned_bytes
    train_tasks = [t for t in tasks if t.name.startswith("train/")]
    chunks = sum(len(t.items) for t in train_tasks)
    raw = manifest.raw_train_bytes
    sr = manifest.samplerate
    how = {
        "lean": f"{chunking.chunk_length / sr:.2f} s chunks every {chunking.stride / sr:.2f} s",
        "paper": f"{chunking.chunk_length / sr:.2f} s chunks every {chunking.stride / sr:.2f} s",
        "report": f"{chunking.chunks_per_minute} random {chunking.chunk_length / sr:.2f} s chunks per minute",
    }[chunking.mode]
    lines = [
        f"train: {len(manifest.songs.train)} songs -> {chunks} chunks ({chunking.mode}: {how}), "
        f"{chunking.crops} crop(s) each = {chunks * chunking.crops} examples per epoch",
        f"       {planned.train / 1e9:.3f} GB ({manifest.dtype}) = {planned.train / max(1, raw):.2f}x "
        f"the raw 16-bit stems of the training songs ({raw / 1e9:.3f} GB)",
        f"valid: {len(manifest.songs.valid)} whole songs (mixture + sources), {planned.valid / 1e9:.3f} GB",
        f"shards: {len(train_tasks)} train + {len(tasks) - len(train_tasks)} valid",
    ]
    if manifest.songs.skipped:
        lines.append(f"skipped (shorter than one chunk): {', '.join(manifest.songs.skipped)}")
    return "\n".join(lines)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def stored(audio: np.ndarray, mean: float, std: float, dtype: np.dtype) -> bytes:
    """z-scored with the song's statistics, in the stored dtype, as .npy bytes."""
    return _npy(((audio - mean) / std).astype(dtype))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a member with fixed metadata, so the same content gives the same tar bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o444, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def finished(out: Path, task: ShardTask) -> dict | None:
    """The sidecar of a complete shard written for this very task, else None."""
    tar, sidecar = out / task.name, out / (task.name + ".json")
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if info.get("digest") != task.digest or not tar.is_file() or tar.stat().st_size != info.get("bytes"):
        return None
    return info


# Set in the parent before the worker processes fork, so tracks are not pickled per task.
_TRACKS: dict = {}


def write_shard(task: ShardTask, config: ShardConfig, training_length: int) -> dict:
    """Write one shard (unless already complete) and return its sidecar record.

    Songs are decoded one at a time (a train shard holds chunks of many songs): the shard's samples
    are encoded song by song, then written in the planned order."""
    out = Path(config.out)
    done = finished(out, task)
    if done is not None:
        return done
    dtype = np.dtype(config.dtype)
    stats: dict[str, dict] = {}
    members: dict[int, list[tuple[str, bytes]]] = {}  # item index -> its tar members
    lengths: dict[int, int] = {}  # item index -> stored chunk length (train)
    for name in dict.fromkeys(item[0] for item in task.items):
        song = read_song(_TRACKS[name])
        mean, std = song_statistics(song.mix) if config.normalize else (0.0, 1.0)
        length = song.mix.shape[-1]
        stats[name] = {"mean": mean, "std": std, "length": length}

        song_key = f"{zlib.crc32(name.encode()):08x}"  # keys may not contain dots, names may
        for index, (item_song, start, end) in enumerate(task.items):
            if item_song != name:
                continue
            if end < 0:  # a whole validation song
                meta = {"song": name, "offset": 0, **stats[name]}
                members[index] = [
                    (f"{song_key}.json", json.dumps(meta, sort_keys=True, allow_nan=False).encode()),
                    (f"{song_key}.mix.npy", stored(song.mix, mean, std, dtype)),
                    (f"{song_key}.sources.npy", stored(song.sources, mean, std, dtype)),
                ]
                continue
            # Stems decoded from AAC may be a little shorter than planned: keep a full example.
            need = min(end - start, training_length)
            end = min(end, length)
            start = max(0, min(start, end - need))
            if end - start < need:
                continue
            key = f"{song_key}_{start:010d}"
            meta = {"song": name, "offset": start, "mean": mean, "std": std}
            members[index] = [
                (f"{key}.json", json.dumps(meta, sort_keys=True, allow_nan=False).encode()),
                (f"{key}.sources.npy", stored(song.sources[..., start:end], mean, std, dtype)),
            ]
            lengths[index] = end - start
        del song
    with atomic_path(out / task.name) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in sorted(members):  # the planned order
                for member, data in members[index]:
                    _add(tar, member, data)
    tar_path = out / task.name
    record = {
        "name": task.name,
        "samples": len(members),
        "bytes": tar_path.stat().st_size,
        "sha256": sha256_of(tar_path),
        "songs": list(stats),
        "stats": stats,
        "min_chunk_length": min(lengths.values(), default=None),
        "digest": task.digest,
    }
    with atomic_path(out / (task.name + ".json")) as tmp:
        tmp.write_text(json.dumps(record, sort_keys=True, indent=1, allow_nan=False))
    return record


def _our_sidecar(path: Path) -> bool:
    """Whether `path` is a shard sidecar (NNNNNN.tar.json) that `write_shard` wrote."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"digest", "sha256", "samples"} <= record.keys()


def _our_manifest(out: Path) -> dict | None:
    """The parsed manifest.json in `out` if demucs-dist wrote it (any version), else None."""
    try:
        data = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    ours = isinstance(data, dict) and {"version", "chunking", "songs", "train", "valid"} <= data.keys()
    return data if ours else None


def is_our_folder(out: Path) -> bool:
    """Whether `out` holds shards written by `demucs-dist shard`: our manifest.json, or (a first
    run killed before writing its manifest) one of our sidecars, or (killed before its first
    shard was complete) nothing but our temporary shard files."""
    if (out / MANIFEST).exists():
        return _our_manifest(out) is not None
    if any(_our_sidecar(path) for split in ("train", "valid") for path in sorted((out / split).glob("*.tar.json"))):
        return True
    return _only_temporary_shards(out)


def _only_temporary_shards(out: Path) -> bool:
    """Whether `out` holds nothing but a lock and train/ and valid/ folders with our temporary
    shard names (.NNNNNN.tar.tmpPID) or nothing: a first run killed before its first sidecar."""
    for path in out.iterdir():
        if path.name == LOCK_NAME:
            continue
        if path.name not in ("train", "valid") or not path.is_dir():
            return False
        if any(not (SHARD_FILE.match(p.name) and p.name.startswith(".")) for p in path.iterdir()):
            return False
    return True


def check_out_folder(out: Path) -> None:
    """`--out` must be a new or empty folder, or one this program wrote (`is_our_folder`): the
    writer deletes stale shards and replaces manifest.json there, which in another program's
    webdataset folder would destroy its files. UserError (one line) otherwise."""
    check_folder_is_ours(out, "--out", is_our_folder, "was not written by demucs-dist shard (no manifest.json of ours)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    for folder in (out, out / "train", out / "valid"):
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"--out {out}: cannot write in {folder} (read-only?)")


def remove_stale(out: Path, tasks: list[ShardTask]) -> None:
    """Delete shard files of an earlier run that this plan does not write: only files this program
    wrote (a tar listed in our manifest or next to our sidecar, our sidecars, our temporary names),
    never another file that happens to be in the folder."""
    keep = {t.name for t in tasks} | {t.name + ".json" for t in tasks}
    previous = _our_manifest(out) or {}
    listed = {
        record.get("name")
        for split in ("train", "valid")
        for record in previous.get(split, ())
        if isinstance(record, dict)
    }
    stale = []
    for split in ("train", "valid"):
        folder = out / split
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            name = f"{split}/{path.name}"
            if not SHARD_FILE.match(path.name) or name in keep:
                continue
            if path.name.endswith(".tar"):
                ours = name in listed or _our_sidecar(path.with_name(path.name + ".json"))
            elif path.name.endswith(".tar.json"):
                ours = _our_sidecar(path)
            else:  # .NNNNNN.tar.tmpPID: a temporary file of atomic_path, left by a killed run
                ours = path.name.startswith(".")
            stale += [path] if ours else []
    for path in stale:  # decided first: a tar is recognised by its sidecar
        path.unlink()


def write_tasks(tasks: list[ShardTask], config: ShardConfig, training_length: int) -> dict[str, dict]:
    """Write every shard of `tasks` (in `config.workers` processes) and return their sidecar
    records by name.

    A bad song (NaN samples...) is found when a shard task decodes it: the other shards are still
    written (a rerun after the fix skips them), then one UserError names every bad song."""
    records: dict[str, dict] = {}
    failures: dict[str, str] = {}
    progress = progress_bar(len(tasks), "shards", "shard")
    if config.workers <= 1:
        for task in tasks:
            try:
                records[task.name] = write_shard(task, config, training_length)
            except UserError as exc:
                failures[task.name] = str(exc)
            progress.update()
    else:
        # fork: the workers inherit the musdb tracks instead of rerunning ffprobe on every file.
        # The workers die with this process (die_with_parent), or a killed run would leave them
        # blocked on the task queue for good.
        pool = ProcessPoolExecutor(
            config.workers, mp_context=get_context("fork"), initializer=die_with_parent, initargs=(os.getpid(),)
        )
        with pool:
            futures = {pool.submit(write_shard, task, config, training_length): task for task in tasks}
            for future in as_completed(futures):
                try:
                    records[futures[future].name] = future.result()
                except UserError as exc:
                    failures[futures[future].name] = str(exc)
                progress.update()
    progress.close()
    if failures:
        problems = sorted(set(failures.values()))
        raise UserError(
            f"{len(failures)} of {len(tasks)} shards not written: {'; '.join(problems)} "
            "(the other shards are written: fix the song(s) and rerun the same command)"
        )
    return records


def write_shards(config: ShardConfig) -> Manifest | None:
    """Plan, print the plan, write the shards (in parallel) and the manifest; returns the manifest
    (None for a dry run)."""
    manifest, tasks, tracks = make_plan(config)
    print(describe(manifest, tasks), flush=True)
    if config.dry_run:
        return None
    out = Path(config.out)
    check_out_folder(out)
    with FolderLock(out, "shard writer", "--out"):
        return write_all(config, out, manifest, tasks, tracks)


def write_all(config: ShardConfig, out: Path, manifest: Manifest, tasks: list[ShardTask], tracks) -> Manifest:
    """Write the planned shards into the locked `out`, then the manifest; returns the manifest."""
    training_length = manifest.chunking.training_length
    remove_stale(out, tasks)
    global _TRACKS
    _TRACKS = tracks
    records = write_tasks(tasks, config, training_length)

    stats: dict[str, SongStats] = {}
    for record in records.values():
        stats.update({name: SongStats(**values) for name, values in record["stats"].items()})

    def shard_record(record: dict) -> ShardRecord:
        return ShardRecord(record["name"], record["samples"], record["bytes"], record["sha256"], tuple(record["songs"]))

    train = [records[t.name] for t in tasks if t.name.startswith("train/")]
    lengths = [r["min_chunk_length"] for r in train if r["samples"]]
    if not lengths:
        raise UserError("no training chunk was written: the songs are shorter than one chunk")
    manifest = dataclasses.replace(
        manifest,
        chunking=dataclasses.replace(manifest.chunking, min_chunk_length=min(lengths)),  # the loader checks crops fit
        stats={name: stats[name] for name in sorted(stats)},
        train=tuple(shard_record(r) for r in train),
        valid=tuple(shard_record(records[t.name]) for t in tasks if t.name.startswith("valid/")),
    )
    write_manifest(out, manifest)
    total = sum(r["bytes"] for r in records.values())
    print(f"wrote {len(tasks)} shards, {total / 1e9:.3f} GB, and {out / MANIFEST}")
    return manifest


def verify_shards(out: Path) -> list[str]:
    """Problems with the shards in `out` (one line per bad shard, empty if all are whole), judged by
    the size and sha256 manifest.json recorded when each shard was written."""
    try:
        manifest = read_manifest(out)
    except UserError as exc:
        raise UserError(f"cannot verify {out}: {exc}") from None
    problems = []
    for record in manifest.train + manifest.valid:
        path = out / record.name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != record.bytes:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {record.bytes} (truncated?)")
        elif sha256_of(path) != record.sha256:
            problems.append(f"{path}: sha256 differs from the manifest (corrupt)")
    return problems


def main(argv: Sequence[str] | None = None) -> None:
    (config,) = parse(argv, "demucs-dist shard", __doc__, ShardConfig)
    if config.verify:
        out = Path(config.out)
        problems = verify_shards(out)
        for problem in problems:
            print(f"bad shard: {problem}")
        if problems:
            raise UserError(
                f"{len(problems)} bad shard(s) in {out}: delete them and rerun the same "
                "`demucs-dist shard` command to rewrite them"
            )
        print(f"all shards listed in {out / MANIFEST} are whole (size and sha256 match)")
        return
    write_shards(config)


if __name__ == "__main__":
    sys.exit(run_main(main))
