"""Streaming loader and augmentations: disjoint ranks, equal batch counts, exact augmentations."""

from __future__ import annotations

import json

import pytest
import torch

from demucs_dist import SAMPLERATE
from demucs_dist.data.augment import (
    AugmentConfig,
    assemble_batch,
    augment_batch,
    flip_channels,
    flip_sign,
    remix,
    shift_crop,
)
from demucs_dist.data.loader import (
    _generator,
    _TrainStream,
    examples_per_epoch,
    read_manifest,
    read_samples,
    train_loader,
    valid_songs,
)
from demucs_dist.errors import UserError
from demucs_dist.model import Demucs

SEGMENT = Demucs(channels=4, depth=3).valid_length(SAMPLERATE // 2)  # a small test model's input length


def batches_of(shards, manifest, **options):
    defaults = dict(segment=SEGMENT, batch_size=3, batches=4, epoch=0, seed=0, rank=0, world_size=1, workers=0)
    defaults.update(options)
    augment = defaults.pop("augment", AugmentConfig(shift=0.25))
    return list(train_loader(str(shards), manifest, augment=augment, **defaults))


def test_batches_have_the_model_length_and_mix_is_the_sum(synth_shards):
    manifest = read_manifest(str(synth_shards))
    assert examples_per_epoch(manifest) == sum(s["samples"] for s in manifest["train"]) * manifest["chunking"]["crops"]
    batches = batches_of(synth_shards, manifest, batch_size=5, batches=3)
    assert len(batches) == 3
    for mix, sources in batches:
        assert mix.shape == (5, 2, SEGMENT) and sources.shape == (5, 4, 2, SEGMENT)
        assert mix.dtype == sources.dtype == torch.float32
        torch.testing.assert_close(mix, sources.sum(1), rtol=0, atol=0)
        assert 0.1 < sources.std() < 10  # z-scored audio, not zeros or raw 16-bit values


def test_two_ranks_with_two_workers_read_disjoint_shards_that_cover_every_sample(synth_shards):
    manifest = read_manifest(str(synth_shards))
    everything = {
        f"{shard['name']}/{sample['__key__']}"
        for shard in manifest["train"]
        for sample in read_samples(str(synth_shards / shard["name"]))
    }
    assert len(everything) == sum(s["samples"] for s in manifest["train"])
    for world_size, workers in ((2, 2), (4, 3)):  # 4 slots <= 8 shards; 12 slots > 8 shards (sample split)
        seen = []
        for rank in range(world_size):
            stream = _TrainStream(
                str(synth_shards), manifest, SEGMENT, 2, 0, 0, rank, world_size, workers, AugmentConfig()
            )
            for worker in range(workers):
                seen += [key for key, _ in stream.chunks(worker, _generator(rank, worker), passes=1)]
        assert len(seen) == len(set(seen)) and set(seen) == everything, (world_size, workers)


def test_every_rank_gets_exactly_the_requested_batches_with_worker_processes(synth_shards):
    manifest = read_manifest(str(synth_shards))
    counts = [
        len(batches_of(synth_shards, manifest, batches=7, rank=rank, world_size=2, workers=2)) for rank in range(2)
    ]
    assert counts == [7, 7]


def test_same_seed_same_batches_other_epoch_other_batches(synth_shards):
    manifest = read_manifest(str(synth_shards))
    first = batches_of(synth_shards, manifest, workers=2, seed=5, epoch=1)
    again = batches_of(synth_shards, manifest, workers=2, seed=5, epoch=1)
    other = batches_of(synth_shards, manifest, workers=2, seed=5, epoch=2)
    for (mix_a, src_a), (mix_b, src_b) in zip(first, again):
        assert torch.equal(mix_a, mix_b) and torch.equal(src_a, src_b)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other))


def test_ranks_see_different_examples(synth_shards):
    manifest = read_manifest(str(synth_shards))
    plain = AugmentConfig(shift=0, flip_sign=False, flip_channels=False, remix=False)
    rank0 = torch.cat([s for _, s in batches_of(synth_shards, manifest, rank=0, world_size=2, augment=plain)])
    rank1 = torch.cat([s for _, s in batches_of(synth_shards, manifest, rank=1, world_size=2, augment=plain)])
    # Crops of disjoint chunks can overlap in time only by sharing a song region across two chunks;
    # identical examples on two ranks would mean both read the same chunk.
    assert not any(torch.equal(a, b) for a in rank0 for b in rank1)


def test_segment_longer_than_the_chunks_is_a_clear_error(synth_shards):
    manifest = read_manifest(str(synth_shards))
    too_long = manifest["chunking"]["min_chunk_length"]
    with pytest.raises(UserError, match="reshard with a longer --segment"):
        batches_of(synth_shards, manifest, segment=too_long)


def test_shards_through_a_pipe_command(synth_shards):
    template = f"pipe:cat {synth_shards}/{{}}"
    manifest = read_manifest(template)
    assert manifest == json.loads((synth_shards / "manifest.json").read_text())
    assert len(batches_of(template, manifest, batches=2)) == 2


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no manifest.json"):
        read_manifest(str(tmp_path))


