"""The shard manifest (`manifest.json`): the one contract between the shard writer and the loader.

`demucs-dist shard` writes it next to `train/` and `valid/`; the trainer reads it to know the
shards, their sample counts, how chunks were cut and each song's normalisation statistics.
Here it is typed (`Manifest` and the records it holds), read, written and checked:

- Where shards live (`shards`): a local folder, a URL base that webdataset opens (`http://...`,
  `s3://...` through its handlers), a template with `{}` standing for a path inside the shard
  folder (`pipe:aws s3 cp s3://bucket/shards/{} -`), or a brace pattern of training shards
  (`shards/train/{000000..000099}.tar`: those shards only).
- Version: a manifest of another `MANIFEST_VERSION` is refused with one line that says to reshard
  (version 2 spreads every song's chunks over all shards; version 1 packed songs one after another).
- Data is never code: every shard name is checked against `SHARD_NAME` when a manifest is read,
  before it can reach a URL or a `pipe:` shell command.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from braceexpand import braceexpand

from ..errors import UserError
from ..files import atomic_path

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: chunks of all songs spread over the shards (a seeded global permutation)
SHARD_NAME = re.compile(r"^(train|valid)/\d{6}\.tar$")
RESHARD = "reshard: rerun the same `demucs-dist shard` command (it rewrites every shard), or write to a new --out"


@dataclass(frozen=True)
class Chunking:
    """How training songs were cut (lengths in samples)."""

    mode: str  # lean, paper or report
    segment: float  # seconds of the training segment the shards were cut for
    shift: float  # seconds of Shift room stored beyond the model input
    training_length: int  # L: the default model's valid_length(segment) + shift
    chunk_length: int  # nominal stored chunk length
    min_chunk_length: int  # shortest stored chunk: the loader checks a training crop fits in it
    stride: int  # between chunk starts (0 for report)
    crops: int  # random crops the loader draws from each chunk per epoch
    chunks_per_minute: float | None  # report chunking only
    seed: int


@dataclass(frozen=True)
class SongStats:
    """A song's normalisation statistics (of its mono mixture) and length in samples."""

    mean: float
    std: float
    length: int


@dataclass(frozen=True)
class ShardRecord:
    """One tar shard: its name (`train/NNNNNN.tar`), samples, size and sha256, and the songs in it."""

    name: str
    samples: int
    bytes: int
    sha256: str
    songs: tuple[str, ...]


@dataclass(frozen=True)
class SongLists:
    train: tuple[str, ...]
    valid: tuple[str, ...]
    skipped: tuple[str, ...]  # training songs shorter than one chunk


@dataclass(frozen=True)
class PlannedBytes:
    train: int
    valid: int


@dataclass(frozen=True)
class Manifest:
    """Everything the loader needs to know about a shard folder."""

    version: int
    samplerate: int
    sources: tuple[str, ...]
    audio_channels: int
    dtype: str  # stored sample type: float16 or float32
    normalized: bool  # z-scored with each song's statistics (else mean 0, std 1)
    chunking: Chunking
    songs: SongLists
    stats: dict[str, SongStats]
    raw_train_bytes: int  # the training songs' four stems as 16-bit stereo PCM
    planned_bytes: PlannedBytes
    train: tuple[ShardRecord, ...]
    valid: tuple[ShardRecord, ...]

    def examples_per_epoch(self) -> int:
        """Training examples one pass draws: stored chunks times the crops taken from each."""
        return sum(shard.samples for shard in self.train) * self.chunking.crops

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST) -> Manifest:
        """A checked Manifest from parsed JSON: UserError naming `where` for an old version, a wrong
        field or a shard name that is not `train|valid/NNNNNN.tar`."""
        if not isinstance(data, dict) or "train" not in data or "chunking" not in data:
            raise UserError(f"{where} is not a demucs_dist shard manifest")
        version = data.get("version")
        if version != MANIFEST_VERSION:
            raise UserError(
                f"{where} is a shard manifest of version {version}; this demucs_dist reads version "
                f"{MANIFEST_VERSION}: {RESHARD}"
            )
        manifest = _build(cls, data, where)
        for split, records in (("train", manifest.train), ("valid", manifest.valid)):
            for record in records:
                if not SHARD_NAME.match(record.name) or not record.name.startswith(split + "/"):
                    raise UserError(
                        f"{where} lists {record.name!r} as a {split} shard, which is not a {split} shard name "
                        f"({split}/NNNNNN.tar): refusing to read it"
                    )
        return manifest


