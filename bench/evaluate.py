"""Evaluation speed: inference with 1 and 10 shifts, museval, and whole `evaluate` runs.

    .venv/bin/python bench/evaluate.py                  # channels=64 model, ~5 minutes on 2 cores
    .venv/bin/python bench/evaluate.py --channels 16 --seconds 10 --e2e-seconds 10
    .venv/bin/python bench/evaluate.py --scorers                # evaluate with --scorer torch vs museval

Prints a markdown report: seconds per minute of audio for shift-trick inference (the model of
`--channels`, chunked as `evaluate` runs it) and for museval (one process, one BLAS thread, as a
pool worker runs it; at two song lengths, since museval has a fixed cost per song), the peak
memory of museval, and the wall time of `demucs-dist evaluate` on synthetic songs with 1 process
and 1 or 2 museval workers and with 2 processes. Then it projects MUSDB18's 50 test songs on an
8-GPU node from those numbers.

`--scorers` instead times whole `evaluate` runs on the demo's test songs (3 synthetic songs of
20 s, the demo's model architecture, 2 shifts; untrained weights: the same work as the trained
model) with `--scorer torch` and `--scorer museval`, in 1 process and in 2 as `make demo` runs
it, then projects MUSDB18's 50 test songs on one 8-GPU node with the torch scorer: MUSDB18 decoding
(measured on the clip that ships with stempeg), inference (FLOPs), scoring (bench/score.py's
operation counts) and the start-up measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from demucs_dist.apply import apply_model, normalize
from demucs_dist.data.synth import synthesize
from demucs_dist.evaluate import EvaluateConfig
from demucs_dist.model import Demucs
from demucs_dist.modelfile import save_model

REPO = Path(__file__).resolve().parents[1]
MUSDB_TEST_SECONDS = 50 * 4.0 * 60  # MUSDB18: 150 songs, ~10 h -> ~4 min per song, ~3.3 h for the test set
FORWARD_GFLOP_PER_10S = 118  # channels=64: docs/benchmarks.md, Training step

MUSEVAL_SCRIPT = """
import resource, sys, time
import numpy as np
from demucs_dist.data.songs import open_tracks, read_song
from demucs_dist.scoring import score_song
song = read_song([t for t in open_tracks(sys.argv[1], True, "test") if t.name == sys.argv[2]][0])
noise = np.random.default_rng(0).standard_normal(song.sources.shape).astype(np.float32)
estimates = song.sources + 0.1 * song.sources.std() * noise
start = time.perf_counter()
score_song(song.sources, estimates, song.samplerate)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def time_inference(channels: int, seconds: float, shifts: int) -> float:
    """Seconds of shift-trick inference for `seconds` of audio (random input: speed only)."""
    torch.manual_seed(0)
    model = Demucs(channels=channels).eval()
    mix, _, _ = normalize(torch.randn(2, int(seconds * 44100)))
    apply_model(model, mix[:, : 44100 * 2], split=True)  # warm-up
    start = time.perf_counter()
    apply_model(model, mix, shifts=shifts, split=True, segment=10.0, overlap=0.25, batch_size=4)
    return time.perf_counter() - start


def time_museval(root: Path, song: str) -> tuple[float, float]:
    """(seconds, peak MB) of museval on one song, in a fresh one-thread process like a pool worker."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", MUSEVAL_SCRIPT, str(root), song], env=env, capture_output=True, text=True, check=True
    )
    seconds, megabytes = result.stdout.split()
    return float(seconds), float(megabytes)


def time_evaluate(
    model: Path,
    root: Path,
    out: Path,
    processes: int,
    workers: int,
    scorer: str = "museval",
    shifts: int = 1,
    expect_scored: bool = True,
) -> float:
    """Wall seconds of a whole `demucs-dist evaluate` run (process start to results.json)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "NPROC": str(processes)}
    command = [sys.executable, "-m", "demucs_dist.evaluate"] if processes == 1 else ["bash", "launch/evaluate.sh"]
    command += ["--model", str(model), "--musdb", str(root), "--is-wav", "--out", str(out), "--scorer", scorer]
    command += ["--shifts", str(shifts), "--workers", str(workers), "--no-progress"]
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    assert (json.loads((out / "results.json").read_text())["this_run"]["scored"] > 0) == expect_scored
    return wall


def decode_seconds_per_audio_second() -> float:
    """Seconds to decode one second of a MUSDB18 .stem.mp4 (mixture + 4 stems) here, on the clip
    that ships with stempeg, the way `evaluate` reads songs (musdb, one ffmpeg process)."""
    import stempeg

    from demucs_dist.data.songs import open_tracks, read_song

    with tempfile.TemporaryDirectory() as root:
        clip = Path(stempeg.example_stem_path())
        (Path(root) / "test").mkdir()
        (Path(root) / "test" / clip.name).symlink_to(clip)
        track = open_tracks(root, is_wav=False, subset="test")[0]
        start = time.perf_counter()
        song = read_song(track)
        return (time.perf_counter() - start) / song.seconds


