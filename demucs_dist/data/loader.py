"""Streaming training and validation data from the shards that `demucs-dist shard` writes.

Where shards live and what the manifest holds: `manifest.py`.

Training stream, per epoch:
1. The train shards are shuffled with (seed, epoch) and dealt to the world_size x workers
   "slots" (one per worker of each rank), balancing sample counts: slots read disjoint shards.
   With fewer shards than slots every slot reads all shards and keeps every n-th sample instead.
2. Each worker cycles through its shards (reshuffled each pass), a few open at once and
   interleaved. The writer has already spread every song's chunks over all shards.
3. Crop pool: each worker holds `pool_chunks` decoded chunks (default POOL_CHUNKS = 16) and
   draws every example from a random one of them, which gives one crop of the training length
   plus the shift; a chunk leaves the pool (for the next one of the stream) once it has given its
   `crops` crops (11 for the lean default: those crops are spread over ~11 x 16 examples rather
   than given back to back). The draw skips the chunks of the songs of the last
   `remix_group` - 1 examples when it can, and always skips their chunks: no Remix group of
   consecutive examples holds two crops of one chunk (overlapping audio) as long as the pool holds
   at least `remix_group` distinct chunks, and a group repeats a song only when the pool's other
   songs have just been used. A worker can only mix what it reads: with fewer than `remix_group`
   chunks per worker and epoch (tiny sets, many workers) groups repeat chunks and `train_batches`
   prints a note (MUSDB18, lean default, 8 ranks x 2 workers: ~107 chunks each).
   Memory per worker: the pool, pool_chunks x one chunk (4 sources x 2 channels x chunk length x
   2 bytes: 15.9 MB for the lean default's 22.5 s float16 chunks, so 254 MB; 7.9 MB and 127 MB
   with --chunking paper), plus the batches in flight.
4. Batching: a batch is the Shift-ed crops (each source at its own offset) in their stored dtype,
   (batch, sources, channels, samples), with where each came from (`TrainBatch`). No mixture and
   no float32 copy on the host: FlipSign, FlipChannels, Remix, the float32 conversion and the
   mixture happen on the device over a whole optimizer step (`augment.augment_step`). A worker
   builds each batch in shared memory and reuses that buffer once the training process calls
   `TrainBatch.release()` (the trainer does, after the step's copy to the device).
5. Every rank stops after exactly `batches` batches (uneven ranks would hang DDP).

A shard that cannot be read (truncated, corrupt tar, undecodable array) stops training with a
message naming it (`--on-bad-shard stop`), or is skipped with a warning and counted (`skip`): the
stream repeats, so every rank still gets its `batches` batches. Workers report a bad shard as a
`BadShard` item rather than an exception, because DataLoader re-raises worker exceptions with the
worker's traceback in the message, and the user should get one line.
"""

from __future__ import annotations

import collections
import functools
import io
import itertools
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import webdataset as wds

from ..config import option
from ..errors import UserError, die_with_parent
from .augment import AugmentConfig, Crop, seeded_generator, shift_crop
from .manifest import Manifest, shard_url

INTERLEAVE = 4  # shards a worker reads at once
POOL_CHUNKS = 16  # decoded chunks a worker draws crops from (memory: see the module docstring)


@dataclass
class LoaderConfig:
    """Data loading"""

    on_bad_shard: str = option(
        "stop",
        "a training shard that cannot be read: stop with its name, or skip it with a warning (counted)",
        choices=["stop", "skip"],
    )
    pool_chunks: int = option(
        POOL_CHUNKS,
        "decoded chunks each loader worker draws its crops from; memory per worker: this x one chunk "
        "(15.9 MB for the default lean float16 chunks)",
    )


@dataclass
class BadShard:
    """What a worker sends instead of a batch when a shard cannot be read."""

    message: str
    fatal: bool


class _ShardReadError(Exception):
    """Raised inside a worker's stream in `stop` mode; turned into a fatal BadShard."""


class Origin(NamedTuple):
    """Where one training example comes from."""

    song: str
    chunk: str  # "train/NNNNNN.tar/<sample key>": one stored chunk
    start: int  # crop start in the chunk, samples
    offsets: tuple[int, ...]  # Shift: each source's extra offset from `start`, samples


