"""Scoring in one place: the two scorers (bss_eval v4 in torch on the rank's device, `DeviceScorer`;
museval in a pool of worker processes, `ScoringPool`), the per-song json store, the aggregation
into the SiSEC 2018 numbers, and the tables.

A song's scores are one file, `<out>/<subset>/<song>.json`, in museval's own format (what
`museval.TrackStore` writes and `EvalStore.add_eval_dir(out)` reads), with one extra key,
`"demucs_dist"`, holding the song's test loss and how it was made. The file is written
atomically once museval is done, so it marks the song as finished: a rerun skips it, and a killed
run loses only the songs still being scored.

Both scorers write the same json (`SongScores`: museval's TrackStore document, written without
importing museval); `demucs_dist.bss` reproduces museval's numbers (every frame within 1e-6 dB in
the tests) many times faster, so `torch` is the default and scores each song on the rank's device
right after its inference. museval (bss_eval v4) takes ~0.7 s per second of audio in one process
and ~20 MB of memory per second of audio on top of ~0.6 GB. The pool lets the device infer the
next songs while earlier ones are scored. Songs travel to the workers as .npy files in a scratch
folder rather than through a pipe, so a 4-minute song (~170 MB of references and estimates) is not
pickled, and at most `2 * workers` songs wait on disk.

Silent sources. museval refuses a song in which a reference or an estimate is all zeros
(`museval.metrics.validate` raises ValueError: an all-zero reference makes the decomposition
ambiguous), and within a song it gives NaN, for every source, to each window where any reference
or estimate is silent (`_any_source_silent`). A MUSDB song with a silent stem throughout (an
instrumental: no vocals) would then never be scored, and an evaluation would fail on every
rerun. Here such a source is left out of that song (`silent_sources`): the other sources are
scored without it (a silent reference spans nothing, so their projections are the same) and its
frames are NaN, which is what museval's own framewise rule gives a silent window; the aggregation
then leaves that song out of that source's median, as it does for any NaN song. The song's json
records what was left out (`"left_out"` under `"demucs_dist"`). Both scorers apply this rule.

Aggregation (the 2019 code and museval's EvalStore(frames_agg="median", tracks_agg="median")):
per song, source and metric the nanmedian over 1 s frames; per source the median over songs
(NaN songs left out); "All" is the mean of the four sources.

This module imports torch only inside DeviceScorer: museval worker processes stay light.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import multiprocessing
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

from . import SOURCES, available_cpus
from .errors import UserError, die_with_parent
from .files import atomic_path, check_folder_is_ours
from .progress import progress_bar

METRICS = ("SDR", "SIR", "ISR", "SAR")  # the rows of the results table, in this order
TABLE_COLUMNS = ("All", "vocals", "drums", "bass", "other")  # the report's column order
WINDOW_SECONDS = 1.0  # museval's window and hop (SiSEC 2018)
SCORERS = ("torch", "museval")  # demucs_dist.bss on the rank's device, or museval in CPU worker processes
EXTRA_KEY = "demucs_dist"  # our key in museval's json: loss and provenance
EVENTS_FILE = "events.log"


def song_json_path(out: str | os.PathLike, subset: str, name: str) -> Path:
    """Where a song's scores live: museval's layout `<out>/<subset>/<song>.json`."""
    return Path(out) / subset / f"{name}.json"


def log_event(out: str | os.PathLike, event: str, song: str) -> None:
    """Append one line `time pid event song` to `<out>/events.log`: a ledger of what each run did.

    One short write in append mode, so lines from several processes do not interleave.
    """
    line = f"{time.time():.3f}\t{os.getpid()}\t{event}\t{song}\n"
    with open(Path(out) / EVENTS_FILE, "a") as f:
        f.write(line)


def read_events(out: str | os.PathLike) -> list[tuple[str, str]]:
    """(event, song) pairs of `<out>/events.log`, oldest first."""
    path = Path(out) / EVENTS_FILE
    if not path.is_file():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines() if line]
    return [(row[2], row[3]) for row in rows]


# ---------------------------------------------------------------------------------------------
# Scoring one song (runs in a worker process)


class SongScores:
    """One song's scores as museval writes them: museval.TrackStore's json document, byte for byte
    (targets in SOURCES order, a frame per 1 s window, values rounded to 5 decimals, infinities as
    NaN). Built here without importing museval, which loads pandas: ~1.4 s of CPU in every
    evaluating process, most of which never call museval. tests/test_bss.py compares the two."""

    def __init__(self, scores: Mapping[str, np.ndarray]):
        """scores: {"SDR": (sources, windows), "ISR": .., "SIR": .., "SAR": ..} in SOURCES order."""
        targets = []
        for i, source in enumerate(SOURCES):
            rows = {metric: np.asarray(scores[metric][i], dtype=np.float64) for metric in METRICS}
            frames = [
                {
                    "time": window * WINDOW_SECONDS,
                    "duration": WINDOW_SECONDS,
                    # museval's key order; its rounding: the exact binary value, half to even
                    "metrics": {metric: _rounded(rows[metric][window]) for metric in ("SDR", "SIR", "SAR", "ISR")},
                }
                for window in range(len(rows["SDR"]))
            ]
            targets.append({"name": source, "frames": frames})
        self.scores: dict[str, Any] = {"targets": targets, "museval_version": _museval_version()}

    @property
    def json(self) -> str:
        import simplejson  # museval's encoder: it writes the Decimal values digit for digit

        return simplejson.dumps(self.scores, indent=2, allow_nan=True, use_decimal=True)


@functools.cache
def _museval_version() -> str:
    """The installed museval's version, as museval records it, read without importing museval."""
    return importlib.metadata.version("museval")


