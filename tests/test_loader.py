"""Streaming loader over real shards: disjoint ranks, equal batch counts, crops that are what they
say, and songs that mix in Remix groups."""

from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SHARD_ARGS

from demucs_dist import SAMPLERATE
from demucs_dist.data.augment import AugmentConfig, shift_crop
from demucs_dist.data.loader import (
    _generator,
    _TrainStream,
    train_batches,
    valid_songs,
)
from demucs_dist.data.manifest import read_manifest
from demucs_dist.data.shard import main as shard_main
from demucs_dist.data.synth import synthesize
from demucs_dist.errors import UserError
from demucs_dist.model import Demucs

SEGMENT = Demucs(channels=4, depth=3).valid_length(SAMPLERATE // 2)  # a small test model's input length
SHIFT = 0.25  # seconds, as the test shards were cut for


def batches_of(shards, manifest, **options):
    defaults = dict(segment_samples=SEGMENT, batch_size=3, batches=4, epoch=0, seed=0, rank=0, world_size=1, workers=0)
    defaults.update(options)
    augment = defaults.pop("augment", AugmentConfig(shift=SHIFT))
    return list(train_batches(str(shards), manifest, augment=augment, **defaults))


def stored_chunks(shards: Path) -> dict[str, np.ndarray]:
    """'train/NNNNNN.tar/<key>' -> the stored chunk, read with the standard library (not our loader)."""
    chunks = {}
    for path in sorted((shards / "train").glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".sources.npy"):
                    key = member.name.split(".", 1)[0]
                    chunks[f"train/{path.name}/{key}"] = np.load(io.BytesIO(tar.extractfile(member).read()))
    return chunks


def test_batches_are_the_stored_crops_they_name_in_the_stored_dtype(synth_shards):
    manifest = read_manifest(synth_shards)
    chunks = stored_chunks(synth_shards)
    max_shift = int(SHIFT * SAMPLERATE)
    batches = batches_of(synth_shards, manifest, batch_size=5, batches=3)
    assert len(batches) == 3
    for batch in batches:
        assert batch.sources.shape == (5, 4, 2, SEGMENT) and batch.sources.dtype == torch.float16
        assert 0.1 < batch.sources.float().std() < 10  # z-scored audio, not zeros or raw 16-bit values
        assert len(batch.origins) == 5
        assert all(0 <= offset < max_shift for origin in batch.origins for offset in origin.offsets)
        check_examples(batch, chunks)


def check_examples(batch, chunks: dict[str, np.ndarray]) -> None:
    """Every example of `batch` is its origin's crop of the stored chunk, source by source."""
    for example, origin in zip(batch.sources, batch.origins):
        for source, offset in enumerate(origin.offsets):
            begin = origin.start + offset
            assert np.array_equal(example[source].numpy(), chunks[origin.chunk][source, :, begin : begin + SEGMENT])


def test_released_worker_buffers_are_reused_and_batches_stay_right(synth_shards):
    manifest = read_manifest(synth_shards)
    chunks = stored_chunks(synth_shards)
    options = dict(segment_samples=SEGMENT, batch_size=2, batches=16, epoch=0, seed=0, rank=0, world_size=1, workers=2)
    used = []
    for batch in train_batches(str(synth_shards), manifest, augment=AugmentConfig(shift=SHIFT), **options):
        check_examples(batch, chunks)  # read while the buffer is ours
        used.append((batch.slot, batch.buffer))
        batch.release()
        assert batch.sources.numel() == 0  # no reading after the release
    assert len(used) == 16 and len(set(used)) < 10  # 8 batches per worker from a few buffers
    kept = list(train_batches(str(synth_shards), manifest, augment=AugmentConfig(shift=SHIFT), **options))
    assert len({(b.slot, b.buffer) for b in kept}) == 16  # never released: never reused
    for batch in kept:
        check_examples(batch, chunks)


def test_two_ranks_with_two_workers_read_disjoint_shards_through_the_data_loader(synth_shards):
    manifest = read_manifest(synth_shards)
    shards_of: dict[int, set[str]] = {}  # slot -> shards it read
    ranks_of: dict[int, set[int]] = {}
    for rank in range(2):
        # 8 shards of 2 chunks: 2 slots per rank, 2 shards (4 chunks) per slot, read twice over.
        for batch in batches_of(synth_shards, manifest, batch_size=2, batches=8, rank=rank, world_size=2, workers=2):
            shards_of.setdefault(batch.slot, set()).update(o.chunk.rsplit("/", 1)[0] for o in batch.origins)
            ranks_of.setdefault(batch.slot, set()).add(rank)
    assert sorted(shards_of) == [0, 1, 2, 3]  # every worker of both ranks produced batches
    assert all(ranks == {slot // 2} for slot, ranks in ranks_of.items())
    everything = [name for names in shards_of.values() for name in names]
    assert len(everything) == len(set(everything))  # no shard read by two slots (so by two ranks)
    assert set(everything) == {s.name for s in manifest.train}


# A rank reading batches with 2 workers, under the command line's SIGTERM handling (as `train` runs).
RANK_READING = """
import sys
from demucs_dist.data.augment import AugmentConfig
from demucs_dist.data.loader import train_batches
from demucs_dist.data.manifest import read_manifest
from demucs_dist.errors import run_main

def main(argv):
    shards, segment = argv
    batches = train_batches(shards, read_manifest(shards), augment=AugmentConfig(shift=0.25), batches=10**6,
                            segment_samples=int(segment), batch_size=2, epoch=0, seed=0, rank=0, world_size=1,
                            workers=2)
    for i, _ in enumerate(batches):
        if i == 2:  # both workers have produced a batch: they are set up
            print("reading", flush=True)

sys.exit(run_main(main))
"""


def test_sigterm_to_the_rank_and_its_workers_stops_them_without_a_data_loader_traceback(synth_shards):
    """torchrun stops a rank with SIGTERM to its whole process group (SLURM's scancel: to every
    process of the job). A worker that died of it reached the rank's DataLoader before the rank's
    own stop did: "DataLoader worker ... is killed by signal: Terminated" in the job log."""
    process = subprocess.Popen([sys.executable, "-c", RANK_READING, str(synth_shards), str(SEGMENT)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    try:
        assert process.stdout.readline() == "reading\n", process.stderr.read()
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143 and stderr.strip() == "terminated", stderr
    deadline = time.monotonic() + 10
    while not gone(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(process.pid), "a worker outlived its rank"


def gone(group: int) -> bool:
    """Whether no process is left in the process group `group`."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return True
    return False


def test_slots_cover_every_sample_once_also_with_more_slots_than_shards(synth_shards):
    manifest = read_manifest(synth_shards)
    everything = set(stored_chunks(synth_shards))
    for world_size, workers in ((2, 2), (4, 3)):  # 4 slots <= 8 shards; 12 slots > 8 shards (sample split)
        seen = []
        for rank in range(world_size):
            stream = _TrainStream(str(synth_shards), manifest, SEGMENT, 2, 0, 0, rank, world_size, workers, 0, 4)
            for worker in range(workers):
                seen += [chunk.chunk for chunk in stream.chunks(worker, _generator(rank, worker), passes=1)]
        assert len(seen) == len(set(seen)) and set(seen) == everything, (world_size, workers)


def test_too_few_chunks_per_worker_for_a_remix_group_is_said_once(synth_shards, capsys):
    manifest = read_manifest(synth_shards)
    batches_of(synth_shards, manifest, batches=1, world_size=3, workers=2)  # 8 shards of 2 over 6 workers
    batches_of(synth_shards, manifest, batches=1, world_size=3, workers=2)
    assert capsys.readouterr().err.count("note: a loader worker holds only 2 chunk(s)") == 1
    batches_of(synth_shards, manifest, batches=1, world_size=2, workers=2)  # 4 chunks each: enough
    assert "note:" not in capsys.readouterr().err


def test_every_rank_gets_exactly_the_requested_batches_with_worker_processes(synth_shards):
    manifest = read_manifest(synth_shards)
    counts = [
        len(batches_of(synth_shards, manifest, batches=7, rank=rank, world_size=2, workers=2)) for rank in range(2)
    ]
    assert counts == [7, 7]


def test_same_seed_same_batches_other_epoch_other_batches(synth_shards):
    manifest = read_manifest(synth_shards)
    first = batches_of(synth_shards, manifest, workers=2, seed=5, epoch=1)
    again = batches_of(synth_shards, manifest, workers=2, seed=5, epoch=1)
    other = batches_of(synth_shards, manifest, workers=2, seed=5, epoch=2)
    for a, b in zip(first, again):
        assert torch.equal(a.sources, b.sources) and a.origins == b.origins
    assert not all(torch.equal(a.sources, b.sources) for a, b in zip(first, other))


def test_ranks_see_different_examples(synth_shards):
    manifest = read_manifest(synth_shards)
    rank0 = torch.cat([b.sources for b in batches_of(synth_shards, manifest, rank=0, world_size=2)])
    rank1 = torch.cat([b.sources for b in batches_of(synth_shards, manifest, rank=1, world_size=2)])
    # Crops of disjoint chunks can overlap in time only by sharing a song region across two chunks;
    # identical examples on two ranks would mean both read the same chunk.
    assert not any(torch.equal(a, b) for a in rank0 for b in rank1)


def test_segment_longer_than_the_chunks_is_a_clear_error(synth_shards):
    manifest = read_manifest(synth_shards)
    with pytest.raises(UserError, match="reshard with a longer --segment"):
        batches_of(synth_shards, manifest, segment_samples=manifest.chunking.min_chunk_length)


def test_shards_through_a_pipe_command(synth_shards):
    template = f"pipe:cat {synth_shards}/{{}}"
    manifest = read_manifest(template)
    assert manifest == read_manifest(synth_shards)
    assert len(batches_of(template, manifest, batches=2)) == 2


def test_validation_songs_are_split_across_ranks(synth_shards):
    manifest = read_manifest(synth_shards)
    per_rank = [list(valid_songs(str(synth_shards), manifest, rank=r, world_size=3)) for r in range(3)]
    assert [len(songs) for songs in per_rank] == [1, 1, 0]  # 2 songs on 3 ranks: one rank gets none
    names = [song.name for songs in per_rank for song in songs]
    assert tuple(sorted(names)) == manifest.songs.valid
    for song in per_rank[0] + per_rank[1]:
        stats = manifest.stats[song.name]
        assert song.mix.shape == (2, stats.length) and song.sources.shape == (4, 2, stats.length)
        assert song.mix.dtype == torch.float32
        assert (song.mean, song.std) == (stats.mean, stats.std)
        assert song.mix.mean(0).std() == pytest.approx(1.0, rel=1e-2)  # z-scored by its own mono mix


def test_shift_crop_offsets_each_source_within_the_shift():
    chunk = torch.arange(4 * 2 * 300, dtype=torch.float32).reshape(4, 2, 300)
    crop = shift_crop(chunk, start=20, length=100, max_shift=50, generator=torch.Generator().manual_seed(1))
    assert all(0 <= o < 50 for o in crop.offsets) and len(set(crop.offsets)) > 1
    for source in range(4):
        begin = 20 + crop.offsets[source]
        assert torch.equal(crop.source(source, 100), chunk[source, :, begin : begin + 100])
    with pytest.raises(ValueError):
        shift_crop(chunk, start=200, length=100, max_shift=50, generator=torch.Generator())


def test_a_brace_pattern_trains_on_the_named_shards(synth_shards):
    pattern = str(synth_shards) + "/train/{000000..000002}.tar"
    manifest = read_manifest(pattern)
    assert [s.name for s in manifest.train] == [f"train/00000{i}.tar" for i in range(3)]
    assert manifest.valid == read_manifest(synth_shards).valid
    batches = batches_of(pattern, manifest, segment_samples=20000, batch_size=2, batches=2)
    assert len(batches) == 2 and batches[0].sources.shape == (2, 4, 2, 20000)
    assert {o.chunk.rsplit("/", 1)[0] for b in batches for o in b.origins} <= {s.name for s in manifest.train}
    with pytest.raises(UserError, match="not training shards"):
        read_manifest(str(synth_shards) + "/train/{000000,999999}.tar")


# Songs mixing: 16 songs of 3.5 s, lean chunks of ~2 s every ~1 s (3 per song) with 4 crops each,
# ~4 chunks per shard (12 shards), read by 2 ranks x 2 workers in device batches of 4.
MIX_SONGS, CROPS, GROUP = 16, 4, 4


@pytest.fixture(scope="session")
def mixing_shards(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("mixing")
    root = synthesize(work / "musdb", train=MIX_SONGS, valid=1, test=0, seconds=3.5, seed=1)
    options = [a for a in SHARD_ARGS if a not in ("--shard-size", "3")]
    shard_main(["--musdb", str(root), "--is-wav", "--out", str(work / "shards"), *options,
                "--crops", str(CROPS), "--shard-size", "6"])  # fmt: skip
    return work / "shards"


def uniform_same_song_fraction(examples_per_song: list[int], group: int) -> float:
    """P(a group of `group` examples drawn uniformly without replacement holds 2+ of one song):
    1 - e_group(n_1..n_k) / C(total, group), e the elementary symmetric polynomial of the counts."""
    symmetric = [1] + [0] * group
    for count in examples_per_song:
        for k in range(group, 0, -1):
            symmetric[k] += symmetric[k - 1] * count
    return 1 - symmetric[group] / math.comb(sum(examples_per_song), group)


@pytest.mark.slow
def test_remix_groups_mix_songs_like_a_uniform_shuffle_and_never_repeat_a_chunk(mixing_shards):
    """Through the real loader (DataLoader workers), the fraction of Remix groups (4 consecutive
    examples of a rank) holding 2+ examples of one song is at most 1.5x a uniform shuffle's, and no
    group holds two crops of one chunk (overlapping audio)."""
    manifest = read_manifest(mixing_shards)
    assert len(manifest.train) >= 8 and len(manifest.songs.train) == MIX_SONGS
    per_song = Counter()
    for chunk in stored_chunks(mixing_shards):
        per_song[chunk.rsplit("/", 1)[1].split("_")[0]] += CROPS
    uniform = uniform_same_song_fraction(list(per_song.values()), GROUP)
    groups = []
    for epoch in range(3):
        for rank in range(2):
            batches = batches_of(mixing_shards, manifest, batch_size=4, batches=24, epoch=epoch, rank=rank,
                                 world_size=2, workers=2, augment=AugmentConfig(shift=SHIFT))  # fmt: skip
            examples = [origin for batch in batches for origin in batch.origins]
            groups += [examples[i : i + GROUP] for i in range(0, len(examples), GROUP)]
    same_song = sum(len({o.song for o in g}) < GROUP for g in groups) / len(groups)
    same_chunk = sum(len({o.chunk for o in g}) < GROUP for g in groups)
    assert same_chunk == 0
    assert same_song <= 1.5 * uniform, (same_song, uniform)


def test_uniform_fraction_formula():
    assert uniform_same_song_fraction([1, 1, 1, 1], 4) == 0  # 4 songs, one example each: always distinct
    assert uniform_same_song_fraction([4], 4) == 1
    rng = np.random.default_rng(0)
    examples = np.repeat(np.arange(5), 6)
    groups = [rng.permutation(examples)[:4] for _ in range(20000)]
    simulated = np.mean([len(set(g)) < 4 for g in groups])
    assert simulated == pytest.approx(uniform_same_song_fraction([6] * 5, 4), abs=0.01)