@dataclass
class TrainBatch:
    """One batch of training crops, before augmentation.

    sources: (batch, sources, channels, samples) in the shards' stored dtype (float16 by default),
    Shift-ed and cropped; origins: where each example comes from; slot: the rank x workers slot
    (rank * workers + worker) that made it."""

    sources: torch.Tensor
    origins: tuple[Origin, ...]
    slot: int
    buffer: int | None = None  # the worker's shared-memory buffer holding `sources`, if any
    _release: Callable[[], None] | None = None  # set by TrainLoader in the training process

    def pin_memory(self) -> TrainBatch:  # called by DataLoader(pin_memory=True)
        return TrainBatch(self.sources.pin_memory(), self.origins, self.slot, self.buffer)

    def release(self) -> None:
        """Say that `sources` has been copied elsewhere (to the device, or by torch.cat): the worker
        that made it may refill its shared memory. Reading `sources` afterwards is an error (it is
        replaced by an empty tensor). Optional: an unreleased buffer is simply not reused."""
        if self._release is not None:
            self._release()
            self._release = None
            self.sources = self.sources.new_empty(0)


@dataclass
class ValidSong:
    """One whole validation song, z-scored with its own mean and std (as stored in the shards)."""

    name: str
    mix: torch.Tensor  # (channels, time) float32
    sources: torch.Tensor  # (sources, channels, time) float32
    mean: float
    std: float


_generator = seeded_generator  # (seed, epoch, rank, worker) of a worker's stream


def _permutation(items: list, generator: torch.Generator) -> list:
    return [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]


def _pick(count: int, generator: torch.Generator) -> int:
    return int(torch.randint(0, count, (1,), generator=generator))


def slot_shards(
    manifest: Manifest, *, epoch: int, seed: int, world_size: int, workers: int
) -> list[tuple[list[str], int]]:
    """For each slot (rank * workers + worker) its train shard names and a sample stride.

    A stride of 1 means "every sample of these shards"; with fewer shards than slots every slot
    gets all shards with stride = number of slots and keeps sample n (numbered across the shards in
    manifest order) when n = slot mod stride.
    The assignment depends on (seed, epoch) only, so all ranks compute the same one.
    """
    slots = world_size * max(1, workers)
    shards = _permutation([s for s in manifest.train if s.samples > 0], _generator(seed, epoch, 7))
    if not shards:
        raise UserError("the manifest lists no training samples")
    if len(shards) < slots:
        names = [s.name for s in shards]
        return [(names, slots) for _ in range(slots)]
    # Largest first (ties keep the shuffled order), each to the slot holding the fewest samples.
    shards.sort(key=lambda s: -s.samples)
    assigned: list[list[str]] = [[] for _ in range(slots)]
    totals = [0] * slots
    for shard in shards:
        slot = totals.index(min(totals))
        assigned[slot].append(shard.name)
        totals[slot] += shard.samples
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


MAX_HELD_BUFFERS = 8  # shared-memory batch buffers a worker keeps for reuse (in flight or free)


class _SharedBuffers:
    """A DataLoader worker's batch buffers, in shared memory from the start (handing a batch to the
    training process then copies nothing) and reused once the training process has released one
    (`TrainBatch.release`): a fresh shared-memory buffer costs the kernel's page allocation and
    zeroing, which is more than filling it (measured here: 15.5 vs 4.8 ms for 4 examples of 10 s).
    The worker keeps at most MAX_HELD_BUFFERS; one never released ages out and is not reused."""

    def __init__(self, returns: Any):
        self.returns = returns  # indices released by the training process (a multiprocessing SimpleQueue)
        self.held: dict[int, torch.Tensor] = {}
        self.free: list[int] = []
        self.made = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        while self.returns is not None and not self.returns.empty():
            index = self.returns.get()
            if index in self.held:
                self.free.append(index)
        while self.free:
            index = self.free.pop()
            buffer = self.held[index]
            if buffer.shape == shape and buffer.dtype == dtype:
                return buffer, index
            del self.held[index]
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
        index, self.made = self.made, self.made + 1
        self.held[index] = torch.empty(0, dtype=dtype).set_(storage).view(shape)
        while len(self.held) > MAX_HELD_BUFFERS:
            del self.held[min(self.held)]
        return self.held[index], index


@dataclass
class _Pooled:
    chunk: str
    song: str
    data: torch.Tensor  # (sources, channels, samples), stored dtype
    left: int  # crops still to draw from it