def _rounded(value: float) -> Decimal | float:
    return Decimal(float(value)).quantize(Decimal(".00001")) if not np.isinf(value) else float("nan")


def silent_sources(references, estimates) -> dict[str, str]:
    """{source: why} of the sources to leave out of a song: those whose reference or estimate is
    silent throughout, by museval's test (the sum over channels is 0 at every sample).
    references, estimates: (sources, channels, samples) arrays or torch tensors."""
    found = {}
    for what, signals in (("reference", references), ("estimate", estimates)):
        if isinstance(signals, np.ndarray):
            silent = np.all(np.sum(signals, axis=1, dtype=np.float64) == 0, axis=-1)
        else:
            silent = (signals.double().sum(1) == 0).all(-1).cpu().numpy()
        for source, is_silent in zip(SOURCES, silent):
            if is_silent and source not in found:
                found[source] = f"{what} silent throughout"
    return found


def _with_left_out(scores: Mapping, kept: list[int], sources: int, windows: int) -> dict[str, np.ndarray]:
    """(sources, windows) arrays of every metric: `scores` (of the `kept` sources) in their rows,
    NaN in the rows of the sources left out."""
    full = {metric: np.full((sources, windows), np.nan) for metric in METRICS}
    for metric in METRICS:
        if kept:
            full[metric][kept] = np.asarray(scores[metric])
    return full


def _score_audible(references, estimates, samplerate: int, score_kept) -> tuple[SongScores, dict[str, str]]:
    """(SongScores, left out) of one song: `score_kept(kept, window)` scores the sources at the
    indices `kept` (those not silent throughout), the others get NaN frames. The one place both
    scorers apply the silent-source rule."""
    from .bss import window_count

    window = int(WINDOW_SECONDS * samplerate)
    left_out = silent_sources(references, estimates)
    kept = [i for i, source in enumerate(SOURCES) if source not in left_out]
    windows = window_count(references.shape[-1], window, window)
    scores = score_kept(kept, window) if kept else {}
    return SongScores(_with_left_out(scores, kept, len(SOURCES), windows)), left_out


def score_song(references: np.ndarray, estimates: np.ndarray, samplerate: int):
    """museval (bss_eval v4, 1 s windows and hops) of four (sources, channels, samples) arrays.

    Returns (SongScores with one target per source, in SOURCES order, {source: why} of
    the sources left out). A source silent throughout (`silent_sources`) is left out of museval's
    call and gets NaN frames, instead of museval refusing the whole song.
    """
    import museval

    references, estimates = np.asarray(references), np.asarray(estimates)

    def score_kept(kept: list[int], window: int) -> dict:
        # museval wants (sources, samples, channels), float64.
        refs = references[kept].astype(np.float64).transpose(0, 2, 1)
        ests = estimates[kept].astype(np.float64).transpose(0, 2, 1)
        sdr, isr, sir, sar = museval.evaluate(refs, ests, win=window, hop=window)
        return {"SDR": sdr, "ISR": isr, "SIR": sir, "SAR": sar}

    return _score_audible(references, estimates, samplerate, score_kept)


