"""What the trainer and the evaluator show in TensorBoard beyond scalars: listenable audio and a
spectrogram picture of a separation. Rank 0 alone writes."""

from __future__ import annotations

import torch

from . import SOURCES

# A dark-to-bright colour ramp (black, purple, orange, pale yellow) for spectrograms.
_RAMP = torch.tensor([[0.0, 0.0, 0.02], [0.45, 0.1, 0.5], [0.95, 0.45, 0.15], [1.0, 1.0, 0.75]])


def mono(audio: torch.Tensor) -> torch.Tensor:
    """(channels, samples) -> (samples,) in [-1, 1]: TensorBoard's add_audio takes mono only."""
    return audio.float().mean(0).clamp(-1, 1).cpu()


def _colorize(values: torch.Tensor) -> torch.Tensor:
    """(H, W) in [0, 1] -> (3, H, W) through the colour ramp."""
    position = values.clamp(0, 1) * (len(_RAMP) - 1)
    low = position.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (position - low).unsqueeze(-1)
    rgb = _RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac
    return rgb.permute(2, 0, 1)


def spectrogram_image(rows: list[torch.Tensor], n_fft: int = 2048, hop: int = 512, floor_db: float = 80.0):
    """Stack log-magnitude spectrograms of mono signals into one (3, H, W) picture.

    All rows share one dB scale (0 dB = the loudest bin of all rows), low frequencies at the bottom
    of each row, a thin white line between rows.
    """
    window = torch.hann_window(n_fft)
    mags = [torch.stft(r.float().cpu(), n_fft, hop, window=window, return_complex=True).abs() for r in rows]
    top = max(m.max().item() for m in mags) + 1e-12
    pictures = []
    for mag in mags:
        db = 20 * torch.log10(mag / top + 1e-12)
        picture = _colorize(1 + db.clamp(min=-floor_db) / floor_db).flip(1)
        pictures += [picture, torch.ones(3, 2, picture.size(-1))]
    return torch.cat(pictures[:-1], dim=1)


def log_separation(writer, song, estimates: torch.Tensor, step: int, seconds: float = 10.0) -> None:
    """Audio of a validation song's mixture, estimates and references, and their spectrograms.

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
    rows = [mix]
    for index, name in enumerate(SOURCES):
        estimate, reference = audio(estimates[index]), audio(song.sources[index])
        writer.add_audio(f"separation/{name}_estimate", estimate, step, sample_rate=rate)
        writer.add_audio(f"separation/{name}_reference", reference, step, sample_rate=rate)
        rows += [estimate, reference]
    writer.add_image("separation/spectrograms", spectrogram_image(rows), step)  # mix, then estimate/reference
