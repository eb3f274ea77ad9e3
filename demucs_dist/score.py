"""`demucs-dist score`: score existing estimates (any system's) against MUSDB18's references.

    demucs-dist score --estimates other_system/ --musdb /data/musdb18 --out eval/other_system

The estimates are in museval's layout: <estimates>/<subset>/<song>/<source>.wav, one file per
source (drums, bass, other, vocals), 44.1 kHz, mono or stereo, any subtype soundfile reads. As
museval does, an estimate shorter than its song is padded with zeros and a longer one is cut.
Every song of the subset (or of --songs) needs its four files; the command checks before it
starts.

The output is `evaluate`'s: <out>/<subset>/<song>.json (museval's json, written when the song is
scored, so a rerun skips it), results.json, results.md (the same table, the loss row being the
test loss of the estimates against the sources normalised by the mixture's statistics, as
`evaluate` computes it), run.json and events.log. With `--scorer torch` (the default) the songs
are scored by demucs_dist.bss on the GPU if there is one (`--device`), else on the CPU's threads;
`--scorer museval` runs museval itself in worker processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch

from . import SOURCES
from .config import option, parse
from .data.songs import check_rate, dataset_identity, file_identity, read_song, select_tracks
from .errors import UserError, run_main
from .files import FolderLock, atomic_path
from .progress import progress_bar
from .scoring import (
    SCORERS,
    DeviceScorer,
    ScoringPool,
    aggregate,
    check_compare,
    check_out,
    check_run_file,
    default_workers,
    left_out_note,
    read_song_json,
    save_results,
    song_json_path,
)


@dataclasses.dataclass
class ScoreConfig:
    """What to score and where the scores go."""

    estimates: str = option("", "folder of estimates in museval's layout: <estimates>/<subset>/<song>/<source>.wav")
    musdb: str = option("", "MUSDB18 root folder with the references (train/ and test/)")
    is_wav: bool = option(False, "MUSDB18-HQ wav layout (<song>/mixture.wav...) instead of .stem.mp4 files")
    subset: str = option("test", "which MUSDB18 subset to score", choices=("test", "train"))
    songs: list[str] = option([], "only these songs (folder names; or one file listing a name per line)")
    out: str = option("", "output folder: per-song museval json, results.json, results.md")
    label: str = option("", "name of these estimates in tables (default: the estimates folder's name)")
    loss: str = option("l1", "test loss against the normalised sources", choices=("l1", "mse"))
    scorer: str = option(
        "torch", "torch: bss_eval v4 in torch (museval's numbers, fast); museval: museval itself", choices=SCORERS
    )
    device: str = option("auto", "where --scorer torch runs: auto (a GPU if there is one, else the CPU), cpu, cuda:N")
    threads: int = option(
        0, "CPU threads for --scorer torch on the CPU (0 = every core this process may use)", minimum=0
    )
    workers: int = option(
        0, "museval worker processes with --scorer museval (0 = the cores minus one, ~4 GB each)", minimum=0
    )
    compare: list[str] = option([], "results.json of other runs (e.g. an evaluate run) to add as SDR rows")
    progress: bool = option(True, "progress bar")


def estimate_paths(config: ScoreConfig, name: str) -> list[Path]:
    """The four estimate files of a song, in SOURCES order."""
    return [Path(config.estimates) / config.subset / name / f"{source}.wav" for source in SOURCES]


def check_config(config: ScoreConfig) -> None:
    if not config.estimates:
        raise UserError("--estimates is required: the folder of <subset>/<song>/<source>.wav files to score")
    if not (Path(config.estimates) / config.subset).is_dir():
        raise UserError(f"no '{config.subset}' folder in {config.estimates}: expected <song>/<source>.wav under it")
    if not config.out:
        raise UserError("--out is required: the folder the scores go to")
    check_out(config.out)
    if config.device not in ("auto", "cpu") and not config.device.startswith("cuda"):
        raise UserError(f"--device {config.device!r}: use auto, cpu, cuda or cuda:N")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {config.device}: torch sees no CUDA device here (use --device cpu)")
    check_compare(config.compare)


def check_estimates(config: ScoreConfig, names: Sequence[str]) -> None:
    """Every song needs its four files: say which are missing before scoring anything."""
    missing = [name for name in names if not all(path.is_file() for path in estimate_paths(config, name))]
    if missing:
        where = Path(config.estimates) / config.subset
        raise UserError(
            f"{len(missing)} of {len(names)} songs have no estimates in {where} (each needs "
            f"<song>/{{{','.join(SOURCES)}}}.wav): {', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}"
        )


def read_estimates(config: ScoreConfig, name: str, channels: int, samples: int) -> np.ndarray:
    """A song's estimates as float32 (sources, channels, samples), padded or cut to `samples`
    (museval's pad_or_truncate); a mono file is used for every channel."""
    stems = []
    for path in estimate_paths(config, name):
        try:
            audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError) as exc:
            raise UserError(f"cannot read {path}: {exc}") from None
        check_rate(rate, str(path))
        if audio.shape[1] not in (1, channels):
            raise UserError(f"{path}: {audio.shape[1]} channels, the references have {channels}")
        audio = np.broadcast_to(audio.T, (channels, audio.shape[0]))[:, :samples]
        stems.append(np.pad(audio, ((0, 0), (0, samples - audio.shape[1]))))
    return np.stack(stems)