def score_song_torch(references, estimates, samplerate: int, device=None):
    """The same (SongScores, left out) as `score_song`, computed by demucs_dist.bss (torch) on
    `device` (default: where `references` are). references, estimates: arrays or tensors
    (sources, channels, samples)."""
    import torch

    from .bss import bss_eval_v4

    def score_kept(kept: list[int], window: int) -> dict:
        refs, ests = torch.as_tensor(references)[kept], torch.as_tensor(estimates)[kept]
        return bss_eval_v4(refs, ests, window_samples=window, device=device).numpy()

    return _score_audible(references, estimates, samplerate, score_kept)


def write_song_json(
    path: str | os.PathLike, store: SongScores, extra: Mapping, left_out: Mapping | None = None
) -> None:
    """Write a song's json with our `extra` key, atomically; `left_out` ({source: why}, the
    silent sources not scored) is recorded there when there are any."""
    store.scores[EXTRA_KEY] = {**extra, **({"left_out": dict(left_out)} if left_out else {})}
    with atomic_path(path) as tmp:
        tmp.write_text(store.json)


@dataclass
class ScoreJob:
    """Everything a worker needs to score one song (small: the audio travels as a file)."""

    name: str
    arrays_path: str  # .npy of shape (2, sources, channels, samples): references then estimates
    json_path: str
    out: str  # for the events log
    samplerate: int
    extra: dict = field(default_factory=dict)  # loss etc., stored in the json


def run_score_job(job: ScoreJob) -> float:
    """Score one song, write its json, log it and delete its arrays. Returns museval's seconds."""
    start = time.perf_counter()
    arrays = np.load(job.arrays_path)
    store, left_out = score_song(arrays[0], arrays[1], job.samplerate)
    del arrays
    seconds = time.perf_counter() - start
    extra = {**job.extra, "scorer": "museval", "museval_seconds": round(seconds, 3)}
    write_song_json(job.json_path, store, extra, left_out)
    log_event(job.out, "scored", job.name)
    os.unlink(job.arrays_path)
    return seconds


# ---------------------------------------------------------------------------------------------
# The pool


def default_workers(processes_on_node: int, cpus: int | None = None, memory_bytes: int | None = None) -> int:
    """museval workers per rank: the cores this rank has, minus one that feeds the device, and no
    more than fit in memory at ~4 GB each (a 4-minute song's museval peak)."""
    if cpus is None:
        cpus = available_cpus()
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    by_cores = cpus // max(1, processes_on_node) - 1
    by_memory = memory_bytes // (4 * 2**30) // max(1, processes_on_node)
    return int(max(1, min(by_cores, by_memory)))