class _TrainStream(torch.utils.data.IterableDataset):
    """The batches of one rank; in a DataLoader each worker produces its own share."""

    def __init__(self, shards: str, manifest: Manifest, segment_samples: int, batch_size: int, epoch: int, seed: int,
                 rank: int, world_size: int, workers: int, max_shift: int, spacing: int,
                 pool_chunks: int = POOL_CHUNKS, on_bad_shard: str = "stop"):  # fmt: skip
        super().__init__()
        self.on_bad_shard = on_bad_shard
        self.bad: list[str] = []  # warnings about skipped shards, not yet sent (per worker process)
        self.bad_seen = False
        self.known_bad: set[str] = set()
        self.shards, self.manifest, self.segment_samples, self.batch_size = (
            shards,
            manifest,
            segment_samples,
            batch_size,
        )
        self.epoch, self.seed, self.rank, self.world_size, self.workers = epoch, seed, rank, world_size, workers
        self.max_shift, self.spacing, self.pool_chunks = max_shift, max(1, spacing), max(1, pool_chunks)
        self.crops = manifest.chunking.crops
        self.slot_shards = slot_shards(manifest, epoch=epoch, seed=seed, world_size=world_size, workers=workers)
        # Number of each shard's first sample in manifest order: the sample split keeps sample n in slot n % slots.
        firsts = itertools.accumulate([0] + [s.samples for s in manifest.train[:-1]])
        self.first_sample = {s.name: first for s, first in zip(manifest.train, firsts)}
        self.returns: list | None = None  # per worker: buffer indices released (set by TrainLoader)

    def slot(self, worker: int) -> int:
        return self.rank * max(1, self.workers) + worker

    def chunks(self, worker: int, generator: torch.Generator, passes: int | None = None) -> Iterator[_Pooled]:
        """This worker's stored chunks: its shards in a new order each pass, a few interleaved;
        endlessly unless `passes` is given."""
        slot = self.slot(worker)
        names, stride = self.slot_shards[slot]
        for _ in itertools.count() if passes is None else range(passes):
            pending = (self._stream(name, stride, slot) for name in _permutation(names, generator))
            opened = list(itertools.islice(pending, INTERLEAVE))  # generators: a shard opens when first read
            produced = 0
            while opened:
                pick = _pick(len(opened), generator)
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

    def _stream(self, name: str, stride: int, slot: int) -> Iterator[_Pooled]:
        if name in self.known_bad:  # skipped once already: not read (nor reported) again
            return
        first = self.first_sample[name]
        url = shard_url(self.shards, name)
        try:
            for index, sample in enumerate(read_samples(url), start=first):
                if index % stride == slot % stride:
                    song = json.loads(sample["json"])["song"]
                    yield _Pooled(f"{name}/{sample['__key__']}", song, decode_array(sample["sources.npy"]), self.crops)
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

    def examples(self, worker: int, generator: torch.Generator) -> Iterator[tuple[Crop, Origin]]:
        """Shifted crops drawn from the pool of decoded chunks (views: copied when batched)."""
        span = self.segment_samples + self.max_shift
        stream = self.chunks(worker, generator)

        def enter() -> _Pooled:
            chunk = next(stream)
            if chunk.data.shape[-1] < span:
                raise UserError(
                    f"a stored chunk has {chunk.data.shape[-1]} samples but training needs {span} "
                    f"(segment {self.segment_samples} + shift {self.max_shift}): "
                    "shard with a longer --segment or --shift"
                )
            return chunk

        pool = [enter() for _ in range(self.pool_chunks)]
        recent: collections.deque[tuple[str, str]] = collections.deque(maxlen=self.spacing - 1)
        while True:
            chunks, songs = {c for c, _ in recent}, {s for _, s in recent}
            eligible = [i for i, p in enumerate(pool) if p.song not in songs and p.chunk not in chunks]
            eligible = eligible or [i for i, p in enumerate(pool) if p.chunk not in chunks] or list(range(len(pool)))
            index = eligible[_pick(len(eligible), generator)]
            chosen = pool[index]
            start = _pick(chosen.data.shape[-1] - span + 1, generator)
            crop = shift_crop(chosen.data, start, self.segment_samples, self.max_shift, generator)
            yield crop, Origin(chosen.song, chosen.chunk, start, tuple(crop.offsets))
            recent.append((chosen.chunk, chosen.song))
            chosen.left -= 1
            if chosen.left == 0:
                pool[index] = enter()

    def batch(self, crops: list[Crop], buffers: _SharedBuffers | None) -> tuple[torch.Tensor, int | None]:
        """((batch, sources, channels, segment) in the stored dtype, its shared buffer's index):
        one copy per example and source."""
        first = crops[0].chunk
        shape = (len(crops), *first.shape[:2], self.segment_samples)
        out, index = buffers.take(shape, first.dtype) if buffers else (torch.empty(shape, dtype=first.dtype), None)
        for item, crop in enumerate(crops):
            for source in range(first.shape[0]):
                out[item, source].copy_(crop.source(source, self.segment_samples))
        return out, index

    def __iter__(self) -> Iterator[TrainBatch | BadShard]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        generator = _generator(self.seed, self.epoch, self.rank, worker)
        buffers = _SharedBuffers(self.returns[worker] if self.returns else None) if info is not None else None
        batch: list[tuple[Crop, Origin]] = []
        try:
            for example in self.examples(worker, generator):
                while self.bad:
                    yield BadShard(self.bad.pop(0), fatal=False)
                batch.append(example)
                if len(batch) == self.batch_size:
                    crops, origins = zip(*batch)
                    batch = []
                    sources, index = self.batch(list(crops), buffers)
                    yield TrainBatch(sources, tuple(origins), self.slot(worker), index)
        except _ShardReadError as exc:
            while self.bad:
                yield BadShard(self.bad.pop(0), fatal=False)
            yield BadShard(str(exc), fatal=True)


