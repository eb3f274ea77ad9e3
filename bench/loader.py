"""Benchmark: training examples per second from shards vs. through musdb, and bytes on disk.

    .venv/bin/python bench/loader.py [--songs 6] [--seconds 60] [--workdir DIR]

1. Writes a synthetic MUSDB18 dataset twice (wav and .stem.mp4) and shards the wav one with the
   defaults (lean chunking, 10 s segments + 1 s shift, float16).
2. Shard stream: `train_batches` at the default model's input length (valid_length(10 s) =
   451,924 samples) with the 1 s Shift, in this one process (workers=0) and with 1 and 2
   worker processes; examples/s over the batches after the first (the first fills the crop pool
   and starts the workers; its time is reported separately), examples per CPU-second of this
   process and its workers (torch at --threads threads here, 1 in workers), bytes per example
   handed to the device, and the peak memory of a worker. Each batch is released once counted, as
   the trainer releases its batches once they are on the device (workers then reuse their
   shared-memory buffers). FlipSign, FlipChannels and Remix now
   run on the device (`augment_step`, timed here on this CPU for scale, not part of the host cost).
   (Up to commit 6d1d52a the loader also augmented and built float32 mix + sources on the host;
   the "before" numbers in docs/benchmarks.md are this script at that commit.)
3. musdb path: the same kind of example read the way a musdb-based loader does, per example:
   set chunk_start/chunk_duration and read each source's `.audio`, then z-score, shift and crop.
4. Bytes: the train shards against the raw 16-bit audio of the four stems of the training songs
   (the unit of docs/benchmarks.md's storage arithmetic), and what the paper's chunking would write (plan only).
Prints a markdown section (for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from demucs_dist import SAMPLERATE, SOURCES
from demucs_dist.config import ModelConfig
from demucs_dist.data.augment import AugmentConfig, augment_step
from demucs_dist.data.loader import POOL_CHUNKS, train_batches
from demucs_dist.data.manifest import read_manifest
from demucs_dist.data.shard import ShardConfig, describe, make_plan, write_shards
from demucs_dist.data.songs import open_tracks
from demucs_dist.data.synth import synthesize
from demucs_dist.model import Demucs


def open_loader(shards: str, segment: int, batch_size: int, batches: int, workers: int):
    """(loader, the tensors of one batch that go to the device)."""
    options = dict(segment_samples=segment, batch_size=batch_size, batches=batches, epoch=0, seed=0, rank=0,
                   world_size=1, workers=workers, augment=AugmentConfig())  # fmt: skip
    return train_batches(shards, read_manifest(shards), **options), lambda item: [item.sources]


def augment_rate(shards: str, segment: int, batch_size: int, steps: int = 5) -> float:
    """Examples/s of `augment_step` plus the mixture on this CPU, over batches of the stream."""
    batches = [b.sources for b in open_loader(shards, segment, batch_size, steps, 0)[0]]
    start = time.perf_counter()
    for index, sources in enumerate(batches):
        augmented = augment_step(sources, AugmentConfig(), torch.Generator().manual_seed(index))
        augmented.sum(1)
    return steps * batch_size / (time.perf_counter() - start)


def shard_rate(shards: str, segment: int, batch_size: int, batches: int, workers: int, memory: bool) -> dict:
    """One epoch of `batches` batches: seconds to the first batch; after it, examples/s, CPU seconds
    (this process and its loader workers) per example and bytes per example handed to the device;
    with `memory`, instead the peak unique (USS) and resident (RSS) memory of a worker process (its
    readings of /proc/PID/smaps take milliseconds each, so they get a run of their own)."""
    loader, tensors = open_loader(shards, segment, batch_size, batches, workers)
    me = psutil.Process()

    def cpu() -> float:
        total = sum(me.cpu_times()[:2])
        for child in me.children():
            try:
                total += sum(child.cpu_times()[:2])
            except psutil.NoSuchProcess:
                pass
        return total

    uss, rss = 0, 0
    start = time.perf_counter()
    iterator = iter(loader)
    item = next(iterator)
    first, cpu_first = time.perf_counter(), cpu()
    sent = 0
    for index in range(batches - 1):
        item = next(iterator)
        parts = tensors(item)
        assert parts[-1].shape == (batch_size, 4, 2, segment)
        sent += sum(t.numel() * t.element_size() for t in parts)
        item.release()  # as the trainer does once the step's batches are on the device
        if index == batches - 2:
            cpu_last = cpu()  # before the loader stops its workers
        for child in me.children() if memory else []:
            try:
                info = child.memory_full_info()
                uss, rss = max(uss, info.uss), max(rss, info.rss)
            except psutil.NoSuchProcess:
                pass
    end = time.perf_counter()
    next(iterator, None)
    examples = (batches - 1) * batch_size
    return {
        "first": first - start,
        "rate": examples / (end - first),
        "per_core": examples / max(1e-9, cpu_last - cpu_first),
        "bytes": sent / examples,
        "uss": uss,
        "rss": rss,
    }


def musdb_rate(root: Path, is_wav: bool, segment: int, examples: int) -> float:
    """Examples/s reading each example's four sources through musdb (an ffmpeg call per source)."""
    tracks = open_tracks(root, is_wav, "train")
    rng = np.random.default_rng(0)
    shift = SAMPLERATE
    span = (segment + shift) / SAMPLERATE
    start = time.perf_counter()
    for i in range(examples):
        track = tracks[i % len(tracks)]
        track.chunk_start = float(rng.uniform(0, track.duration - span - 0.1))
        track.chunk_duration = span
        mixture = track.audio.T.mean(0)  # per-song statistics would be precomputed; this is cheap anyway
        mean, std = mixture.mean(), mixture.std()
        sources = []
        for name in SOURCES:
            audio = (track.targets[name].audio.T - mean) / std
            offset = int(rng.integers(0, shift))
            sources.append(torch.from_numpy(audio[:, offset : offset + segment]).float())
        assert torch.stack(sources).shape == (4, 2, segment)
    return examples / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--songs", type=int, default=4, help="training songs (plus 2 validation songs)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each song")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=25, help="batches per shard-stream measurement")
    parser.add_argument("--musdb-examples", type=int, default=8, help="examples per musdb measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (workers use 1)")
    parser.add_argument("--workdir", default=None, help="where to write the data (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        t0 = time.perf_counter()
        wav = synthesize(work / "musdb_wav", args.songs, 2, 0, args.seconds, "wav")
        stems = synthesize(work / "musdb_stems", args.songs, 2, 0, args.seconds, "stems")
        shards = work / "shards"
        config = ShardConfig(musdb=str(wav), is_wav=True, out=str(shards), workers=2)
        manifest = write_shards(config)
        setup = time.perf_counter() - t0
        paper, paper_tasks, _ = make_plan(ShardConfig(musdb=str(wav), is_wav=True, chunking="paper"))

        segment = Demucs.valid_length(ModelConfig(), 10 * SAMPLERATE)
        rows, details = [], []
        for workers in (0, 1, 2):
            got = shard_rate(str(shards), segment, args.batch_size, args.batches, workers, memory=False)
            if workers:
                memory = shard_rate(str(shards), segment, args.batch_size, args.batches, workers, memory=True)
                got["uss"], got["rss"] = memory["uss"], memory["rss"]
            rows.append((f"shards, workers={workers}", got["rate"], f"first batch after {got['first']:.2f} s"))
            worker_memory = f"{got['uss'] / 1e6:.0f} MB / {got['rss'] / 1e6:.0f} MB" if workers else "-"
            rate, per_core, megabytes = got["rate"], got["per_core"], got["bytes"] / 1e6
            details.append(f"| {workers} | {rate:.1f} | {per_core:.1f} | {megabytes:.2f} | {worker_memory} |")
        augmented = augment_rate(str(shards), segment, args.batch_size)
        for label, root, is_wav in (("musdb .stem.mp4", stems, False), ("musdb wav", wav, True)):
            rows.append((f"{label}, per example", musdb_rate(root, is_wav, segment, args.musdb_examples), ""))

        musdb_best = max(rate for label, rate, _ in rows if label.startswith("musdb"))
        stored = sum(s.bytes for s in manifest.train)
        raw = manifest.raw_train_bytes
        chunk_mb = 4 * 2 * manifest.chunking.chunk_length * 2 / 1e6
        wav_bytes = sum(p.stat().st_size for p in (wav / "train").rglob("*.wav") if "Valid" not in str(p))
        lines = [
            "## Data loader",
            "",
            f"`bench/loader.py --songs {args.songs} --seconds {args.seconds:g}` on {platform.machine()}, "
            f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}, torch {torch.__version__}; "
            f"synthetic data ({args.songs} train songs of {args.seconds:g} s), page cache warm. "
            f"Examples are the default model's input: {segment} samples (10 s) x 4 stereo sources, "
            f"cropped with the 1 s shift, float16 (shards); batch {args.batch_size}.",
            "",
            "| path | examples/s | note |",
            "|---|---:|---|",
            *[f"| {label} | {rate:.1f} | {note} |" for label, rate, note in rows],
            "",
            f"Shard stream vs the fastest musdb path: {rows[0][1] / musdb_best:.0f}x (workers=0), "
            f"{max(r[1] for r in rows[:3]) / musdb_best:.0f}x (best). Target: >= 10x.",
            "",
            "Host cost of the shard stream (CPU seconds of this process and its workers, after the first batch):",
            "",
            "| workers | examples/s | examples per CPU-second | MB per example to the device | worker peak USS / RSS |",
            "|---:|---:|---:|---:|---|",
            *details,
            "",
            f"Crop pool: {POOL_CHUNKS} chunks of {chunk_mb:.1f} MB = {POOL_CHUNKS * chunk_mb:.0f} MB per worker. "
            f"On the device (here this CPU, {torch.get_num_threads()} thread(s)): augment_step + mixture, "
            f"{augmented:.1f} examples/s.",
            "",
            "| bytes on disk | MB | vs raw 16-bit stems |",
            "|---|---:|---:|",
            f"| raw 16-bit stems of the train songs (4 x 2 ch x 2 B) | {raw / 1e6:.1f} | 1.00x |",
            f"| train wav files (mixture + 4 stems) | {wav_bytes / 1e6:.1f} | {wav_bytes / raw:.2f}x |",
            f"| train shards, lean default (float16) | {stored / 1e6:.1f} | {stored / raw:.2f}x |",
            f"| paper chunking (11 s every 1 s), planned | {paper.planned_bytes.train / 1e6:.1f} | "
            f"{paper.planned_bytes.train / raw:.2f}x |",
            "",
            "Lean default plan, as `demucs-dist shard` prints it:",
            "",
            "```",
            describe(manifest, [t for t in make_plan(config)[1]]),
            "```",
            "",
            f"(Setup — synthesis of both layouts and sharding — took {setup:.0f} s; the paper plan: "
            f"{sum(len(t.items) for t in paper_tasks if t.name.startswith('train/'))} chunks.)",
        ]
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