def estimates_loss(song, estimates: np.ndarray, kind: str) -> float:
    """`evaluate`'s test loss: estimates against sources, both normalised by the mixture's statistics."""
    from .apply import normalize

    _, mean, std = normalize(torch.from_numpy(song.mix))
    error = (torch.from_numpy(estimates) - torch.from_numpy(song.sources)) / std
    return (error.abs().mean() if kind == "l1" else error.square().mean()).item()


def make_scorer(config: ScoreConfig, out: Path) -> DeviceScorer | ScoringPool:
    """The torch scorer on --device (its CPU threads set), or a museval pool."""
    from .distributed import cpus_per_process

    if config.scorer == "torch":
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(config.threads or cpus_per_process(1))
        return DeviceScorer(device)
    workers = config.workers or default_workers(1)
    return ScoringPool(workers, out / ".scratch", max(1, cpus_per_process(1) // workers))


def run_identity(config: ScoreConfig, tracks: Mapping) -> dict:
    """What the scores in `--out` depend on: the estimates folder, subset, loss, the dataset, and
    per song the fingerprints of its reference audio and of its four estimate files, so that
    changed references or changed estimates are never reported with their old scores."""
    identity: dict[str, Any] = {
        "estimates": os.path.abspath(config.estimates),
        "subset": config.subset,
        "loss": config.loss,
    }
    identity.update(dataset_identity(config.musdb, config.is_wav, tracks))
    identity["songs"] = {
        name: audio + ";" + ",".join(file_identity(path) for path in estimate_paths(config, name))
        for name, audio in identity["songs"].items()
    }
    return identity


def score(config: ScoreConfig) -> dict:
    """Score every selected song not scored yet, then aggregate all of them. Returns the results."""

    started = time.time()
    check_config(config)
    tracks = {t.name: t for t in select_tracks(config)}
    check_estimates(config, list(tracks))
    out = Path(config.out)
    identity = check_run_file(out, run_identity(config, tracks))
    with FolderLock(out, "scoring", "--out"):
        return score_locked(config, tracks, identity, started)


def score_locked(config: ScoreConfig, tracks: Mapping, identity: Mapping, started: float) -> dict:
    """`score` once the --out folder is locked (a second scoring into it stops, naming this one)."""
    out = Path(config.out)
    with atomic_path(out / "run.json") as tmp:
        tmp.write_text(json.dumps(identity, indent=2))
    label = config.label or Path(config.estimates).resolve().name
    todo = [name for name in tracks if not song_json_path(out, config.subset, name).is_file()]
    failures: dict[str, str] = {}
    with make_scorer(config, out) as scorer:
        bar = progress_bar(len(todo), "scoring", "song", disable=not config.progress)
        for name in todo:
            bar.update()
            try:
                song = read_song(tracks[name])
                estimates = read_estimates(config, name, *song.sources.shape[1:])
            except UserError as exc:
                failures[name] = str(exc)
                continue
            extra = {
                "loss": estimates_loss(song, estimates, config.loss),
                "loss_kind": config.loss,
                "seconds": song.seconds,
                "label": label,
                "estimates": str(Path(config.estimates).resolve() / config.subset / name),
            }
            json_path = song_json_path(out, config.subset, name)
            scorer.submit(name, song.sources, estimates, json_path, out, song.samplerate, extra)
        bar.close()
    failures.update(scorer.failures)
    if failures:
        listing = "; ".join(f"{name}: {why}" for name, why in sorted(failures.items()))
        raise UserError(f"{len(failures)} songs could not be scored (rerun to retry them): {listing}")
    return write_results(config, tracks, label, scored=len(scorer.scored), seconds=time.time() - started)


def write_results(config: ScoreConfig, tracks: Mapping, label: str, scored: int, seconds: float) -> dict:
    """Aggregate every song's json, write results.json and results.md, print the table."""
    out = Path(config.out)
    documents = {name: read_song_json(song_json_path(out, config.subset, name)) for name in tracks}
    results = {
        "label": label,
        "estimates": os.path.abspath(config.estimates),
        "musdb": os.path.abspath(config.musdb),
        "subset": config.subset,
        "loss_kind": config.loss,
        "scorer": config.scorer,
        **aggregate(documents),
        "this_run": {"scored": scored, "skipped": len(tracks) - scored, "seconds": round(seconds, 1)},
    }
    table = save_results(out, results, config.compare)
    print(
        f"\n{table}\n\n{len(tracks)} songs: scored {scored} in this run ({len(tracks) - scored} already scored), "
        f"{seconds:.0f} s. Scores in {out}/{config.subset}/, table in {out}/results.md" + left_out_note(results)
    )
    return results


def main(argv: Sequence[str] | None = None) -> None:
    (config,) = parse(argv, "demucs-dist score", __doc__, ScoreConfig)
    score(config)


if __name__ == "__main__":
    sys.exit(run_main(main))
