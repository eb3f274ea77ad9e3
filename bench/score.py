"""Scorer speed and memory: museval against demucs_dist.bss (torch), on the same songs and cores.

    .venv/bin/python bench/score.py                         # 15, 60 and 240 s songs: ~6 min on 2 cores
    .venv/bin/python bench/score.py --seconds 15 60 --threads 1

Each (scorer, song) runs in a fresh child process with the same cores: museval with
OMP/OPENBLAS/MKL_NUM_THREADS = --threads (its LAPACK solves use them), torch with
torch.set_num_threads(--threads). The child imports its scorer, loads the song's references and
estimates from .npy files (float32, as `evaluate` has them), times the scoring call alone (cold:
no warm-up call; the fastest of --repeat children, as other jobs share this machine) and reports
its peak resident memory (getrusage maxrss of the whole child, python
and the arrays included); a child that only imports and loads gives the floor those numbers
include. The songs are made in a child process too: Linux starts a child's maxrss at its
parent's, so the parent stays small. The parent checks that both scorers agree on every frame.

Then a projection for one GPU from operation counts (no GPU was available to measure): the bytes
the torch scorer moves and the FLOPs of its one 4096 x 4096 Cholesky factorisation, at stated
effective rates.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLERATE = 44100

CHILD = r"""
import json, resource, sys, time
import numpy as np
scorer, folder, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
load_only = scorer.startswith("load:")  # import the scorer and load the song, score nothing
scorer = scorer.removeprefix("load:")
if scorer == "torch":
    import torch
    torch.set_num_threads(threads)
    from demucs_dist.bss import bss_eval_v4
else:
    import museval
references = np.load(folder + "/references.npy")
estimates = np.load(folder + "/estimates.npy")
seconds, scores = 0.0, None
if load_only:
    pass
elif scorer == "torch":
    start = time.perf_counter()
    scores = bss_eval_v4(torch.from_numpy(references), torch.from_numpy(estimates)).numpy()
    seconds = time.perf_counter() - start
else:
    start = time.perf_counter()
    refs = references.astype(np.float64).transpose(0, 2, 1)  # what scoring.score_song hands museval
    ests = estimates.astype(np.float64).transpose(0, 2, 1)
    sdr, isr, sir, sar = museval.evaluate(refs, ests, win=44100, hop=44100)
    seconds = time.perf_counter() - start
    scores = {"SDR": sdr, "ISR": isr, "SIR": sir, "SAR": sar}
if scores is not None:
    np.savez(folder + f"/{scorer}.npz", **scores)
print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_song(folder: Path, seconds: float, index: int) -> None:
    """A synthetic song's sources and estimates that a separator could have made: 0.8 x the source
    + 0.2 x the mixture + noise 40 dB down (not in the references' span, so no metric is at the
    float64 noise floor)."""
    from demucs_dist.data.synth import synth_song

    sources = synth_song(7, 2, index, seconds).astype(np.float32) / 32768
    noise = np.random.default_rng(index).standard_normal(sources.shape).astype(np.float32)
    estimates = 0.8 * sources + 0.2 * sources.sum(axis=0) + 0.01 * sources.std() * noise
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "references.npy", sources)
    np.save(folder / "estimates.npy", estimates.astype(np.float32))


def run_child(scorer: str, folder: Path, threads: int, timeout: float) -> dict:
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    env = {**os.environ, **{name: str(threads) for name in names}}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, scorer, str(folder), str(threads)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{scorer} child failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def seconds_of(result: dict) -> float:
    return result["seconds"]


def max_difference(folder: Path) -> float:
    """Largest |torch - museval| over every frame and metric where museval's is finite (dB)."""
    a, b = np.load(folder / "torch.npz"), np.load(folder / "museval.npz")
    worst = 0.0
    for name in ("SDR", "ISR", "SIR", "SAR"):
        assert np.array_equal(np.isnan(a[name]), np.isnan(b[name])), name
        finite = np.isfinite(b[name])
        worst = max(worst, float(np.abs(a[name][finite] - b[name][finite]).max(initial=0.0)))
    return worst


