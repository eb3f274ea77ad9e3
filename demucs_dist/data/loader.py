"""Streaming training and validation data from the shards that `demucs-dist shard` writes.

Where shards live (`shards`): a local folder, a URL base that webdataset opens (`http://...`,
`s3://...` through its handlers), or a template with `{}` standing for a path inside the shard
folder, such as `pipe:aws s3 cp s3://bucket/shards/{} -`. The folder holds `manifest.json`,
`train/*.tar` and `valid/*.tar`; the manifest lists the shards and says how chunks were cut.

Training stream, per epoch:
1. The train shards are shuffled with (seed, epoch) and dealt to the world_size x workers
   "slots" (one per worker of each rank), balancing sample counts: slots read disjoint shards.
   With fewer shards than slots every slot reads all shards and keeps every n-th sample instead.
2. Each worker cycles through its shards (reshuffled each pass), a few open at once and
   interleaved so that a batch mixes songs; each stored chunk yields `crops` random crops of
   the training length plus the shift (the storage-lean chunking stores fewer, longer chunks).
3. A shuffle buffer, then Shift (per-source crop), batching, FlipSign, FlipChannels and Remix;
   the mixture is the sum of the augmented sources.
4. Every rank stops after exactly `batches` batches (uneven ranks would hang DDP).

A shard that cannot be read (truncated, corrupt tar, undecodable array) stops training with a
message naming it (`--on-bad-shard stop`), or is skipped with a warning and counted (`skip`): the
stream repeats, so every rank still gets its `batches` batches. Workers report a bad shard as a
`BadShard` item rather than an exception, because DataLoader re-raises worker exceptions with the
worker's traceback in the message, and the user should get one line.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand

from ..config import option
from ..errors import UserError
from .augment import AugmentConfig, Crop, assemble_batch, shift_crop

MANIFEST = "manifest.json"
INTERLEAVE = 4  # shards a worker reads at once: batches mix songs even when a shard holds few


@dataclass
class LoaderConfig:
    """Data loading"""

    on_bad_shard: str = option(
        "stop",
        "a training shard that cannot be read: stop with its name, or skip it with a warning (counted)",
        choices=["stop", "skip"],
    )


@dataclass
class BadShard:
    """What a worker sends instead of a batch when a shard cannot be read."""

    message: str
    fatal: bool


class _ShardReadError(Exception):
    """Raised inside a worker's stream in `stop` mode; turned into a fatal BadShard."""


@dataclass
class ValidSong:
    """One whole validation song, z-scored with its own mean and std (as stored in the shards)."""

    name: str
    mix: torch.Tensor  # (channels, time) float32
    sources: torch.Tensor  # (sources, channels, time) float32
    mean: float
    std: float


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
    """URL of `relative` (e.g. 'train/000000.tar') in the shard folder, URL, template or brace pattern `shards`."""
    shards = split_pattern(shards)[0]
    if "{}" in shards:
        return shards.replace("{}", relative)
    return shards.rstrip("/") + "/" + relative


def read_manifest(shards: str) -> dict:
    """Read `manifest.json` from a shard folder or URL; UserError if it is missing or not a manifest."""
    url = shard_url(os.fspath(shards), MANIFEST)
    is_local = "://" not in url and not url.startswith("pipe:")
    if is_local and not os.path.isfile(url):
        raise UserError(f"no {MANIFEST} in {shards}: write shards first (demucs-dist shard --out {shards} ...)")
    try:
        with wds.gopen(url, "rb") as stream:
            manifest = json.loads(stream.read())
    except Exception as exc:  # gopen raises plain OSError/ValueError for unreachable URLs
        raise UserError(f"cannot read {url}: {exc}") from None
    if not isinstance(manifest, dict) or "train" not in manifest or "chunking" not in manifest:
        raise UserError(f"{url} is not a demucs_dist shard manifest")
    selected = split_pattern(os.fspath(shards))[1]
    if selected is not None:  # a brace pattern: train on the named shards only (validation stays whole)
        known = {shard["name"] for shard in manifest["train"]}
        unknown = sorted(selected - known)
        if unknown:
            raise UserError(f"{shards}: not training shards of {url}: {', '.join(unknown[:3])}")
        manifest = dict(manifest, train=[shard for shard in manifest["train"] if shard["name"] in selected])
    return manifest