def _build(cls: type, data: Any, where: str) -> Any:
    """An instance of dataclass `cls` from a JSON object, each field converted to its annotated type."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected an object, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if field.name not in data:
            raise UserError(f"{where}: '{field.name}' is missing")
        values[field.name] = _convert(hints[field.name], data[field.name], f"{where}: {field.name}")
    return cls(**values)


def _convert(kind: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return _build(kind, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list")
        return tuple(_convert(args[0], item, where) for item in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected an object")
        return {str(key): _convert(args[1], item, f"{where}.{key}") for key, item in value.items()}
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise UserError(f"{where}: expected {kind.__name__}, found {value!r}")


# A brace pattern such as "shards/train/{000000..000009}.tar" (not the "{}" template).
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


def split_pattern(shards: str) -> tuple[str, set[str] | None]:
    """(shard folder or URL, selected shard names or None for all).

    A brace pattern names shard files, e.g. ".../train/{000000..000009}.tar": the folder two levels
    up holds the manifest, and only the named training shards are read.
    """
    if not _BRACES.search(shards):
        return shards, None
    urls = list(braceexpand(shards))
    base = urls[0].rsplit("/", 2)[0]
    if any(not url.startswith(base + "/") or url.count("/") != urls[0].count("/") for url in urls):
        raise UserError(
            f"{shards}: a brace pattern must name shard files of one shard folder (<folder>/train/NAME.tar)"
        )
    return base, {url[len(base) + 1 :] for url in urls}


def shard_url(shards: str, relative: str) -> str:
    """URL of `relative` (MANIFEST or a checked shard name) in the shard folder, URL, template or
    brace pattern `shards`. Refuses any other name: it may end up in a `pipe:` shell command."""
    if relative != MANIFEST and not SHARD_NAME.match(relative):
        raise UserError(f"{relative!r} is not a shard name (train/NNNNNN.tar or valid/NNNNNN.tar)")
    shards = split_pattern(os.fspath(shards))[0]
    if "{}" in shards:
        return shards.replace("{}", relative)
    return shards.rstrip("/") + "/" + relative


def read_manifest(shards: str | os.PathLike) -> Manifest:
    """The checked manifest of a shard folder, URL, `{}` template or brace pattern (then with the
    named training shards only); UserError if it is missing, old or not a manifest."""
    shards = os.fspath(shards)
    url = shard_url(shards, MANIFEST)
    is_local = "://" not in url and not url.startswith("pipe:")
    if is_local and not os.path.isfile(url):
        raise UserError(f"no {MANIFEST} in {shards}: write shards first (demucs-dist shard --out {shards} ...)")
    try:
        with wds.gopen(url, "rb") as stream:
            data = json.loads(stream.read())
    except Exception as exc:  # gopen raises plain OSError/ValueError for unreachable URLs; json ValueError
        raise UserError(f"cannot read {url}: {exc}") from None
    manifest = Manifest.from_dict(data, url)
    selected = split_pattern(shards)[1]
    if selected is not None:  # a brace pattern: train on the named shards only (validation stays whole)
        known = {shard.name for shard in manifest.train}
        unknown = sorted(selected - known)
        if unknown:
            raise UserError(f"{shards}: not training shards of {url}: {', '.join(unknown[:3])}")
        manifest = dataclasses.replace(manifest, train=tuple(s for s in manifest.train if s.name in selected))
    return manifest


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> Path:
    """Write `manifest` as `folder`/manifest.json (atomically: a reader never sees half a file)."""
    path = Path(folder) / MANIFEST
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest.to_dict(), indent=1, sort_keys=True))
    return path


def examples_per_epoch(manifest: Manifest) -> int:
    """Training examples one pass draws: stored chunks times the crops taken from each."""
    return manifest.examples_per_epoch()