def compare_scorers(lines: list) -> None:
    """Whole `evaluate` runs on the demo's test songs with both scorers, and the 50-song projection."""
    sys.path.insert(0, str(Path(__file__).parent))
    from score import gpu_projection  # bench/score.py

    songs, seconds, shifts = 3, 20.0, 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = synthesize(tmp / "demo", train=0, valid=0, test=songs, seconds=seconds, seed=0)
        torch.manual_seed(0)
        model = tmp / "demo-architecture.th"
        save_model(Demucs(channels=16, depth=5, lstm_layers=1), model)
        lines.append(
            f"- `evaluate` on the demo's test songs ({songs} x {seconds:.0f} s, channels 16 / depth 5 / 1 BLSTM "
            f"layer, {shifts} shifts), wall time from launch to results.json:"
        )
        walls = {}
        for scorer, processes, workers in [("torch", 1, 0), ("museval", 1, 0), ("torch", 2, 0), ("museval", 2, 0)]:
            out = tmp / f"{scorer}{processes}"
            walls[scorer, processes] = time_evaluate(model, root, out, processes, workers, scorer, shifts)
            document = json.loads(next((out / "test").glob("*.json")).read_text())["demucs_dist"]
            scoring = document.get("scoring_seconds", document.get("museval_seconds"))
            lines.append(
                f"  - `--scorer {scorer}`, {processes} process(es) (default workers): "
                f"**{walls[scorer, processes]:.1f} s** (one song's scoring: {scoring:.2f} s)"
            )
            if scorer == "torch" and processes == 1:
                startup = time_evaluate(model, root, out, processes, workers, scorer, shifts, expect_scored=False)
                lines.append(
                    f"  - the same command again, every song scored already (start-up and gather): {startup:.1f} s"
                )
        lines.append(
            f"  - torch vs museval: {walls['museval', 1] / walls['torch', 1]:.1f}x (1 process), "
            f"{walls['museval', 2] / walls['torch', 2]:.1f}x (2 processes)"
        )
    decode = decode_seconds_per_audio_second()
    song_seconds = MUSDB_TEST_SECONDS / 50
    per_gpu_songs = 50 / 8
    inference = FORWARD_GFLOP_PER_10S * 6 * 10 * 4 / 3 * MUSDB_TEST_SECONDS / 60 / 8 / 20000
    scoring = per_gpu_songs * gpu_projection(song_seconds)["total"]
    read_ahead = EvaluateConfig().read_ahead  # songs decoded in parallel per rank, while it infers
    first_song = song_seconds * decode  # nothing to overlap it with
    decoding = per_gpu_songs * song_seconds * decode / read_ahead  # given a free core per decode
    lines += [
        "",
        f"Projection, MUSDB18 test set (50 songs, ~{MUSDB_TEST_SECONDS / 3600:.1f} h), one 8-GPU node, "
        "`--scorer torch`, 10 shifts (not measured: no GPU here):",
        f"- decoding the .stem.mp4 files: {decode:.3f} s per second of audio here (the stempeg clip), "
        f"{per_gpu_songs:.2f} songs of {song_seconds:.0f} s per rank: ~{decoding * read_ahead:.0f} s of one core "
        f"per rank, ~{decoding:.0f} s with --read-ahead {read_ahead} (songs decoded in parallel, given "
        f"{8 * read_ahead} free cores on the node), overlapped with inference after the first song "
        f"({first_song:.0f} s)",
        f"- inference: {inference:.0f} s per GPU (by FLOPs, as above: 20 TFLOP/s effective)",
        f"- scoring on the GPU: ~{scoring:.1f} s per GPU (bench/score.py's operation counts)",
        f"- start-up (accelerate launch, model load, ffprobe of the songs): ~{startup:.0f} s here",
        f"- in all: **~{startup + first_song + max(decoding, inference + scoring):.0f} s** (target: under 2 "
        "minutes): start-up, the first song's decoding, then the longer of decoding and inference + scoring. "
        f"Read one song at a time (--read-ahead 0) they would add up: "
        f"~{startup + decoding * read_ahead + inference + scoring:.0f} s.",
    ]