def examples_per_epoch(manifest: dict) -> int:
    """Training examples one epoch draws: stored chunks times the crops taken from each."""
    return sum(shard["samples"] for shard in manifest["train"]) * manifest["chunking"]["crops"]


def _generator(*key: int) -> torch.Generator:
    """A torch generator seeded from several integers (seed, epoch, rank, worker, ...)."""
    state = np.random.SeedSequence([k % 2**63 for k in key]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) % 2**63)


def _permutation(items: list, generator: torch.Generator) -> list:
    return [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]


def slot_shards(manifest: dict, *, epoch: int, seed: int, world_size: int, workers: int) -> list[tuple[list[str], int]]:
    """For each slot (rank * workers + worker) its train shard names and a sample stride.

    A stride of 1 means "every sample of these shards"; with fewer shards than slots every slot
    gets all shards with stride = number of slots and keeps sample n (numbered across the shards in
    manifest order) when n = slot mod stride.
    The assignment depends on (seed, epoch) only, so all ranks compute the same one.
    """
    slots = world_size * max(1, workers)
    shards = _permutation([s for s in manifest["train"] if s["samples"] > 0], _generator(seed, epoch, 7))
    if not shards:
        raise UserError("the manifest lists no training samples")
    if len(shards) < slots:
        names = [s["name"] for s in shards]
        return [(names, slots) for _ in range(slots)]
    # Largest first (ties keep the shuffled order), each to the slot holding the fewest samples.
    shards.sort(key=lambda s: -s["samples"])
    assigned: list[list[str]] = [[] for _ in range(slots)]
    totals = [0] * slots
    for shard in shards:
        slot = totals.index(min(totals))
        assigned[slot].append(shard["name"])
        totals[slot] += shard["samples"]
    return [(names, 1) for names in assigned]


def decode_array(data: bytes) -> torch.Tensor:
    """A stored .npy member as a tensor of its stored dtype (float16 stays float16: half the memory)."""
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))


def _reason(exc: BaseException) -> str:
    """A read error in one short line (webdataset wraps tarfile's message with the stream's repr)."""
    text = str(exc.args[0]) if exc.args and isinstance(exc.args[0], str) else str(exc)
    return f"{type(exc).__name__}: {text.split(' @ <')[0].splitlines()[0] if text else ''}"


def read_samples(url: str) -> Iterator[dict]:
    """Raw samples (webdataset dicts: '__key__', 'json', 'sources.npy', ...) of one tar shard."""
    yield from wds.tarfile_samples([{"url": url}])