def _worker_context(threads: int):
    """A multiprocessing context whose workers use `threads` BLAS threads each.

    forkserver: workers are forked from a clean server process, not from this one with its
    torch/CUDA threads (fork), and do not each import torch (spawn would).
    museval's biggest cost is a LAPACK solve that BLAS would spread over every core, so that
    `workers` processes would fight over the cores: the server starts with the thread count in
    its environment, which BLAS reads once, when numpy loads.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    from multiprocessing import forkserver

    # Each worker still runs the main module (as __mp_main__): with torch loaded once in the
    # server, that costs nothing and the workers share torch's pages instead of loading their own.
    forkserver.set_forkserver_preload([name for name in ("torch", __name__) if name in sys.modules])
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: str(threads) for name in names})
    try:
        forkserver.ensure_running()  # a no-op if this process already started one
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
    return multiprocessing.get_context("forkserver")


class ScoringPool:
    """museval in worker processes, fed one song at a time while the caller infers the next.

    `submit` blocks only when `2 * workers` songs are already waiting, which bounds the scratch
    disk; since museval is the slow part, the pool stays busy either way. Failures are collected
    per song (`failures`) instead of raised, so one bad song does not stall the other ranks.
    """

    def __init__(
        self,
        workers: int,
        scratch: str | os.PathLike,
        threads_per_worker: int = 1,
        progress: bool = False,
        position: int = 0,
        desc: str = "scoring",
    ):
        self.workers = workers
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        # The workers' parent is the forkserver, which exits when this process dies (killed, or
        # SIGTERM's default action): die_with_parent then takes the workers down with it.
        self._executor = ProcessPoolExecutor(
            workers, mp_context=_worker_context(threads_per_worker), initializer=die_with_parent
        )
        self._pending: dict[Future, ScoreJob] = {}
        self._lock = threading.Lock()  # the progress bar is updated from the pool's thread
        self.failures: dict[str, str] = {}
        self.scored: list[str] = []
        self._bar = progress_bar(0, desc, "song", position=position, disable=not progress)

    def submit(
        self,
        name: str,
        references: np.ndarray,
        estimates: np.ndarray,
        json_path: str | os.PathLike,
        out: str | os.PathLike,
        samplerate: int,
        extra: Mapping,
    ) -> None:
        """Queue a song: (sources, channels, samples) references and estimates."""
        while len(self._pending) >= 2 * self.workers:
            self._collect(wait(self._pending, return_when=FIRST_COMPLETED).done)
        arrays_path = self.scratch / f"{name}.npy"
        with atomic_path(arrays_path) as tmp, open(tmp, "wb") as f:
            np.save(f, np.stack([references, estimates]).astype(np.float32, copy=False))
        job = ScoreJob(name, str(arrays_path), str(json_path), str(out), samplerate, dict(extra))
        try:
            future = self._executor.submit(run_score_job, job)
        except BrokenProcessPool:
            self.failures[name] = "museval worker pool is broken (a worker died, out of memory? try fewer --workers)"
            return
        with self._lock:
            self._bar.total += 1
            self._bar.refresh()
        future.add_done_callback(self._tick)
        self._pending[future] = job

    def _tick(self, _future: Future) -> None:
        with self._lock:
            self._bar.update(1)

    def _collect(self, done: Iterable[Future]) -> None:
        for future in done:
            job = self._pending.pop(future)
            error = future.exception()
            if error is None:
                self.scored.append(job.name)
            elif isinstance(error, BrokenProcessPool):
                self.failures[job.name] = "a museval worker died (out of memory? try fewer --workers)"
            else:
                self.failures[job.name] = f"{type(error).__name__}: {error}"

    def close(self) -> None:
        """Wait for every queued song and stop the workers."""
        try:
            if self._pending:
                self._collect(wait(self._pending).done)
        except BaseException:  # Ctrl-C or SIGTERM during the last songs: stop at once, as __exit__ does
            self.terminate()
            raise
        self._executor.shutdown()
        self._bar.close()

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:  # interrupted: do not wait for museval; finished songs are already on disk
            self.terminate()

    def terminate(self) -> None:
        """Stop at once: kill the workers (a song being scored is lost, its json never written)
        and drop the queue. Without the kill, the interpreter's exit would wait for every running
        museval call (tens of seconds after a Ctrl-C), and the workers would go on writing into
        `--out` after the run was stopped."""
        processes = list((getattr(self._executor, "_processes", None) or {}).values())
        for process in processes:
            process.kill()
        self._executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(5)
        self._bar.close()


class DeviceScorer:
    """The torch scorer behind ScoringPool's interface: `submit` scores the song at once on
    `device` (the rank's GPU, or its CPU threads), writes its json and logs it.

    Scoring a 4-minute song takes a fraction of a second on a GPU, so there is nothing to overlap
    with inference. Failures (a song museval would refuse) are collected per song, as the pool does.
    """

    def __init__(self, device, progress: bool = False, position: int = 0, desc: str = "scoring"):
        import torch

        self.device = torch.device(device)
        self.failures: dict[str, str] = {}
        self.scored: list[str] = []
        self.seconds = 0.0  # spent scoring, all songs
        self._bar = progress_bar(0, desc, "song", position=position, disable=not progress)

    def submit(
        self,
        name: str,
        references,
        estimates,
        json_path: str | os.PathLike,
        out: str | os.PathLike,
        samplerate: int,
        extra: Mapping,
    ) -> None:
        """Score a song now: (sources, channels, samples) arrays or tensors."""
        self._bar.total += 1
        start = time.perf_counter()
        try:
            store, left_out = score_song_torch(references, estimates, samplerate, self.device)
        except UserError as error:
            self.failures[name] = str(error)
            return
        finally:
            self._bar.update(1)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        extra = {**extra, "scorer": "torch", "scoring_seconds": round(seconds, 3)}
        write_song_json(json_path, store, extra, left_out)
        log_event(out, "scored", name)
        self.scored.append(name)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> DeviceScorer:
        return self

    def __exit__(self, *_) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Reading the store back and aggregating


def read_song_json(path: str | os.PathLike) -> dict:
    """A song's json as written by museval (NaN allowed)."""
    return json.loads(Path(path).read_text())


def frame_medians(document: Mapping) -> dict[str, dict[str, float]]:
    """{target: {metric: nanmedian over frames}} of one song's museval json."""
    medians = {}
    for target in document["targets"]:
        medians[target["name"]] = {
            metric: _nanmedian([float(frame["metrics"][metric]) for frame in target["frames"]]) for metric in METRICS
        }
    return medians


def _nanmedian(values: Iterable[float]) -> float:
    values = np.asarray(list(values), dtype=np.float64)
    if values.size == 0 or np.isnan(values).all():
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmedian(values))


