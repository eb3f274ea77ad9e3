"""`demucs-dist evaluate`: score a model on MUSDB18 songs with the shift trick and bss_eval v4
(museval's SiSEC 2018 metrics), on every device at once.

    accelerate launch -m demucs_dist.evaluate --model runs/x/best.th --musdb DIR --out eval/x
    launch/evaluate.sh --model runs/x/best.th --musdb DIR --out eval/x

The songs (the test subset by default) are split across the ranks balanced by duration. Each rank
reads a song, runs shift-trick inference on its device in bounded memory (chunked) and scores the
estimates: with `--scorer torch` (the default) right there on the same device (demucs_dist.bss:
museval's numbers, in a fraction of a second per song on a GPU); with `--scorer museval` in its
own pool of museval worker processes, going on with the next song while the pool scores. Once the
last song is scored, rank 0 gathers every song's scores from the output folder, aggregates them
and prints the table.

Output folder (the same on every node: `--out` must be shared on a multi-node run):
    <out>/<subset>/<song>.json   museval's json for each song (+ its test loss under "demucs_dist");
                                 written once museval is done: a rerun skips these songs
    <out>/results.json           the aggregate, per-song medians and losses, and what this run did
    <out>/results.md             the table (also printed)
    <out>/run.json               model hash, settings and the dataset (root, format, each song's
                                 audio fingerprint): a rerun with other ones, or on changed audio,
                                 is refused rather than reporting the old scores as new
    <out>/events.log             one line per song inferred and per song scored, by any run
    <out>/estimates/<subset>/<song>/<source>.wav   with --save-estimates (museval's layout)

`--baseline mixture` scores the mixture as every source's estimate (no model): what museval gives
for no separation at all. `--compare OTHER/results.json` adds another run's SDR as a row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import SOURCES
from .apply import apply_model, loss_function, normalize, song_seed
from .audio import write_wav
from .config import ApplyConfig, option, parse
from .data.songs import dataset_identity, read_songs_ahead, select_tracks
from .errors import UserError, run_main
from .files import FolderLock, atomic_path, sha256_of
from .model import Demucs
from .modelfile import read_model_file
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
    format_table,
    left_out_note,
    log_event,
    read_song_json,
    save_results,
    song_json_path,
)

BASELINES = ("mixture",)


@dataclasses.dataclass
class EvaluateConfig:
    """What to evaluate and where the scores go."""

    model: str = option("", "model file written by demucs-dist train (e.g. runs/NAME/best.th)")
    baseline: str = option(
        "", "score a baseline instead of a model: the mixture as every source's estimate", choices=BASELINES
    )
    musdb: str = option("", "MUSDB18 root folder (with train/ and test/)")
    is_wav: bool = option(False, "MUSDB18-HQ wav layout (<song>/mixture.wav...) instead of .stem.mp4 files")
    subset: str = option("test", "which MUSDB18 subset to score", choices=("test", "train"))
    songs: list[str] = option([], "only these songs (folder names; or one file listing a name per line)")
    out: str = option("", "output folder: per-song museval json, results.json, results.md")
    label: str = option("", "name of this run in tables (default: the model file's name or the baseline)")
    loss: str = option(
        "",
        "test loss against the normalised sources (default: the model file's training loss; l1 for a baseline)",
        choices=("", "l1", "mse"),
    )
    seed: int = option(0, "seed of the shift offsets; each song adds a hash of its name, whatever its rank")
    scorer: str = option(
        "torch",
        "torch: bss_eval v4 on this rank's device right after inference (museval's numbers, fast); "
        "museval: museval itself in CPU worker processes",
        choices=SCORERS,
    )
    workers: int = option(
        0,
        "museval worker processes per rank with --scorer museval (0 = the rank's cores minus one, ~4 GB each)",
        minimum=0,
    )
    read_ahead: int = option(
        4,
        "songs each rank decodes ahead, in parallel, while it infers (~0.4 GB each for a 4-minute song; "
        "decoding .stem.mp4 costs about as much as inference on a GPU); 0 = read each song when needed",
        minimum=0,
    )
    save_estimates: bool = option(False, "also write the separated stems as wav under <out>/estimates/")
    logdir: str = option("", "also write the scores to TensorBoard in this folder")
    compare: list[str] = option([], "results.json of other runs (e.g. a --baseline run) to add as SDR rows")
    timeout: float = option(7200.0, "seconds a rank waits for the others at a synchronisation point", minimum=1)
    progress: bool = option(True, "progress bars (one per rank for inference and one for scoring)")


# ---------------------------------------------------------------------------------------------
# Checks made before any rank starts working


def check_config(config: EvaluateConfig) -> None:
    if bool(config.model) == bool(config.baseline):
        raise UserError("give either --model FILE or --baseline mixture")
    if config.baseline and config.baseline not in BASELINES:
        raise UserError(f"unknown --baseline {config.baseline!r}; choose from {', '.join(BASELINES)}")
    if config.model and not os.path.isfile(config.model):
        raise UserError(f"model file not found: {config.model}")
    if not config.out:
        raise UserError("--out is required: the folder the scores go to")
    check_out(config.out)
    check_compare(config.compare)
    if not config.loss:  # the loss the model was trained (and validated) with
        config.loss = read_model_file(config.model)["info"].get("loss", "l1") if config.model else "l1"


def run_identity(config: EvaluateConfig, apply_config: ApplyConfig, tracks: Mapping | None = None) -> dict:
    """What the scores in `--out` depend on. A rerun must match it, or it would mix two runs.
    `tracks` ({name: musdb track}): the songs, whose audio fingerprints are recorded."""
    identity: dict[str, Any] = (
        {"model_sha256": sha256_of(config.model)} if config.model else {"baseline": config.baseline}
    )
    if config.model:
        identity.update(
            shifts=apply_config.shifts,
            split=apply_config.split,
            segment=apply_config.segment,
            overlap=apply_config.overlap,
            seed=config.seed,
        )
    identity.update(subset=config.subset, loss=config.loss)
    if tracks is not None:
        identity.update(dataset_identity(config.musdb, config.is_wav, tracks))
    return identity


# ---------------------------------------------------------------------------------------------
# One song


def infer_song(
    model: Demucs | None,
    song,
    apply_config: ApplyConfig,
    seed: int,
    loss_kind: str,
    device: torch.device,
) -> tuple[np.ndarray, float]:
    """Separate one Song on `device`: returns (estimates (sources, channels, samples), test loss).

    The loss compares normalised estimates with the sources normalised by the mixture's
    statistics (what training minimises); the estimates are returned denormalised for museval.
    model=None is the mixture baseline: the mixture is every source's estimate.
    """
    mix = torch.from_numpy(song.mix).to(device)
    normalized, mean, std = normalize(mix)
    if model is None:
        estimated = normalized.expand(len(SOURCES), -1, -1)
    else:
        estimated = apply_model(model, normalized, seed=seed, **dataclasses.asdict(apply_config))
    targets = (torch.from_numpy(song.sources).to(device) - mean) / std
    loss = loss_function(loss_kind)(estimated, targets)
    return (estimated * std + mean).cpu().numpy(), loss.item()


# ---------------------------------------------------------------------------------------------
# The run


def make_scorer(
    config: EvaluateConfig, device: torch.device, node_processes: int, out: Path, position: int, desc: str
) -> DeviceScorer | ScoringPool:
    """This rank's scorer, and its share of the CPU threads.

    torch: scores on `device` right after inference, so a CPU rank keeps all its cores for both.
    museval: a pool of worker processes; a CPU rank leaves the pool its cores.
    """
    from .distributed import cpus_per_process

    cores = cpus_per_process(node_processes)
    if config.scorer == "torch":
        if device.type == "cpu":
            torch.set_num_threads(cores)
        return DeviceScorer(device, config.progress, position=position, desc=desc)
    workers = config.workers or default_workers(node_processes)
    if device.type == "cpu":
        torch.set_num_threads(max(1, cores - workers))
    return ScoringPool(workers, out / ".scratch", max(1, cores // workers), config.progress, position, desc)


def infer_and_score(
    config: EvaluateConfig,
    apply_config: ApplyConfig,
    model: Demucs | None,
    tracks: Mapping,
    names: Sequence[str],
    scorer: DeviceScorer | ScoringPool,
    label: str,
    device: torch.device,
    bar: Any = None,
) -> tuple[list[str], dict[str, str]]:
    """Infer each of this rank's songs (decoded `--read-ahead` songs ahead) and hand it to
    `scorer`, counting each on the progress `bar`. Returns (inferred, failures)."""
    out = Path(config.out)
    inferred, failures = [], {}
    # closing: on an error, the decodes still queued are dropped at once, not finished first
    with contextlib.closing(read_songs_ahead(tracks, names, config.read_ahead)) as reading:
        for name, song in reading:
            if bar is not None:
                bar.update()
            json_path = song_json_path(out, config.subset, name)
            if isinstance(song, UserError):  # one unreadable song must not stall the other ranks
                failures[name] = str(song)
                continue
            seed = song_seed(config.seed, name)
            tic = time.perf_counter()
            estimates, loss = infer_song(model, song, apply_config, seed, config.loss, device)
            log_event(out, "inferred", name)
            inferred.append(name)
            if config.save_estimates:
                for source, stem in zip(SOURCES, estimates):
                    write_wav(
                        out / "estimates" / config.subset / name / f"{source}.wav", stem, song.samplerate, "FLOAT"
                    )
            extra = {
                "loss": loss,
                "loss_kind": config.loss,
                "seconds": song.seconds,
                "inference_seconds": round(time.perf_counter() - tic, 3),
                "label": label,
                "shift_seed": seed,
            }
            scorer.submit(name, song.sources, estimates, json_path, out, song.samplerate, extra)
            del song, estimates
    return inferred, failures


def evaluate(config: EvaluateConfig, apply_config: ApplyConfig) -> dict | None:
    """Run the whole evaluation on this rank; rank 0 returns the results (others None).

    With --scorer museval, the workers start the way multiprocessing's forkserver does: they re-run
    the main module, so a script that calls this must do so under `if __name__ == "__main__":`.
    """
    from .distributed import make_accelerator

    started = time.time()
    check_config(config)
    tracks = {t.name: t for t in select_tracks(config)}
    out = Path(config.out)
    identity = check_run_file(out, run_identity(config, apply_config, tracks))

    accelerator = make_accelerator(mixed_precision="no", timeout_s=config.timeout)
    lock = FolderLock(out, "evaluation", "--out")
    try:
        return evaluate_locked(config, apply_config, tracks, identity, accelerator, lock, started)
    finally:
        lock.release()


def evaluate_locked(
    config: EvaluateConfig,
    apply_config: ApplyConfig,
    tracks: Mapping,
    identity: Mapping,
    accelerator: Any,
    lock: FolderLock,
    started: float,
) -> dict | None:
    """`evaluate` from the point where rank 0 takes the folder's lock (held until the end)."""
    from accelerate.utils import broadcast_object_list, gather_object

    from .distributed import balance, processes_on_this_node
    from .modelfile import load_model

    out = Path(config.out)
    rank, world = accelerator.process_index, accelerator.num_processes
    scored: list[str] | str | None = None
    if accelerator.is_main_process:
        try:
            lock.acquire()  # a second evaluation into this --out stops here, naming this one
        except UserError as exc:
            scored = str(exc)  # every rank stops with it, rather than wait in the broadcast below
        else:
            out.mkdir(parents=True, exist_ok=True)
            with atomic_path(out / "run.json") as tmp:
                tmp.write_text(json.dumps(identity, indent=2))
            shutil.rmtree(out / ".scratch", ignore_errors=True)  # arrays left by a killed run
            scored = [n for n in tracks if song_json_path(out, config.subset, n).is_file()]
    # Every rank must split the same remaining songs: rank 0 looks, before anyone scores one.
    scored = broadcast_object_list([scored])[0]
    if isinstance(scored, str):
        raise UserError(scored)
    done = set(scored or [])
    remaining = {n: float(tracks[n].duration or 0.0) for n in tracks if n not in done}
    mine = balance(remaining, world)[rank]

    node_processes = processes_on_this_node(accelerator)
    device = accelerator.device
    model = None
    if config.model:
        model = load_model(config.model).to(device)
    label = config.label or (Path(config.model).stem if config.model else f"{config.baseline} baseline")

    bar = progress_bar(len(mine), f"rank {rank} inference", "song", position=rank, disable=not config.progress)
    scorer = make_scorer(config, device, node_processes, out, position=world + rank, desc=f"rank {rank} scoring")
    with scorer:
        inferred, failures = infer_and_score(config, apply_config, model, tracks, mine, scorer, label, device, bar)
    failures.update(scorer.failures)
    bar.close()

    # The gather: every rank reports what it did (this also waits for the slowest rank), then
    # rank 0 reads every song's json from the shared folder.
    reports = gather_object([{"rank": rank, "inferred": inferred, "scored": scorer.scored, "failures": failures}])
    all_failures = {name: why for report in reports for name, why in report["failures"].items()}
    if all_failures:
        listing = "; ".join(f"{name}: {why}" for name, why in sorted(all_failures.items()))
        raise UserError(f"{len(all_failures)} songs could not be scored (rerun to retry them): {listing}")
    results = None
    if accelerator.is_main_process:
        results = gather_results(config, apply_config, tracks, label, reports, time.time() - started)
        shutil.rmtree(out / ".scratch", ignore_errors=True)
        if config.logdir:
            info = read_model_file(config.model)["info"] if config.model else {}
            write_tensorboard(config.logdir, results, step=int(info.get("epoch", 0) or 0))
    accelerator.end_training()
    return results