WORKER_GRACE_SECONDS = 10  # a SIGTERMed worker's time to be shut down by its rank before it exits


def _exit_quietly(_signum: int, _frame: object) -> None:
    os._exit(0)


def _quiet_excepthook(*_args: object) -> None:
    """A worker's sys.excepthook. multiprocessing's resource_sharer thread, which hands the rank a
    batch's shared memory, reports through it a connection the rank dropped: what a stopping rank
    does to a fetch under way. The rank sees a failure of its own fetch itself."""


def _stop_soon(_signum: int, _frame: object) -> None:
    """A worker's first SIGTERM: go on until the rank shuts the worker down, or exit quietly after
    WORKER_GRACE_SECONDS (a worker stuck in a read). A second SIGTERM exits at once."""
    signal.signal(signal.SIGTERM, _exit_quietly)
    signal.signal(signal.SIGALRM, _exit_quietly)
    signal.alarm(WORKER_GRACE_SECONDS)


def _end_with(parent: int, _worker_id: int) -> None:
    """DataLoader workers end with their rank, without a word in the job log.

    SIGTERM: torchrun stops a rank by signalling its whole process group, and SLURM's scancel
    signals every process of the job. torch's handler in a worker dies of a SIGTERM from anyone but
    the rank, and a worker that died mid-batch reached the rank first: "DataLoader worker ... is
    killed by signal: Terminated", or a broken connection in the thread that hands the worker its
    buffers back, as a traceback beside the rank's own clean stop. So a worker goes on after a
    SIGTERM until the rank, stopping, shuts it down (`_stop_soon`). It exits with code 0 on a second
    SIGTERM (the DataLoader's own, for a worker that does not stop when asked) or after a grace
    period. A Python handler, not SIG_IGN: the commands a worker starts for `pipe:` shards keep
    SIGTERM's default. And a fetch the stopping rank dropped goes unreported (`_quiet_excepthook`).

    SIGKILL of the rank (the OOM killer, a launcher's last resort): the workers get the kernel's
    parent-death signal. They hold copies of the rank's sockets: while they live, the other ranks'
    collectives do not see the rank gone, and the job's teardown waited ~5 s for the workers' own
    parent check. Only for workers forked by the rank itself (Linux's default start method up to
    Python 3.13): a worker started by a forkserver has the server as its parent."""
    signal.signal(signal.SIGTERM, _stop_soon)
    sys.excepthook = _quiet_excepthook
    if os.getppid() == parent:
        die_with_parent()


class TrainLoader:
    """Exactly `batches` TrainBatch items per iteration."""

    def __init__(self, stream: _TrainStream, batches: int, workers: int):
        self.stream, self.batches, self.workers = stream, batches, workers
        self.bad_shards = 0  # shards skipped as unreadable (--on-bad-shard skip), over all iterations

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[TrainBatch]:
        # Released buffers go back to their worker (created before the workers start, which inherit them).
        returns: list = [torch.multiprocessing.SimpleQueue() for _ in range(self.workers)]
        self.stream.returns = returns
        # The stream is endless; cutting it here is what gives every rank the same batch count.
        loader = torch.utils.data.DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.workers,
            prefetch_factor=2 if self.workers else None,
            pin_memory=torch.cuda.is_available(),  # faster host-to-GPU copies
            worker_init_fn=functools.partial(_end_with, os.getpid()),
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
                if item.buffer is not None:
                    give_back = functools.partial(returns[item.slot % self.workers].put, item.buffer)
                    if item.sources.is_pinned():  # copied out of the shared buffer already
                        give_back()
                    else:
                        item._release = give_back
                yield item
        finally:
            del iterator  # stops the worker processes now rather than at garbage collection
            self.stream.returns = None