class Report(list):
    """Lines of the markdown report, printed as they come (a run takes minutes)."""

    def append(self, line: str) -> None:
        super().append(line)
        print(line, flush=True)

    def __iadd__(self, lines):
        for line in lines:
            self.append(line)
        return self


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=64, help="model width for the inference timing")
    parser.add_argument("--seconds", type=float, default=20.0, help="audio length for the inference timing")
    parser.add_argument("--museval-seconds", type=float, nargs=2, default=[15.0, 60.0], help="two song lengths")
    parser.add_argument("--e2e-songs", type=int, default=4, help="synthetic songs for the whole-run timings")
    parser.add_argument("--e2e-seconds", type=float, default=20.0, help="their length")
    parser.add_argument("--e2e-channels", type=int, default=16, help="model width for the whole-run timings")
    parser.add_argument("--scorers", action="store_true", help="only: evaluate with --scorer torch vs museval")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    lines = Report()
    lines.append(
        f"Machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, fp32."
    )
    if args.scorers:
        compare_scorers(lines)
        return

    per_minute = {}
    for shifts in (1, 10):
        seconds = time_inference(args.channels, args.seconds, shifts)
        per_minute[shifts] = seconds / args.seconds * 60
        lines.append(
            f"- inference, channels={args.channels}, {shifts} shift(s), 10 s chunks with 25% overlap: "
            f"{seconds:.1f} s for {args.seconds:.0f} s of audio = **{per_minute[shifts]:.0f} s per minute of audio**"
        )

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        museval_points = []
        for length in args.museval_seconds:
            root = synthesize(tmp / f"museval{length:.0f}", train=0, valid=0, test=1, seconds=length)
            seconds, megabytes = time_museval(root, "Synth Test 000")
            museval_points.append((length, seconds, megabytes))
            lines.append(
                f"- museval, one {length:.0f} s song, 1 thread: {seconds:.1f} s "
                f"(= {seconds / length * 60:.0f} s per minute of audio), peak memory {megabytes / 1024:.2f} GB"
            )
        (l1, s1, m1), (l2, s2, m2) = museval_points
        slope, fixed = (s2 - s1) / (l2 - l1), s1 - (s2 - s1) / (l2 - l1) * l1
        mem_slope, mem_fixed = (m2 - m1) / (l2 - l1), m1 - (m2 - m1) / (l2 - l1) * l1
        lines.append(
            f"- museval fit: {fixed:.1f} s per song + {slope:.2f} s per second of audio "
            f"(**{slope * 60:.0f} s per minute**); memory {mem_fixed / 1024:.2f} GB + {mem_slope:.0f} MB per second"
        )

        root = synthesize(tmp / "e2e", train=0, valid=0, test=args.e2e_songs, seconds=args.e2e_seconds)
        torch.manual_seed(0)
        model = tmp / "model.th"
        save_model(Demucs(channels=args.e2e_channels), model)
        audio = args.e2e_songs * args.e2e_seconds
        lines.append(
            f"- `evaluate`, {args.e2e_songs} synthetic songs x {args.e2e_seconds:.0f} s, "
            f"channels={args.e2e_channels}, 1 shift (museval-bound), wall time from launch to results.json:"
        )
        for processes, workers in [(1, 1), (1, 2), (2, 1)]:
            wall = time_evaluate(model, root, tmp / f"out{processes}{workers}", processes, workers)
            lines.append(
                f"  - {processes} process(es) x {workers} museval worker(s): {wall:.1f} s "
                f"({wall / audio * 60:.0f} s per minute of audio)"
            )

    museval_cpu = 50 * fixed + slope * MUSDB_TEST_SECONDS
    lines += [
        "",
        f"Projection, MUSDB18 test set (50 songs, ~{MUSDB_TEST_SECONDS / 3600:.1f} h of audio), 8-GPU node:",
        f"- museval: {museval_cpu / 3600:.1f} CPU-hours in all. With 8 ranks x (cores/8 - 1) workers: "
        f"{museval_cpu / (8 * 7) / 60:.0f} min on 64 cores, {museval_cpu / (8 * 15) / 60:.0f} min on 128 cores "
        f"(memory: ~{(mem_fixed + mem_slope * 240) / 1024:.1f} GB per worker for a 4-minute song).",
        f"- inference, 10 shifts: {per_minute[10] * MUSDB_TEST_SECONDS / 60 / 3600:.1f} h on this CPU in one "
        f"process. On GPUs, by FLOPs: {FORWARD_GFLOP_PER_10S} GFLOP per 10 s forward x 6 x 10 shifts x 4/3 "
        f"(overlap) = {FORWARD_GFLOP_PER_10S * 6 * 10 * 4 / 3 / 1000:.1f} TFLOP per minute of audio; "
        f"{MUSDB_TEST_SECONDS / 60:.0f} minutes over 8 GPUs at an effective 20 TFLOP/s is "
        f"{FORWARD_GFLOP_PER_10S * 6 * 10 * 4 / 3 * MUSDB_TEST_SECONDS / 60 / 8 / 20000 / 60:.1f} min per GPU.",
    ]


if __name__ == "__main__":
    main()