def gather_results(
    config: EvaluateConfig,
    apply_config: ApplyConfig,
    tracks: Mapping,
    label: str,
    reports: Sequence[Mapping],
    seconds: float,
) -> dict:
    """Rank 0: read every song's json, aggregate, write results.json and results.md, print."""
    out = Path(config.out)
    paths = {name: song_json_path(out, config.subset, name) for name in tracks}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} songs have no scores in {out}/{config.subset} ({', '.join(missing[:3])}...): "
            "on several machines, --out must be a folder they all share"
        )
    results = {
        "label": label,
        "model": os.path.abspath(config.model) if config.model else None,
        "baseline": config.baseline or None,
        "musdb": os.path.abspath(config.musdb),
        "subset": config.subset,
        "loss_kind": config.loss,
        "shifts": apply_config.shifts if config.model else 0,
        "seed": config.seed,
        "scorer": config.scorer,
        **aggregate({name: read_song_json(path) for name, path in paths.items()}),
        "this_run": {
            "processes": len(reports),
            "inferred": sum(len(r["inferred"]) for r in reports),
            "scored": sum(len(r["scored"]) for r in reports),
            "skipped": len(tracks) - sum(len(r["inferred"]) for r in reports),
            "seconds": round(seconds, 1),
        },
    }
    table = save_results(out, results, config.compare)
    run = results["this_run"]
    print(
        f"\n{table}\n\n{len(tracks)} songs: inferred {run['inferred']} and scored {run['scored']} in this run "
        f"({run['skipped']} already scored), {run['processes']} processes, {run['seconds']:.0f} s. "
        f"Scores in {out}/{config.subset}/, table in {out}/results.md" + left_out_note(results)
    )
    return results


