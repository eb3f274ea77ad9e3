"""Reading and writing audio files: soundfile where it can, ffmpeg for everything else.

Arrays are float32 (channels, samples), the layout the model uses. (musdb uses (samples, channels).)
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import soundfile

from .errors import UserError
from .files import atomic_path


def require_ffmpeg() -> None:
    """musdb, stempeg and museval need the ffmpeg and ffprobe executables; say so clearly."""
    missing = [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]
    if missing:
        raise UserError(
            f"{' and '.join(missing)} not found on PATH: install ffmpeg (e.g. 'sudo apt-get install ffmpeg')"
        )


def audio_info(path: str | os.PathLike) -> tuple[int, int, float]:
    """(samplerate, channels, seconds) of an audio file, via ffprobe."""
    require_ffmpeg()
    entries = "stream=sample_rate,channels:format=duration"
    command = ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries", entries,
               "-of", "default=noprint_wrappers=1", os.fspath(path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    fields = dict(line.split("=", 1) for line in result.stdout.split() if "=" in line)
    if result.returncode != 0 or "sample_rate" not in fields:
        raise UserError(f"cannot read audio from {path}: {result.stderr.strip().splitlines()[-1:] or 'no audio'}")
    return int(fields["sample_rate"]), int(fields["channels"]), float(fields.get("duration", "nan"))


def read_audio(
    path: str | os.PathLike, samplerate: int | None = None, channels: int | None = None
) -> tuple[np.ndarray, int]:
    """Decode any file ffmpeg reads to float32 (channels, samples), optionally resampled/remixed.

    Returns (audio, samplerate). Mono becomes stereo by duplication when `channels` is 2.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"audio file not found: {path}")
    source_rate, source_channels, _ = audio_info(path)
    samplerate = samplerate or source_rate
    channels = channels or source_channels
    command = ["ffmpeg", "-v", "error", "-nostdin", "-i", path, "-map", "0:a:0",
               "-f", "f32le", "-ac", str(channels), "-ar", str(samplerate), "-"]  # fmt: skip
    result = subprocess.run(command, capture_output=True)
    if result.returncode != 0:
        raise UserError(f"cannot decode {path}: {result.stderr.decode(errors='replace').strip()[-300:]}")
    audio = np.frombuffer(result.stdout, dtype=np.float32).reshape(-1, channels).T
    return np.ascontiguousarray(audio), samplerate


def write_wav(path: str | os.PathLike, audio: np.ndarray, samplerate: int, subtype: str = "FLOAT") -> None:
    """Write (channels, samples) audio as a wav file, atomically. subtype: FLOAT or PCM_16, PCM_24."""
    audio = np.asarray(audio, dtype=np.float32)
    with atomic_path(path) as tmp:
        soundfile.write(tmp, audio.T, samplerate, subtype=subtype, format="WAV")


def resample(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Resample float32 (channels, samples) audio with ffmpeg's resampler (the one `read_audio` uses).

    The length becomes about samples * target_rate / source_rate; callers that need an exact
    length trim or pad (see `fit_length`).
    """
    if source_rate == target_rate:
        return audio
    require_ffmpeg()
    channels = audio.shape[0]
    command = ["ffmpeg", "-v", "error", "-nostdin", "-f", "f32le", "-ac", str(channels), "-ar", str(source_rate),
               "-i", "-", "-f", "f32le", "-ar", str(target_rate), "-"]  # fmt: skip
    raw = np.ascontiguousarray(np.asarray(audio, dtype=np.float32).T).tobytes()
    result = subprocess.run(command, input=raw, capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg could not resample: {result.stderr.decode(errors='replace').strip()[-300:]}")
    return np.ascontiguousarray(np.frombuffer(result.stdout, dtype=np.float32).reshape(-1, channels).T)


def fit_length(audio: np.ndarray, length: int) -> np.ndarray:
    """Trim or zero-pad the last axis of `audio` to exactly `length` samples."""
    if audio.shape[-1] >= length:
        return audio[..., :length]
    return np.pad(audio, [(0, 0)] * (audio.ndim - 1) + [(0, length - audio.shape[-1])])
