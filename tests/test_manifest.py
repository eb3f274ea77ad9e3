"""The shard manifest: typed round trip, version check, and shard names that are data, never code."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from demucs_dist.data.augment import AugmentConfig
from demucs_dist.data.loader import train_batches
from demucs_dist.data.manifest import (
    MANIFEST_VERSION,
    Manifest,
    ShardRecord,
    read_manifest,
    shard_url,
    write_manifest,
)
from demucs_dist.errors import UserError


def edited(shards: Path, folder: Path, edit) -> Path:
    """A copy of the shard folder whose manifest.json went through `edit(dict)` (tars copied)."""
    copy = folder / "shards"
    shutil.copytree(shards, copy)
    data = json.loads((copy / "manifest.json").read_text())
    edit(data)
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


def test_read_write_round_trip_is_typed_and_byte_identical(synth_shards, tmp_path):
    manifest = read_manifest(synth_shards)
    assert isinstance(manifest, Manifest) and manifest.version == MANIFEST_VERSION
    assert isinstance(manifest.train[0], ShardRecord) and manifest.train[0].name == "train/000000.tar"
    assert manifest.chunking.crops >= 1 and manifest.stats[manifest.songs.train[0]].std > 0
    assert manifest.examples_per_epoch() == sum(s.samples for s in manifest.train) * manifest.chunking.crops
    written = write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    assert written.read_bytes() == (synth_shards / "manifest.json").read_bytes()  # the writer writes it so


def test_an_older_manifest_version_is_refused_with_the_reshard_line(synth_shards, tmp_path):
    old = edited(synth_shards, tmp_path, lambda data: data.update(version=1))
    with pytest.raises(UserError, match=r"version 1; this demucs_dist reads version 2: reshard: rerun the same"):
        read_manifest(old)


def test_shard_names_are_validated_before_any_command_runs(synth_shards, tmp_path):
    """A manifest naming a shard 'train/000000.tar; touch X' read through a pipe: template is refused;
    the command in the name never runs."""
    marker = tmp_path / "INJECTED"

    def inject(data):
        data["train"][0]["name"] = f"train/000000.tar; touch {marker}"

    bad = edited(synth_shards, tmp_path, inject)
    template = f"pipe:cat {bad}/{{}}"
    with pytest.raises(UserError, match="is not a train shard name"):
        read_manifest(template)
    assert not marker.exists()

    # A manifest that did not come from read_manifest (built in code) is stopped at the URL.
    good = read_manifest(template.replace(str(bad), str(synth_shards)))
    record = dataclasses.replace(good.train[0], name=f"train/000000.tar; touch {marker}")
    forged = dataclasses.replace(good, train=(record, *good.train[1:]))
    loader = train_batches(template, forged, segment_samples=20000, batch_size=1, batches=len(forged.train) + 1,
                           epoch=0, seed=0, rank=0, world_size=1, workers=0,
                           augment=AugmentConfig(shift=0.25))  # fmt: skip
    with pytest.raises(UserError, match="not a shard name"):
        list(loader)
    assert not marker.exists()
    with pytest.raises(UserError, match="not a shard name"):
        shard_url(template, "../manifest.json")


def test_a_shard_listed_under_the_wrong_split_is_refused(synth_shards, tmp_path):
    swapped = edited(synth_shards, tmp_path, lambda data: data["train"][0].update(name="valid/000000.tar"))
    with pytest.raises(UserError, match="not a train shard name"):
        read_manifest(swapped)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda data: data.pop("chunking"), "is not a demucs_dist shard manifest"),
        (lambda data: data["chunking"].pop("crops"), "'crops' is missing"),
        (lambda data: data["train"][0].update(samples="many"), "samples: expected int"),
    ],
    ids=["no chunking", "missing field", "wrong type"],
)
def test_malformed_manifests_are_one_clear_line(synth_shards, tmp_path, edit, message):
    with pytest.raises(UserError, match=message):
        read_manifest(edited(synth_shards, tmp_path, edit))


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no manifest.json"):
        read_manifest(tmp_path)