class _TrainStream(torch.utils.data.IterableDataset):
    """The batches of one rank; in a DataLoader each worker produces its own share."""

    def __init__(self, shards: str, manifest: dict, segment: int, batch_size: int, epoch: int, seed: int,
                 rank: int, world_size: int, workers: int, augment: AugmentConfig,
                 on_bad_shard: str = "stop"):  # fmt: skip
        super().__init__()
        self.on_bad_shard = on_bad_shard
        self.bad: list[str] = []  # warnings about skipped shards, not yet sent (per worker process)
        self.bad_seen = False
        self.known_bad: set[str] = set()
        self.shards, self.manifest, self.segment, self.batch_size = shards, manifest, segment, batch_size
        self.epoch, self.seed, self.rank, self.world_size, self.workers = epoch, seed, rank, world_size, workers
        self.augment = augment
        self.max_shift = int(round(augment.shift * manifest["samplerate"]))
        self.crops = manifest["chunking"]["crops"]
        self.slot_shards = slot_shards(manifest, epoch=epoch, seed=seed, world_size=world_size, workers=workers)
        # Number of each shard's first sample in manifest order: the sample split keeps sample n in slot n % slots.
        counts = [s["samples"] for s in manifest["train"]]
        firsts = itertools.accumulate([0] + counts[:-1])
        self.first_sample = {s["name"]: first for s, first in zip(manifest["train"], firsts)}

    def buffer_size(self, slot: int) -> int:
        """Shuffle buffer: 64 examples or 4 batches, but never more than one pass over the slot's
        examples (a tiny dataset would otherwise fill it by repeating itself)."""
        names, stride = self.slot_shards[slot]
        counts = {s["name"]: s["samples"] for s in self.manifest["train"]}
        examples = sum(counts[name] for name in names) // stride * self.crops
        return max(1, min(max(64, 4 * self.batch_size), examples))

    def slot(self, worker: int) -> int:
        return self.rank * max(1, self.workers) + worker

    def chunks(
        self, worker: int, generator: torch.Generator, passes: int | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(shard/key, chunk) of this worker's stored chunks: its shards in a new order each pass,
        a few interleaved; endlessly unless `passes` is given."""
        slot = self.slot(worker)
        names, stride = self.slot_shards[slot]
        for _ in itertools.count() if passes is None else range(passes):
            pending = (self._stream(name, stride, slot) for name in _permutation(names, generator))
            opened = list(itertools.islice(pending, INTERLEAVE))  # generators: a shard opens when first read
            produced = 0
            while opened:
                pick = int(torch.randint(0, len(opened), (1,), generator=generator))
                try:
                    yield next(opened[pick])
                    produced += 1
                except StopIteration:
                    replacement = next(pending, None)
                    if replacement is None:
                        opened.pop(pick)
                    else:
                        opened[pick] = replacement
            if not produced:
                raise _ShardReadError(
                    f"training slot {slot} got no samples: too few chunks for the ranks x workers"
                    + (" (or every one of its shards was skipped as unreadable)" if self.bad_seen else "")
                )

    def _stream(self, name: str, stride: int, slot: int) -> Iterator[tuple[str, torch.Tensor]]:
        if name in self.known_bad:  # skipped once already: not read (nor reported) again
            return
        first = self.first_sample[name]
        url = shard_url(self.shards, name)
        try:
            for index, sample in enumerate(read_samples(url), start=first):
                if index % stride == slot % stride:
                    key = f"{name}/{sample['__key__']}"
                    yield key, decode_array(sample["sources.npy"])
        except Exception as exc:  # tarfile, gopen, numpy and webdataset raise many kinds on bad bytes
            message = f"training shard {url} cannot be read ({_reason(exc)})"
            if self.on_bad_shard == "stop":
                raise _ShardReadError(
                    f"{message}; check the shards with `demucs-dist shard --verify --out DIR` and rewrite them, "
                    "or train with --on-bad-shard skip"
                ) from None
            self.bad.append(f"{message}: skipped")  # its samples read so far were used
            self.bad_seen = True
            self.known_bad.add(name)

    def examples(self, worker: int, generator: torch.Generator) -> Iterator[Crop]:
        """Shifted crops of the stored chunks (views: nothing is copied until the batch is made)."""
        span = self.segment + self.max_shift
        for _, chunk in self.chunks(worker, generator):
            room = chunk.shape[-1] - span  # crop starts in [0, room]
            if room < 0:
                raise UserError(
                    f"a stored chunk has {chunk.shape[-1]} samples but training needs {span} "
                    f"(segment {self.segment} + shift {self.max_shift}): shard with a longer --segment or --shift"
                )
            for _ in range(self.crops):
                start = int(torch.randint(0, room + 1, (1,), generator=generator))
                yield shift_crop(chunk, start, self.segment, self.max_shift, generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        generator = _generator(self.seed, self.epoch, self.rank, worker)
        buffer: list[Crop] = []
        batch: list[Crop] = []
        buffer_size = self.buffer_size(self.slot(worker))
        try:
            for example in self.examples(worker, generator):
                while self.bad:
                    yield BadShard(self.bad.pop(0), fatal=False)
                # Shuffle buffer: each new example replaces a random one, which goes to the batch.
                if len(buffer) < buffer_size:
                    buffer.append(example)
                    continue
                pick = int(torch.randint(0, len(buffer), (1,), generator=generator))
                buffer[pick], example = example, buffer[pick]
                batch.append(example)
                if len(batch) == self.batch_size:
                    sources = assemble_batch(batch, self.segment, self.augment, generator)
                    batch = []
                    yield sources.sum(1), sources
        except _ShardReadError as exc:
            while self.bad:
                yield BadShard(self.bad.pop(0), fatal=False)
            yield BadShard(str(exc), fatal=True)


class TrainLoader:
    """Exactly `batches` batches of (mix (B, C, T), sources (B, S, C, T)) float32 per iteration."""

    def __init__(self, stream: _TrainStream, batches: int, workers: int):
        self.stream, self.batches, self.workers = stream, batches, workers
        self.bad_shards = 0  # shards skipped as unreadable (--on-bad-shard skip), over all iterations

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The stream is endless; cutting it here is what gives every rank the same batch count.
        loader = torch.utils.data.DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.workers,
            prefetch_factor=2 if self.workers else None,
            pin_memory=torch.cuda.is_available(),  # faster host-to-GPU copies of the ~60 MB batches
        )
        iterator = iter(loader)
        try:
            produced = 0
            while produced < self.batches:
                item = next(iterator, None)
                if item is None:  # the stream is endless: only a stopped DataLoader ends it
                    return
                if isinstance(item, BadShard):
                    if item.fatal:
                        raise UserError(item.message)
                    self.bad_shards += 1
                    print(f"warning: {item.message}", file=sys.stderr, flush=True)
                    continue
                produced += 1
                yield item
        finally:
            del iterator  # stops the worker processes now rather than at garbage collection


def train_loader(
    shards: str,
    manifest: dict,
    *,
    segment: int,
    batch_size: int,
    batches: int,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    workers: int,
    augment: AugmentConfig,
    on_bad_shard: str = "stop",
) -> TrainLoader:
    """One epoch of training batches for `rank`: exactly `batches` batches on every rank.

    segment: the model's input length in samples (model.valid_length(seconds * samplerate)).
    Each batch is (mix (B, C, segment), sources (B, S, C, segment)), float32, mix == sources.sum(1).
    The same (seed, epoch, rank, world_size, workers) gives the same batches.
    on_bad_shard: 'stop' (UserError naming an unreadable shard) or 'skip' (warn, count, go on).
    """
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} outside world size {world_size}")
    if batch_size < 1 or batches < 0 or segment < 1:
        raise UserError(f"batch_size {batch_size}, batches {batches}, segment {segment}: must be positive")
    shortest = manifest["chunking"]["min_chunk_length"]
    needed = segment + int(round(augment.shift * manifest["samplerate"]))
    if shortest < needed:
        raise UserError(
            f"the shards' chunks have {shortest} samples but training needs {needed} "
            f"(segment {segment} + shift {augment.shift} s): reshard with a longer --segment or --shift, "
            "or train with a shorter segment or --shift"
        )
    if on_bad_shard not in ("stop", "skip"):
        raise UserError(f"on_bad_shard {on_bad_shard!r}: must be 'stop' or 'skip'")
    stream = _TrainStream(
        shards, manifest, segment, batch_size, epoch, seed, rank, world_size, workers, augment, on_bad_shard
    )
    return TrainLoader(stream, batches, workers)


def valid_songs(shards: str, manifest: dict, *, rank: int, world_size: int) -> Iterator[ValidSong]:
    """The whole validation songs of `rank`: song i (in manifest order) goes to rank i % world_size."""
    order = {name: i for i, name in enumerate(manifest["songs"]["valid"])}
    mine = {name for name, i in order.items() if i % world_size == rank}
    for shard in manifest["valid"]:
        if not mine.intersection(shard["songs"]):
            continue
        url = shard_url(shards, shard["name"])
        try:
            found = []
            for sample in read_samples(url):
                info: dict[str, Any] = json.loads(sample["json"])
                if info["song"] in mine:
                    found.append(
                        ValidSong(
                            name=info["song"],
                            mix=decode_array(sample["mix.npy"]).float(),
                            sources=decode_array(sample["sources.npy"]).float(),
                            mean=float(info["mean"]),
                            std=float(info["std"]),
                        )
                    )
        except Exception as exc:  # always stop: skipping a validation song would change the metric
            raise UserError(
                f"validation shard {url} cannot be read ({_reason(exc)}); "
                "check the shards with `demucs-dist shard --verify --out DIR`"
            ) from None
        yield from found