def median_over_songs(per_song: Iterable[Sequence[float]]) -> dict[str, float]:
    """{source: the median over songs (NaN songs left out), "All": the mean of the sources} of
    per-song values in SOURCES order: museval's EvalStore(tracks_agg="median"), the 2019 table's
    aggregation, for evaluate's tables and for validation's SDR alike."""
    rows = [list(row) for row in per_song]
    by_source = {source: _nanmedian(row[i] for row in rows) for i, source in enumerate(SOURCES)}
    return {**by_source, "All": float(np.mean(list(by_source.values())))}


def aggregate(documents: Mapping[str, Mapping]) -> dict:
    """The evaluation's numbers from the songs' json documents ({song: document}).

    Returns {"scores": {column: {metric: value}}, "loss": mean test loss over songs (each song's
    loss is the mean over its samples), "songs": {song: {"loss": .., source: {metric: ..}}}}.
    """
    per_song = {name: frame_medians(doc) for name, doc in sorted(documents.items())}
    by_metric = {m: median_over_songs([song[s][m] for s in SOURCES] for song in per_song.values()) for m in METRICS}
    scores = {column: {m: by_metric[m][column] for m in METRICS} for column in TABLE_COLUMNS}
    losses = [doc.get(EXTRA_KEY, {}).get("loss", float("nan")) for doc in documents.values()]
    songs = {
        name: {"loss": documents[name].get(EXTRA_KEY, {}).get("loss"), **medians} for name, medians in per_song.items()
    }
    left_out = {
        name: doc[EXTRA_KEY]["left_out"] for name, doc in documents.items() if doc.get(EXTRA_KEY, {}).get("left_out")
    }
    return {
        "scores": {column: scores[column] for column in TABLE_COLUMNS},
        "loss": float(np.mean(losses)) if losses else float("nan"),
        "songs": songs,
        "left_out": dict(sorted(left_out.items())),  # {song: {source: why}}: silent sources not scored
    }


def left_out_note(results: Mapping) -> str:
    """A line naming the sources left out of songs because they are silent throughout (empty if
    none), printed under the table so that a median over fewer songs is not a surprise."""
    left_out = results.get("left_out") or {}
    if not left_out:
        return ""
    listing = "; ".join(
        f"{song}: {', '.join(f'{s} ({why})' for s, why in sources.items())}" for song, sources in left_out.items()
    )
    return f"\nLeft out (silent throughout, NaN frames, not in that source's median): {listing}"


def check_compare(paths: Sequence[str]) -> None:
    """UserError (one line) for a --compare path that is not a results.json of ours: checked
    before any work, not after the whole evaluation."""
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"--compare: no results file {path}")
        try:
            load_results(path)["scores"]["All"]["SDR"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"--compare: {path} is not a results.json written by demucs-dist evaluate") from None


def check_out(out: str | os.PathLike) -> None:
    """UserError (one line) for an `--out` that is a file, a folder this process cannot write, or
    a non-empty folder of another program's (no run.json of ours: scores are never written, nor
    .scratch deleted, there), found before any song is inferred."""
    path = Path(out)
    check_folder_is_ours(
        path, "--out", lambda folder: (folder / "run.json").is_file(), "holds no scores of demucs-dist (no run.json)"
    )
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write in {existing} (read-only?)")


