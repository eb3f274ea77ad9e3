"""Benchmark: how well the training stream mixes songs, at the scale of MUSDB18.

    .venv/bin/python bench/song_mixing.py [--songs 86] [--ranks 8] [--workers 2] [--batch 8]

What a Remix group (4 consecutive examples of a rank) and a device batch hold depends on how the
shard writer packs chunks into shards and how the loader reads them back. A MUSDB18-sized set of
shards does not fit this machine's disk and time, so this runs the real code on the real
arithmetic without the audio:

1. Shard plan: the real planner (`shard.make_plan`) for 86 training songs of 150-300 s (lengths
   drawn with a seed; only the track listing and song lengths are given to it, no audio is read),
   the default options (10 s segment + 1 s shift, 256 MB shards), lean and paper chunking.
2. Stream: the real training stream (`loader._TrainStream`: slots, shard order, crop pool,
   batching) of every rank and worker (8 ranks x 2 workers), whose shard reader is replaced by the
   planned samples of each shard, in the order the writer stores them, as zero-memory chunks of
   their planned length. The workers of a rank are interleaved batch by batch (round robin), as
   torch's DataLoader does. `--real-songs 16` also runs the real DataLoader over real shards of
   synthetic songs (lean chunking, 64 MB shards), as a check of the replay.
3. Measures, per rank, over one epoch (`--repeat 1`): the fraction of Remix groups holding 2+
   examples of one song and 2+ crops of one stored chunk (overlapping audio), and the mean number
   of distinct songs in a device batch. Baseline: a uniform shuffle of all examples (the 2019 code).

The numbers before the songs were mixed (manifest version 1) came from this script as of commit
6d1d52a, which replayed that loader (shuffle buffer, back-to-back crops) the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from demucs_dist import SAMPLERATE
from demucs_dist.data import loader, shard
from demucs_dist.data.augment import AugmentConfig
from demucs_dist.data.manifest import Manifest, ShardRecord

CROP = 64  # samples kept per crop: the ordering does not depend on it, and small crops copy fast


def plan(chunking: str, songs: int, seed: int) -> tuple[Manifest, list]:
    """(manifest listing the planned train shards, train tasks) of the real planner for `songs`
    training songs of 150-300 s."""
    rng = np.random.default_rng(seed)
    names = [f"Song {i:03d}" for i in range(songs + 14)]
    lengths = {name: int(rng.uniform(150, 300) * SAMPLERATE) for name in names}
    tracks = [types.SimpleNamespace(name=name) for name in names]
    originals = shard.open_tracks, shard.song_length
    shard.open_tracks = lambda *args, **kwargs: tracks
    shard.song_length = lambda track: lengths[track.name]
    try:
        manifest, tasks, _ = shard.make_plan(shard.ShardConfig(musdb="/none", chunking=chunking, valid_tracks="14"))
    finally:
        shard.open_tracks, shard.song_length = originals
    tasks = [t for t in tasks if t.name.startswith("train/")]
    records = tuple(ShardRecord(t.name, len(t.items), 0, "", ()) for t in tasks)
    return dataclasses.replace(manifest, train=records), tasks


def rank_examples(manifest: Manifest, tasks: list, rank: int, ranks: int, workers: int, batch: int, batches: int):
    """(song, chunk) of every example of `rank`'s first `batches` batches, in the order training sees them."""
    contents = {t.name: t.items for t in tasks}  # the writer stores a shard's samples in the planned order
    stream = loader._TrainStream("/none", manifest, CROP, batch, 0, 0, rank, ranks, workers, 0, 4)

    def planned(name: str, stride: int, slot: int) -> Iterator:
        for index, (song, start, end) in enumerate(contents[name], start=stream.first_sample[name]):
            if index % stride == slot % stride:
                chunk = torch.zeros(1, dtype=torch.float16).expand(4, 2, end - start)
                yield loader._Pooled(f"{song}@{start}", song, chunk, manifest.chunking.crops)

    stream._stream = planned
    per_worker = []
    for worker in range(workers):
        torch.utils.data.get_worker_info = lambda worker=worker: types.SimpleNamespace(id=worker)
        iterator = iter(stream)
        per_worker.append([[(o.song, o.chunk) for o in next(iterator).origins] for _ in range(-(-batches // workers))])
    torch.utils.data.get_worker_info = lambda: None
    # DataLoader hands out the workers' batches in turn.
    order = [per_worker[i % workers][i // workers] for i in range(batches)]
    return [example for batch_ in order for example in batch_]


def real_examples(songs: int, seconds: float, ranks: int, workers: int, batch: int) -> tuple[list, list]:
    """(per rank, (song, chunk) of one epoch's examples through the real DataLoader over real shards
    of `songs` synthetic songs (lean default chunking, 64 MB shards); every example of the set once)."""
    import json

    from demucs_dist.data.manifest import read_manifest
    from demucs_dist.data.synth import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        root = synthesize(Path(tmp) / "musdb", train=songs, valid=1, test=0, seconds=seconds, seed=0)
        shards = str(Path(tmp) / "shards")
        shard.main(["--musdb", str(root), "--is-wav", "--out", shards, "--shard-size", "64", "--workers", "2"])
        manifest = read_manifest(shards)
        everything = [
            (json.loads(sample["json"])["song"], f"{record.name}/{sample['__key__']}")
            for record in manifest.train
            for sample in loader.read_samples(f"{shards}/{record.name}")
            for _ in range(manifest.chunking.crops)
        ]
        batches = manifest.examples_per_epoch() // (batch * ranks)
        per_rank = [
            [
                (o.song, o.chunk)
                for b in loader.train_batches(
                    shards,
                    manifest,
                    segment_samples=CROP,
                    batch_size=batch,
                    batches=batches,
                    epoch=0,
                    seed=0,
                    rank=rank,
                    world_size=ranks,
                    workers=workers,
                    augment=AugmentConfig(),
                )
                for o in b.origins
            ]  # fmt: skip
            for rank in range(ranks)
        ]
        return per_rank, everything


def measure(examples: list[tuple[str, str]], batch: int, group: int = 4) -> tuple[float, float, float]:
    """(fraction of groups with 2+ of one song, ... 2+ crops of one chunk, mean distinct songs per batch)."""
    groups = [examples[i : i + group] for i in range(0, len(examples) - group + 1, group)]
    same_song = np.mean([len({s for s, _ in g}) < len(g) for g in groups])
    same_chunk = np.mean([len({c for _, c in g}) < len(g) for g in groups])
    batches = [examples[i : i + batch] for i in range(0, len(examples) - batch + 1, batch)]
    distinct = np.mean([len({s for s, _ in b}) for b in batches])
    return float(same_song), float(same_chunk), float(distinct)


def uniform(tasks: list, crops: int, batch: int, seed: int, rounds: int = 20) -> tuple[float, float, float]:
    """The same measures for a uniform shuffle of all examples (each chunk `crops` times)."""
    examples = [(song, f"{song}@{start}") for t in tasks for song, start, _ in t.items for _ in range(crops)]
    rng = np.random.default_rng(seed)
    results = [measure([examples[i] for i in rng.permutation(len(examples))], batch) for _ in range(rounds)]
    return tuple(float(np.mean(column)) for column in zip(*results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--songs", type=int, default=86, help="training songs (150-300 s each)")
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="loader workers per rank")
    parser.add_argument("--batch", type=int, default=8, help="device batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the song lengths")
    parser.add_argument("--real-songs", type=int, default=0, help="also: this many real synthetic songs (0: skip)")
    parser.add_argument("--real-seconds", type=float, default=40.0, help="length of each real synthetic song")
    parser.add_argument("--real-ranks", type=int, default=2, help="ranks of the real check")
    parser.add_argument("--real-workers", type=int, default=2, help="loader workers per rank of the real check")
    args = parser.parse_args(argv)
    rows = []
    for chunking in ("lean", "paper"):
        manifest, tasks = plan(chunking, args.songs, args.seed)
        crops = manifest.chunking.crops
        chunks = sum(len(t.items) for t in tasks)
        batches = chunks * crops // (args.batch * args.ranks)  # one epoch (--repeat 1) per rank
        if chunking == "lean":
            rows.append(("uniform shuffle of all examples (the 2019 code)", *uniform(tasks, crops, args.batch, 0)))
        results = [
            measure(rank_examples(manifest, tasks, rank, args.ranks, args.workers, args.batch, batches), args.batch)
            for rank in range(args.ranks)
        ]
        label = f"stream, {chunking} ({len(tasks)} shards, {chunks} chunks x {crops} crops)"
        rows.append((label, *(float(np.mean(column)) for column in zip(*results))))
    if args.real_songs:
        per_rank, everything = real_examples(
            args.real_songs, args.real_seconds, args.real_ranks, args.real_workers, args.batch
        )
        rng = np.random.default_rng(0)
        shuffles = [measure([everything[i] for i in rng.permutation(len(everything))], args.batch) for _ in range(50)]
        label = f"uniform shuffle of the real set's {len(everything)} examples"
        rows.append((label, *(float(np.mean(column)) for column in zip(*shuffles))))
        label = (
            f"real DataLoader over real shards of {args.real_songs} songs of {args.real_seconds:g} s, lean, "
            f"{args.real_ranks} ranks x {args.real_workers} workers"
        )
        rows.append((label, *(float(np.mean(column)) for column in zip(*(measure(e, args.batch) for e in per_rank)))))
    print(f"{args.songs} songs of 150-300 s, {args.ranks} ranks x {args.workers} workers, device batch {args.batch}")
    print()
    print("| | Remix group of 4 holds 2+ items of one song | 2+ crops of one stored chunk | distinct songs per batch |")
    print("|---|---:|---:|---:|")
    for label, song, chunk, distinct in rows:
        print(f"| {label} | {100 * song:.1f}% | {100 * chunk:.1f}% | {distinct:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