def test_validation_songs_are_split_across_ranks(synth_shards):
    manifest = read_manifest(str(synth_shards))
    per_rank = [list(valid_songs(str(synth_shards), manifest, rank=r, world_size=3)) for r in range(3)]
    assert [len(songs) for songs in per_rank] == [1, 1, 0]  # 2 songs on 3 ranks: one rank gets none
    names = [song.name for songs in per_rank for song in songs]
    assert sorted(names) == manifest["songs"]["valid"]
    for song in per_rank[0] + per_rank[1]:
        stats = manifest["stats"][song.name]
        assert song.mix.shape == (2, stats["length"]) and song.sources.shape == (4, 2, stats["length"])
        assert song.mix.dtype == torch.float32
        assert (song.mean, song.std) == (stats["mean"], stats["std"])
        assert song.mix.mean(0).std() == pytest.approx(1.0, rel=1e-2)  # z-scored by its own mono mix


def test_flip_sign_and_flip_channels_are_involutions():
    batch = torch.randn(6, 4, 2, 100)
    for flip in (flip_sign, flip_channels):
        once = flip(batch, torch.Generator().manual_seed(3))
        twice = flip(once, torch.Generator().manual_seed(3))
        assert torch.equal(twice, batch)
        assert not torch.equal(once, batch)
    swapped = flip_channels(batch, torch.Generator().manual_seed(3))
    for item in range(6):
        for source in range(4):  # each (item, source) is kept or has its channels swapped
            assert torch.equal(swapped[item, source], batch[item, source]) or torch.equal(
                swapped[item, source], batch[item, source].flip(0)
            )


@pytest.mark.parametrize("batch_size", [8, 6, 1])
def test_remix_keeps_each_source_of_a_group_exactly_once(batch_size):
    # Item b, source s holds the value 10 * b + s everywhere.
    values = (10 * torch.arange(batch_size)[:, None] + torch.arange(4)[None, :]).float()
    batch = values[..., None, None].expand(batch_size, 4, 2, 50).clone()
    mixed = remix(batch, 4, torch.Generator().manual_seed(0))
    assert mixed.shape == batch.shape
    for first in range(0, batch_size, 4):
        group = range(first, min(first + 4, batch_size))  # the incomplete last group is remixed within itself
        for source in range(4):
            taken = sorted(int(mixed[b, source, 0, 0]) // 10 for b in group)
            assert taken == list(group)
            assert all(int(mixed[b, source, 0, 0]) % 10 == source for b in group)  # sources stay in place
    if batch_size == 8:
        assert not torch.equal(mixed, batch)


def test_shift_crop_offsets_each_source_within_the_shift():
    chunk = torch.arange(4 * 2 * 300, dtype=torch.float32).reshape(4, 2, 300)
    crop = shift_crop(chunk, start=20, length=100, max_shift=50, generator=torch.Generator().manual_seed(1))
    assert all(0 <= o < 50 for o in crop.offsets) and len(set(crop.offsets)) > 1
    for source in range(4):
        begin = 20 + crop.offsets[source]
        assert torch.equal(crop.source(source, 100), chunk[source, :, begin : begin + 100])
    with pytest.raises(ValueError):
        shift_crop(chunk, start=200, length=100, max_shift=50, generator=torch.Generator())


@pytest.mark.parametrize("batch_size", [6, 8])
def test_fast_batch_assembly_equals_the_reference_augmentations(batch_size):
    """The loader's one-copy path = stack, then flip_sign, flip_channels, remix (same draws)."""
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(4, 2, 400).half() for _ in range(batch_size)]
    crops = [shift_crop(c, int(torch.randint(0, 100, (1,))), 250, 50, generator) for c in chunks]
    stacked = torch.stack([torch.stack([c.source(s, 250) for s in range(4)]) for c in crops]).float()
    for config in (AugmentConfig(), AugmentConfig(flip_sign=False, remix=False), AugmentConfig(remix_group=3)):
        fast = assemble_batch(crops, 250, config, torch.Generator().manual_seed(9))
        reference = augment_batch(stacked, config, torch.Generator().manual_seed(9))
        assert fast.dtype == torch.float32 and torch.equal(fast, reference)


def test_a_brace_pattern_trains_on_the_named_shards(synth_shards):
    pattern = str(synth_shards) + "/train/{000000..000002}.tar"
    manifest = read_manifest(pattern)
    assert [s["name"] for s in manifest["train"]] == [f"train/00000{i}.tar" for i in range(3)]
    assert len(manifest["valid"]) == len(read_manifest(str(synth_shards))["valid"])
    segment = 20000
    batches = list(train_loader(pattern, manifest, segment=segment, batch_size=2, batches=2, epoch=0, seed=0,
                                rank=0, world_size=1, workers=0, augment=AugmentConfig()))  # fmt: skip
    assert len(batches) == 2 and batches[0][1].shape == (2, 4, 2, segment)
    with pytest.raises(UserError, match="not training shards"):
        read_manifest(str(synth_shards) + "/train/{000000,999999}.tar")