def check_run_file(out: Path, identity: Mapping) -> dict:
    """Refuse to add scores of another model, other settings, another dataset or changed audio (of
    a song scored there) to an existing output folder; UserError naming run.json if it is not ours
    (corrupt). A run.json from before dataset fingerprints is accepted with a note. Returns the
    identity to write back: this one, its "songs" merged with those of the earlier runs (a rerun
    may score more songs)."""
    path = out / "run.json"
    if not path.is_file():
        return dict(identity)
    try:
        previous = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path} is not a run.json written by demucs-dist ({exc}): {_START_OVER}") from None
    if not isinstance(previous, dict):
        raise UserError(f"{path} is not a run.json written by demucs-dist: {_START_OVER}")
    older = "songs" in identity and "songs" not in previous  # written before run.json recorded the dataset
    if older:
        print(f"note: {path} predates dataset fingerprints: the dataset of its scores cannot be checked", flush=True)
    checked = {k: v for k, v in identity.items() if k != "songs" and not (older and k == "dataset")}
    changed = [f"{k}: {previous.get(k)} -> {v}" for k, v in checked.items() if previous.get(k) != v]
    if changed:
        raise UserError(f"{out} holds scores made with other settings ({'; '.join(changed)}); {_START_OVER}")
    merged = dict(identity)
    if "songs" in identity and not older:
        songs = previous.get("songs")
        if not isinstance(songs, dict):
            raise UserError(f"{path} records no song fingerprints (a damaged run.json): {_START_OVER}")
        new = identity["songs"]
        subset = str(identity.get("subset", "test"))
        scored = {name for name in new if song_json_path(out, subset, name).is_file()}
        differ = sorted(name for name in scored if name in songs and songs[name] != new[name])
        if differ:
            raise UserError(
                f"the audio of {len(differ)} song(s) changed since they were scored in {out} "
                f"({', '.join(differ[:3])}{'...' if len(differ) > 3 else ''}): their scores would be stale; "
                f"{_START_OVER}"
            )
        merged["songs"] = {**songs, **new}
    return merged


_START_OVER = "use another --out, or delete it to start over"


def save_results(out: Path, results: Mapping, compare: Sequence[str] = ()) -> str:
    """Write `out`/results.json and `out`/results.md (the table, with a row per --compare run's
    results.json); returns the table."""
    others = {}
    for path in compare:
        other = load_results(path)
        others[other.get("label", path)] = other
    table = format_table(results, others)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(table + "\n")
    return table


def format_table(results: Mapping, compare: Mapping[str, Mapping] | None = None) -> str:
    """A markdown table shaped like the report's: rows SDR, SAR, SIR, ISR and the loss; columns
    All, vocals, drums, bass, other. `compare` ({label: results}) adds, per other run (e.g. the
    untrained model, the mixture baseline), its SDR row and this run's SDR gain over it."""
    scores = results["scores"]
    title = f"{results.get('label', 'model')} ({len(results.get('songs', {}))} songs)"
    lines = [f"| {title} | " + " | ".join(TABLE_COLUMNS) + " |", "|---" + "|---:" * len(TABLE_COLUMNS) + "|"]
    for metric in METRICS:
        lines.append(f"| {metric} | " + " | ".join(_number(scores[c][metric]) for c in TABLE_COLUMNS) + " |")
    loss_name = f"{results.get('loss_kind', 'l1').upper()} loss"
    lines.append(f"| {loss_name} | {_number(results['loss'])} |" + " |" * (len(TABLE_COLUMNS) - 1))
    for label, other in (compare or {}).items():
        row = " | ".join(_number(other["scores"][c]["SDR"]) for c in TABLE_COLUMNS)
        gain = " | ".join(f"{scores[c]['SDR'] - other['scores'][c]['SDR']:+.3f}" for c in TABLE_COLUMNS)
        lines += [f"| SDR ({label}) | {row} |", f"| SDR gain over {label} | {gain} |"]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "nan" if value is None or value != value else f"{value:.3f}"


def load_results(path: str | os.PathLike) -> dict:
    """A results.json written by `demucs-dist evaluate`."""
    return json.loads(Path(path).read_text())