def write_tensorboard(logdir: str, results: Mapping, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(logdir)
    for column, metrics in results["scores"].items():
        for metric, value in metrics.items():
            writer.add_scalar(f"evaluate/{metric}/{column}", value, step)
    writer.add_scalar(f"evaluate/{results['loss_kind']}_loss", results["loss"], step)
    writer.add_text("evaluate/table", format_table(results), step)
    writer.close()


def baseline_scores(
    musdb: str | os.PathLike, out: str | os.PathLike, is_wav: bool = False, subset: str = "test", **options
) -> dict | None:
    """Score the mixture as every source's estimate: what museval gives for no separation at all.

    Runs like `demucs-dist evaluate --baseline mixture` (on every rank when launched distributed;
    rank 0 returns the results). `options`: other EvaluateConfig fields (songs, workers...).
    As with `evaluate`, call it under `if __name__ == "__main__":` in a script.
    """
    config = EvaluateConfig(
        baseline="mixture", musdb=str(musdb), out=str(out), is_wav=is_wav, subset=subset, progress=False, **options
    )
    return evaluate(config, ApplyConfig())


def main(argv: Sequence[str] | None = None) -> None:
    config, apply_config = parse(
        argv,
        "demucs-dist evaluate",
        __doc__,
        EvaluateConfig,
        ApplyConfig,
        epilog="Run it under `accelerate launch -m demucs_dist.evaluate` (or launch/evaluate.sh) to use every GPU.",
    )
    evaluate(config, apply_config)


if __name__ == "__main__":
    sys.exit(run_main(main))