def train_batches(
    shards: str,
    manifest: Manifest,
    *,
    segment_samples: int,
    batch_size: int,
    batches: int,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    workers: int,
    augment: AugmentConfig,
    pool_chunks: int = POOL_CHUNKS,
    on_bad_shard: str = "stop",
) -> TrainLoader:
    """One epoch of training batches for `rank`: exactly `batches` TrainBatch items on every rank.

    segment_samples: the model's input length in samples (model.valid_length(seconds * samplerate)).
    Each batch's `sources` is (batch_size, S, C, segment_samples) in the stored dtype, cropped with
    `augment.shift`; apply `augment.augment_step` on the device (mixture = its sum over sources).
    `augment.remix_group` sets how far apart two crops of one chunk (and, when it can, one song) are.
    The same (seed, epoch, rank, world_size, workers, pool_chunks) gives the same batches.
    on_bad_shard: 'stop' (UserError naming an unreadable shard) or 'skip' (warn, count, go on).
    """
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} outside world size {world_size}")
    if batch_size < 1 or batches < 0 or segment_samples < 1 or pool_chunks < 1:
        raise UserError(
            f"batch_size {batch_size}, batches {batches}, segment_samples {segment_samples}, "
            f"pool_chunks {pool_chunks}: must be positive"
        )
    shortest = manifest.chunking.min_chunk_length
    max_shift = int(round(augment.shift * manifest.samplerate))
    if shortest < segment_samples + max_shift:
        raise UserError(
            f"the shards' chunks have {shortest} samples but training needs {segment_samples + max_shift} "
            f"(segment {segment_samples} + shift {augment.shift} s): reshard with a longer --segment or --shift, "
            "or train with a shorter segment or --shift"
        )
    if on_bad_shard not in ("stop", "skip"):
        raise UserError(f"on_bad_shard {on_bad_shard!r}: must be 'stop' or 'skip'")
    stream = _TrainStream(shards, manifest, segment_samples, batch_size, epoch, seed, rank, world_size, workers,
                          max_shift, augment.remix_group, pool_chunks, on_bad_shard)  # fmt: skip
    fewest = chunks_per_worker(manifest, world_size, workers)
    if fewest < augment.remix_group and rank == 0 and (shards, world_size, workers) not in _WARNED:
        _WARNED.add((shards, world_size, workers))
        print(
            f"note: a loader worker holds only {fewest} chunk(s) (the shards' {sum(s.samples for s in manifest.train)} "
            f"over {world_size} rank(s) x {max(1, workers)} worker(s)): a Remix group of {augment.remix_group} "
            "will repeat chunks; use fewer --workers or more, shorter chunks",
            file=sys.stderr,
            flush=True,
        )
    return TrainLoader(stream, batches, workers)


_WARNED: set[tuple[str, int, int]] = set()  # the fewest-chunks note is printed once per process and setting


def chunks_per_worker(manifest: Manifest, world_size: int, workers: int) -> int:
    """The fewest stored chunks one worker (slot) reads in an epoch: it draws all its examples from
    those, so fewer than `remix_group` of them means Remix groups that repeat a chunk."""
    slots = slot_shards(manifest, epoch=0, seed=0, world_size=world_size, workers=workers)
    counts = {s.name: s.samples for s in manifest.train}
    return min(sum(counts[name] for name in names) // stride for names, stride in slots)


def valid_songs(shards: str, manifest: Manifest, *, rank: int, world_size: int) -> Iterator[ValidSong]:
    """The whole validation songs of `rank`: song i (in manifest order) goes to rank i % world_size."""
    order = {name: i for i, name in enumerate(manifest.songs.valid)}
    mine = {name for name, i in order.items() if i % world_size == rank}
    for shard in manifest.valid:
        if not mine.intersection(shard.songs):
            continue
        url = shard_url(shards, shard.name)
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