def gpu_projection(seconds: float, sources: int = 4, channels: int = 2, taps: int = 512) -> dict:
    """Projected seconds of bss_eval_v4 for one song on one H100 (not measured), from its operation
    counts: bytes each stage reads and writes (FFTs counted as 3 passes over their data, the
    transposes, products, differences and squares of the window stage as they are in bss.py),
    the Cholesky factorisations' FLOPs, the song's copy to the GPU and the kernel launches.

    Rates assumed (effective, well under the H100 SXM's peaks of 3.35 TB/s and 67 FP64 TFLOP/s):
    1.5 TB/s for memory-bound kernels, 10 TFLOP/s for a 4096 FP64 Cholesky (cuSOLVER, small n),
    20 GB/s host to device, 10 us per kernel launch.
    """
    samples = int(seconds * SAMPLERATE)
    p = sources * channels  # reference channels; as many estimate channels
    size = 16384
    block = size - 2 * (taps - 1)
    blocks = math.ceil(samples / block)
    bins = size // 2 + 1
    # Correlations, per block: float32 in, float64 segments (p) and pieces (2p), their FFTs
    # (3 passes), the transposes of the spectra (read + write) and the product's reads.
    per_block = (p * size + 2 * p * block) * (4 + 8) + 3 * p * bins * 16 * (3 + 2 + 1)
    correlation_bytes = blocks * per_block
    # Windows, per window: float64 frames of s and e, 2p spectra (FFT 3 passes + transpose),
    # the projections (2p channels out), three differences, view_as_real squares, weighted sums,
    # the time-domain energies.
    window = SAMPLERATE
    windows = samples // window
    wbins = 44800 // 2 + 1
    spectrum = p * wbins * 16
    per_window = 2 * p * window * (4 + 8) + 2 * spectrum * (3 + 2) + 2 * spectrum * 2 + 3 * spectrum * 3
    per_window += 5 * spectrum * 2 + 3 * p * window * 8
    window_bytes = windows * per_window
    cholesky_flops = (p * taps) ** 3 / 3 + sources * (channels * taps) ** 3 / 3
    transfer_bytes = 2 * p * samples * 4
    launches = blocks / 32 * 12 + windows / 64 * 40 + 50
    parts = {
        "correlations": correlation_bytes / 1.5e12,
        "Cholesky": cholesky_flops / 10e12,
        "windows": window_bytes / 1.5e12,
        "copy to GPU": transfer_bytes / 20e9,
        "launches": launches * 10e-6,
    }
    parts["total"] = sum(parts.values())
    parts["GB moved"] = (correlation_bytes + window_bytes) / 1e9
    return parts


class Report(list):
    """Lines of the markdown report, printed as they come."""

    def append(self, line: str) -> None:
        super().append(line)
        print(line, flush=True)


def main() -> None:
    if sys.argv[1:2] == ["--make-song"]:
        make_song(Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, nargs="+", default=[15.0, 60.0, 240.0], help="song lengths")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="cores for each scorer")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per child process")
    parser.add_argument("--skip-museval-above", type=float, default=math.inf, help="song length (s) museval skips")
    parser.add_argument("--repeat", type=int, default=2, help="children per scorer and song; the fastest is reported")
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    lines = Report()
    lines.append(
        f"Machine: {os.cpu_count()} cores, {args.threads} thread(s) per scorer, load average at start "
        f"{' / '.join(load)}; `{' '.join([Path(sys.executable).name, *sys.argv])}`"
    )
    lines.append("")
    header = ["song", "museval", "torch (bss.py)", "speed-up", "museval peak memory", "torch peak memory",
              "load-only floor (museval / torch child)", "max abs difference"]  # fmt: skip
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for index, seconds in enumerate(args.seconds):
            folder = Path(tmp) / f"song{index}"
            # In a child: the parent's peak memory would be every child's floor (maxrss is inherited).
            subprocess.run([sys.executable, __file__, "--make-song", str(folder), str(seconds), str(index)], check=True)
            floors = {s: run_child(f"load:{s}", folder, args.threads, args.timeout) for s in ("museval", "torch")}
            fast = min(
                (run_child("torch", folder, args.threads, args.timeout) for _ in range(args.repeat)), key=seconds_of
            )
            floor = f"{floors['museval']['peak_mb']:.0f} / {floors['torch']['peak_mb']:.0f} MB"
            if seconds > args.skip_museval_above:
                skipped = f"| {seconds:.0f} s | (skipped) | {fast['seconds']:.2f} s | | | {fast['peak_mb']:.0f} MB |"
                lines.append(f"{skipped} {floor} | |")
                continue
            slow = min(
                (run_child("museval", folder, args.threads, args.timeout) for _ in range(args.repeat)), key=seconds_of
            )
            lines.append(
                f"| {seconds:.0f} s | {slow['seconds']:.1f} s | {fast['seconds']:.2f} s | "
                f"**{slow['seconds'] / fast['seconds']:.1f}x** | {slow['peak_mb']:.0f} MB | {fast['peak_mb']:.0f} MB | "
                f"{floor} | {max_difference(folder):.1e} dB |"
            )
    with open("/proc/loadavg") as f:
        lines.append(f"\nLoad average at the end: {' / '.join(f.read().split()[:3])}.")
    lines.append("")
    lines.append("Projection for one H100 (operation counts, not measured; see gpu_projection's rates):")
    for seconds in args.seconds:
        parts = gpu_projection(seconds)
        detail = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in parts.items() if k not in ("total", "GB moved"))
        lines.append(
            f"- {seconds:.0f} s song: **{parts['total'] * 1000:.0f} ms** ({detail}; {parts['GB moved']:.1f} GB moved)"
        )


if __name__ == "__main__":
    main()
