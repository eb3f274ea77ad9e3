"""What the trainer and the evaluator show in TensorBoard beyond plain scalars: listenable audio,
a labelled spectrogram figure of a separation, the run's configuration as hparams (so runs
compare side by side in the HParams tab), and memory. Rank 0 alone writes."""

from __future__ import annotations

import resource
import sys
from collections.abc import Mapping
from typing import Any

import torch

from . import SOURCES

# Scalars the HParams tab shows next to each run's configuration (absent ones stay empty).
HPARAM_METRICS = (
    "valid/best",
    "valid/loss",
    "valid/SDR/All",
    "epoch/train_loss",
    "evaluate/SDR/All",
    "train/examples_per_s",
)


def mono(audio: torch.Tensor) -> torch.Tensor:
    """(channels, samples) -> (samples,) in [-1, 1]: TensorBoard's add_audio takes mono only."""
    return audio.float().mean(0).clamp(-1, 1).cpu()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocated tensors on a GPU, resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports kB


def spectrogram_db(signal: torch.Tensor, n_fft: int = 2048, hop: int = 512) -> torch.Tensor:
    """Log-magnitude spectrogram (frequencies, frames) in dB of a mono signal."""
    window = torch.hann_window(n_fft)
    magnitude = torch.stft(signal.float().cpu(), n_fft, hop, window=window, return_complex=True).abs()
    return 20 * torch.log10(magnitude + 1e-10)


def separation_figure(mixture: torch.Tensor, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], samplerate: int):
    """A matplotlib figure: the mixture on top, then one row per source with its estimate and its
    reference side by side; time in seconds, frequency in kHz, one dB scale for all panels."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training node
    import matplotlib.pyplot as plt

    panels = {"mixture": spectrogram_db(mixture)}
    for name, (estimate, reference) in pairs.items():
        panels[f"{name} estimate"], panels[f"{name} reference"] = spectrogram_db(estimate), spectrogram_db(reference)
    top = max(p.max().item() for p in panels.values())
    extent = (0.0, mixture.numel() / samplerate, 0.0, samplerate / 2000)
    rows = 1 + len(pairs)
    figure, axes = plt.subplots(rows, 2, figsize=(12, 2.2 * rows), squeeze=False, constrained_layout=True)
    layout = [("mixture", None)] + [(f"{n} estimate", f"{n} reference") for n in pairs]
    image = None
    for row, names in enumerate(layout):
        for column, title in enumerate(names):
            axis = axes[row][column]
            if title is None:
                axis.axis("off")
                continue
            image = axis.imshow(panels[title].numpy(), origin="lower", aspect="auto", extent=extent,
                                vmin=top - 80, vmax=top, cmap="magma")  # fmt: skip
            axis.set_title(title, fontsize=9)
            axis.set_ylabel("kHz", fontsize=8)
            axis.tick_params(labelsize=7)
        if row == len(layout) - 1:
            for axis in axes[row]:
                axis.set_xlabel("seconds", fontsize=8)
    if image is not None:
        figure.colorbar(image, ax=axes.ravel().tolist(), label="dB", shrink=0.6)
    return figure


def log_separation(writer, song, estimates: torch.Tensor, step: int, seconds: float = 10.0) -> None:
    """Audio of a validation song's mixture, estimates and references, and the labelled figure.

    `song` has normalised `mix` (channels, time) and `sources` (sources, channels, time) and the
    `mean` and `std` that undo the normalisation; `writer.samplerate` is the audio's rate.
    """
    rate = writer.samplerate
    length = min(song.mix.size(-1), int(seconds * rate))
    start = (song.mix.size(-1) - length) // 2

    def audio(x: torch.Tensor) -> torch.Tensor:  # undo the normalisation, keep the excerpt
        return mono(x[..., start : start + length].float().cpu() * song.std + song.mean)

    mix = audio(song.mix)
    writer.add_audio("separation/mixture", mix, step, sample_rate=rate)
    pairs = {}
    for index, name in enumerate(SOURCES):
        pairs[name] = audio(estimates[index]), audio(song.sources[index])
        writer.add_audio(f"separation/{name}_estimate", pairs[name][0], step, sample_rate=rate)
        writer.add_audio(f"separation/{name}_reference", pairs[name][1], step, sample_rate=rate)
    writer.add_figure("separation/spectrograms", separation_figure(mix, pairs, rate), step)


def hparam_values(config: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The run configuration ({section: {option: value}}) flattened to what the HParams tab takes."""
    values: dict[str, Any] = {}
    for section, options in config.items():
        for key, value in options.items():
            if isinstance(value, (list, tuple)):
                value = " ".join(map(str, value)) or "-"
            if isinstance(value, (bool, int, float, str)):
                values[f"{section}.{key}"] = value
    return values


def log_hparams(writer, config: Mapping[str, Mapping[str, Any]]) -> None:
    """Declare this run's configuration and its metrics (the HPARAM_METRICS scalars, as they are
    logged) in the run's own event files, so TensorBoard's HParams tab lists the run."""
    from torch.utils.tensorboard.summary import hparams

    experiment, start, end = hparams(hparam_values(config), {tag: float("nan") for tag in HPARAM_METRICS})
    for summary in (experiment, start, end):
        writer.file_writer.add_summary(summary)
