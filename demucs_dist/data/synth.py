"""`demucs-dist synth`: a synthetic dataset in the MUSDB18 layout, for dry runs and tests.

Every song is a short piece of music whose four sources sound like their names, so a model can
learn to separate them:

- drums: a kick (pitched sine sweep), a snare (noise burst + tone) and a hi-hat (high-passed
  noise) playing a 16-step pattern;
- bass: low harmonic notes (fundamental below 200 Hz) following the chord progression;
- other: the chords, as a sustained pad and/or a plucked arpeggio in the middle range;
- vocals: a sung melody (200-800 Hz fundamental) with glides, vibrato and vowel formants.

Tempo, key, mode, progression, patterns, timbres, panning and levels are drawn per song from
`(seed, subset, index)`, so a seeded run repeats byte for byte and songs do not depend on how
many others are generated. Sources are written as 16-bit PCM and the mixture is their exact sum
(in integers), so nothing clips and mixture == sum of the sources.

Layout written (what `musdb.DB` reads):
    --format wav:   <out>/{train,test}/<song>/{mixture,drums,bass,other,vocals}.wav  (use --is-wav)
    --format stems: <out>/{train,test}/<song>.stem.mp4  (AAC; streams mixture, drums, bass, other, vocals)
Validation songs live in train/ (as in MUSDB18) and are listed in <out>/validation_tracks.txt,
which `demucs-dist shard` picks up by default.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import soundfile

from .. import SAMPLERATE, SOURCES
from ..config import option, parse
from ..errors import UserError, run_main
from ..files import atomic_path
from ..progress import progress_bar
from .songs import VALIDATION_FILE

SR = SAMPLERATE
FORMATS = ("wav", "stems")
MAJOR = np.array([0, 2, 4, 5, 7, 9, 11])
MINOR = np.array([0, 2, 3, 5, 7, 8, 10])
PROGRESSIONS = ([0, 5, 3, 4], [0, 3, 4, 0], [5, 3, 0, 4], [0, 4, 5, 3], [0, 3, 0, 4], [5, 4, 3, 4])
# Formants (Hz) of the vowels a, e, i, o, u; a singer's "voice size" scales them per song.
VOWELS = np.array([[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010], [570, 840, 2410], [300, 870, 2240]])
FORMANT_GAINS = np.array([1.0, 0.5, 0.25])
FORMANT_WIDTHS = np.array([90.0, 110.0, 160.0])


@dataclasses.dataclass
class SynthConfig:
    """Synthetic MUSDB18-format dataset"""

    out: str = option("", "output folder (the MUSDB root to create)")
    train: int = option(8, "training songs (written to train/)", minimum=0)
    valid: int = option(2, "validation songs (written to train/ and listed in validation_tracks.txt)", minimum=0)
    test: int = option(2, "test songs (written to test/)", minimum=0)
    seconds: float = option(30.0, "length of every song in seconds", minimum=0.1)
    format: str = option("wav", "wav: the MUSDB18-HQ wav layout; stems: .stem.mp4 files (AAC)", choices=FORMATS)
    seed: int = option(0, "random seed; the same seed writes the same bytes")


def midi_hz(pitch: np.ndarray | float) -> np.ndarray:
    return 440.0 * 2.0 ** ((np.asarray(pitch, dtype=np.float64) - 69) / 12)


def moving_average(x: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average of a 1-D signal (a cheap smoother for pitch glides and fades)."""
    if width <= 1:
        return x
    padded = np.concatenate([np.full(width // 2, x[0]), x, np.full(width - width // 2, x[-1])])
    sums = np.cumsum(np.concatenate([[0.0], padded]))
    return (sums[width:] - sums[:-width])[: len(x)] / width


def pan_gains(pan: float) -> np.ndarray:
    """Constant-power (left, right) gains for a pan position in [-1, 1]."""
    angle = (pan + 1) * np.pi / 4
    return np.array([np.cos(angle), np.sin(angle)]) * np.sqrt(2)


class Score:
    """Timing and harmony shared by the four parts of one song."""

    def __init__(self, rng: np.random.Generator, length: int):
        self.length = length
        self.bpm = rng.uniform(80, 150)
        self.step = int(round(SR * 60 / self.bpm / 4))  # one 16th note, in samples
        self.bar = 16 * self.step
        self.scale = MAJOR if rng.random() < 0.5 else MINOR
        self.tonic = int(rng.integers(0, 12))  # pitch class of the key
        self.progression = PROGRESSIONS[rng.integers(len(PROGRESSIONS))]
        self.bars = -(-length // self.bar)

    def chord_degree(self, bar: int) -> int:
        return self.progression[bar % len(self.progression)]

    def pitch(self, degree: int, octave_base: int) -> int:
        """MIDI pitch of a scale degree (may exceed 7: next octaves) above the C of `octave_base`."""
        return octave_base + self.tonic + 12 * (degree // 7) + int(self.scale[degree % 7])

    def bar_mask(self, rng: np.random.Generator, keep: float) -> np.ndarray:
        """Per-sample 0/1 gate that silences whole bars with probability 1 - keep, with short fades."""
        bars = (rng.random(self.bars) < keep).astype(np.float64)
        mask = np.repeat(bars, self.bar)[: self.length]
        return moving_average(mask, int(0.01 * SR))


def note_index(length: int, starts: Sequence[int], ends: Sequence[int]) -> np.ndarray:
    """Per-sample index of the sounding note, -1 in rests."""
    index = np.full(length, -1)
    for i, (start, end) in enumerate(zip(starts, ends)):
        index[max(0, start) : min(length, end)] = i
    return index


def render_notes(
    length: int, starts: Sequence[int], ends: Sequence[int], pitches: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample (frequency, time since note start, samples until note end, active) of a monophonic
    line of non-overlapping notes. Frequency holds its last value through rests (phase continuity)."""
    if not len(starts):  # a song too short for this part: silence
        return np.full(length, 100.0), np.zeros(length), np.zeros(length), np.zeros(length, dtype=bool)
    index = note_index(length, starts, ends)
    active = index >= 0
    filled = np.maximum.accumulate(np.where(active, index, 0))  # rests keep the previous note
    frequency = midi_hz(np.asarray(pitches, dtype=np.float64))[filled]
    t = np.arange(length)
    since = (t - np.asarray(starts)[filled]) / SR
    until = (np.asarray(ends)[filled] - t) / SR
    return frequency, since, until, active


def envelope(since: np.ndarray, until: np.ndarray, active: np.ndarray, attack: float, decay: float, release: float):
    """Attack-decay envelope cut by a release ramp before the note ends; 0 between notes."""
    env = np.minimum(1.0, since / attack) * np.exp(-since / decay) * np.clip(until / release, 0.0, 1.0)
    return np.where(active, env, 0.0)


def partials(phase: np.ndarray, count: int) -> Iterator[np.ndarray]:
    """sin(k * phase) for k = 1..count, by the recurrence sin(kx) = 2 cos(x) sin((k-1)x) - sin((k-2)x)
    (two multiplications per sample instead of a sine: additive synthesis stays fast)."""
    twice_cos = 2 * np.cos(phase)
    previous, current = np.zeros_like(phase), np.sin(phase)
    for _ in range(count):
        yield current
        previous, current = current, twice_cos * current - previous


def harmonics(phase: np.ndarray, amplitudes: Sequence[float]) -> np.ndarray:
    """Sum of sin(k * phase) weighted by `amplitudes[k - 1]` (additive synthesis)."""
    out = np.zeros_like(phase)
    for amplitude, partial in zip(amplitudes, partials(phase, len(amplitudes))):
        out += amplitude * partial
    return out


def phase_of(frequency: np.ndarray) -> np.ndarray:
    return 2 * np.pi * np.cumsum(frequency) / SR


def drums(score: Score, rng: np.random.Generator) -> np.ndarray:
    length = score.length
    t = np.arange(int(0.5 * SR)) / SR
    kick_hz = rng.uniform(45, 60) + rng.uniform(60, 130) * np.exp(-t / rng.uniform(0.02, 0.05))
    kick = np.sin(phase_of(kick_hz)) * np.exp(-t / rng.uniform(0.08, 0.2))
    kick[: int(0.002 * SR)] += rng.uniform(0.2, 0.5)  # beater click
    noise = rng.standard_normal(len(t))
    snare_noise = np.diff(noise, prepend=0.0) * 0.5  # first difference: a brighter noise
    snare = snare_noise * np.exp(-t / rng.uniform(0.06, 0.15)) + 0.6 * np.sin(
        2 * np.pi * rng.uniform(170, 240) * t
    ) * np.exp(-t / 0.04)
    hat_noise = np.diff(rng.standard_normal(len(t)), prepend=0.0) * 0.5  # tilted up: bright, not piercing
    hat = hat_noise * np.exp(-t / rng.uniform(0.015, 0.05))
    open_hat = hat_noise * np.exp(-t / rng.uniform(0.12, 0.25))

    kick_steps = [[0, 8], [0, 10], [0, 6, 8], [0, 3, 8, 11], [0, 7, 10]][rng.integers(5)]
    hat_every = 2 if rng.random() < 0.6 else 1
    hits: list[tuple[int, np.ndarray, float, float]] = []  # (sample, one-shot, velocity, pan)
    hat_pan = rng.uniform(-0.6, 0.6)
    for bar in range(score.bars):
        base = bar * score.bar
        for step in range(16):
            at = base + step * score.step
            if step in kick_steps or (rng.random() < 0.05):
                hits.append((at, kick, rng.uniform(0.8, 1.0), 0.0))
            if step in (4, 12):
                hits.append((at, snare, rng.uniform(0.75, 1.0), 0.1))
            elif rng.random() < 0.04:
                hits.append((at, snare, rng.uniform(0.15, 0.3), 0.1))  # ghost note
            if step % hat_every == 0:
                one_shot = open_hat if step == 14 and rng.random() < 0.3 else hat
                hits.append((at, one_shot, rng.uniform(0.4, 0.8) * (1.2 if step % 4 == 0 else 1.0), hat_pan))
    out = np.zeros((2, length))
    for at, one_shot, velocity, pan in hits:
        if at >= length:
            continue
        size = min(len(one_shot), length - at)
        out[:, at : at + size] += (velocity * pan_gains(pan))[:, None] * one_shot[:size]
    return out * score.bar_mask(rng, keep=0.95)


def bass(score: Score, rng: np.random.Generator) -> np.ndarray:
    octave_base = 24 if score.tonic >= 6 else 36  # keeps the roots around 41-82 Hz
    pattern = [[0, 0, 0, 0], [0, 7, 0, 7], [0, 0, 7, 4], [0, 4, 7, 4]][rng.integers(4)]  # scale steps
    note_steps = 4 if rng.random() < 0.5 else 2  # quarters or eighths
    starts, ends, pitches = [], [], []
    for bar in range(score.bars):
        root = score.chord_degree(bar)
        for i, step in enumerate(range(0, 16, note_steps)):
            start = bar * score.bar + step * score.step
            offset = pattern[i % len(pattern)]  # 0: root, 7: its octave, 4: the chord's fifth
            pitch = score.pitch(root + (4 if offset == 4 else 0), octave_base) + (12 if offset == 7 else 0)
            pitch -= 12 if pitch > 55 else 0  # fundamentals stay below 200 Hz
            starts.append(start)
            ends.append(start + int(note_steps * score.step * rng.uniform(0.6, 0.95)))
            pitches.append(pitch)
    frequency, since, until, active = render_notes(score.length, starts, ends, pitches)
    brightness = rng.uniform(1.2, 2.2)  # harmonic roll-off exponent: round or buzzy
    tone = harmonics(phase_of(frequency), [k**-brightness for k in range(1, 7)])
    env = envelope(since, until, active, 0.005, rng.uniform(0.3, 1.0), 0.02)
    return pan_gains(rng.uniform(-0.1, 0.1))[:, None] * (tone * env) * score.bar_mask(rng, keep=0.9)


def other(score: Score, rng: np.random.Generator) -> np.ndarray:
    length = score.length
    out = np.zeros((2, length))
    style = rng.integers(3)  # 0: pad, 1: arpeggio, 2: both
    if style in (0, 2):  # sustained chords, one voice per chord tone
        roll_off = rng.uniform(1.5, 2.5)
        for voice in range(3):
            starts = [bar * score.bar for bar in range(score.bars)]
            ends = [start + score.bar - int(0.02 * SR) for start in starts]
            pitches = [score.pitch(score.chord_degree(bar) + 2 * voice, 48) for bar in range(score.bars)]
            frequency, since, until, active = render_notes(length, starts, ends, pitches)
            detune = 1 + rng.uniform(-0.003, 0.003)
            tone = harmonics(phase_of(frequency * detune), [k**-roll_off for k in range(1, 9)])
            env = envelope(since, until, active, rng.uniform(0.05, 0.2), 4.0, 0.05)
            out += pan_gains(rng.uniform(-0.7, 0.7))[:, None] * (0.5 * tone * env)
    if style in (1, 2):  # plucked arpeggio cycling through the chord tones
        every = 2 if rng.random() < 0.6 else 1
        order = [[0, 2, 4, 2], [0, 2, 4, 7], [4, 2, 0, 2]][rng.integers(3)]
        starts, ends, pitches = [], [], []
        for bar in range(score.bars):
            for i, step in enumerate(range(0, 16, every)):
                start = bar * score.bar + step * score.step
                starts.append(start)
                ends.append(start + every * score.step)
                pitches.append(score.pitch(score.chord_degree(bar) + order[i % 4], 48))
        frequency, since, until, active = render_notes(length, starts, ends, pitches)
        roll_off = rng.uniform(1.0, 1.8)
        tone = harmonics(phase_of(frequency), [k**-roll_off for k in range(1, 11)])
        env = envelope(since, until, active, 0.002, rng.uniform(0.08, 0.25), 0.005)
        out += pan_gains(rng.uniform(-0.5, 0.5))[:, None] * (tone * env)
    return out * score.bar_mask(rng, keep=0.9)


def vocals(score: Score, rng: np.random.Generator) -> np.ndarray:
    length = score.length
    octave_base = 48 if score.tonic >= 7 else 60  # tonic at 196-370 Hz, melody up an octave above
    starts, ends, pitches, vowels = [], [], [], []
    position = int(rng.integers(0, 8)) * score.step
    degree = int(rng.integers(0, 7))
    while position < length:
        phrase_end = position + 2 * score.bar
        while position < min(phrase_end, length):
            duration = int(rng.choice([2, 4, 4, 6, 8])) * score.step
            bar = position // score.bar
            # Mostly chord tones, moving by small steps: sounds like a tune, not noise.
            if rng.random() < 0.6:
                chord = score.chord_degree(bar)
                degree = min((chord + c for c in (0, 2, 4, 7)), key=lambda d: abs(d - degree))
            else:
                degree += int(rng.choice([-2, -1, 1, 2]))
            degree = int(np.clip(degree, 0, 7))
            starts.append(position)
            ends.append(position + duration - int(0.03 * SR))
            pitches.append(score.pitch(degree, octave_base))
            vowels.append(int(rng.integers(len(VOWELS))))
            position += duration
        position += int(rng.choice([4, 8, 12])) * score.step  # breath between phrases
    if not starts:  # the song ends before the singer starts
        return np.zeros((2, length))
    frequency, since, until, active = render_notes(length, starts, ends, pitches)

    # Glide between notes, then vibrato that grows after each note's onset.
    log_f0 = moving_average(np.log(frequency), int(0.04 * SR))
    rate, depth = rng.uniform(4.5, 6.5), rng.uniform(0.2, 0.6)  # Hz, semitones
    vibrato = depth / 12 * np.log(2) * np.minimum(1.0, since / 0.3) * np.sin(2 * np.pi * rate * np.arange(length) / SR)
    f0 = np.exp(log_f0 + vibrato)
    phase = phase_of(f0)

    # Formant filtering, evaluated at a control rate and interpolated: harmonic k of a note sung
    # on a vowel gets the vowel's resonance gain at k * f0.
    hop = 64
    control = np.arange(0, length, hop)
    voice_size = rng.uniform(1.0, 1.2)
    vowel_index = np.asarray(vowels)[np.maximum.accumulate(np.where(active, note_index(length, starts, ends), 0))]
    formants = VOWELS[vowel_index[control]] * voice_size  # (controls, 3)
    formants = np.stack([moving_average(formants[:, j], 8) for j in range(3)], axis=1)
    tilt = rng.uniform(0.5, 1.0)
    count = int(min(24, 7000 / f0.max()))
    tone = np.zeros(length)
    samples = np.arange(length)
    for k, partial in enumerate(partials(phase, count), start=1):
        partial_hz = k * f0[control][:, None]
        gain = (FORMANT_GAINS / (1 + ((partial_hz - formants) / FORMANT_WIDTHS) ** 2)).sum(1) + 0.02
        tone += np.interp(samples, control, gain * k**-tilt) * partial
    breath = 0.02 * np.diff(rng.standard_normal(length), prepend=0.0)
    env = envelope(since, until, active, 0.04, 3.0, 0.06)
    voice = (tone + breath) * env
    return pan_gains(rng.uniform(-0.15, 0.15))[:, None] * voice * score.bar_mask(rng, keep=0.95)


def synth_song(seed: int, subset: int, index: int, seconds: float) -> np.ndarray:
    """One song's sources as int16 (len(SOURCES), 2, samples), each drawn from its own generator."""
    length = int(round(seconds * SR))
    if length < SR // 10:
        raise UserError(f"--seconds {seconds}: songs must last at least 0.1 s")
    rng = np.random.default_rng([seed, subset, index])
    score = Score(rng, length)
    parts = {"drums": drums, "bass": bass, "other": other, "vocals": vocals}
    streams = []
    for name in SOURCES:
        audio = parts[name](score, np.random.default_rng([seed, subset, index, SOURCES.index(name) + 1]))
        rms = np.sqrt(np.mean(audio**2)) or 1.0
        streams.append(audio / rms * 10 ** (rng.uniform(-9, 0) / 20))  # levels vary per song
    sources = np.stack(streams)
    # Scale so that neither the mixture nor any source exceeds the chosen peak (< 1: no clipping).
    peak = max(np.abs(sources.sum(0)).max(), np.abs(sources).max())
    sources *= rng.uniform(0.5, 0.9) / peak
    return np.round(sources * 32768).astype(np.int16)


def song_name(subset: str, index: int) -> str:
    return f"Synth {subset.capitalize()} {index:03d}"


def write_song(root: Path, subset: str, name: str, sources: np.ndarray, fmt: str) -> None:
    """Write one song (int16 sources) in the MUSDB18 layout; the mixture is the integer sum."""
    mixture = sources.astype(np.int32).sum(0).astype(np.int16)  # fits: the float peak was < 1
    if fmt == "wav":
        folder = root / subset / name
        for stem, audio in [("mixture", mixture)] + list(zip(SOURCES, sources)):
            with atomic_path(folder / f"{stem}.wav") as tmp:
                soundfile.write(tmp, audio.T, SR, subtype="PCM_16", format="WAV")
        return
    import stempeg  # imported late: it checks for ffmpeg at import time

    path = root / subset / f"{name}.stem.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name}.tmp{os.getpid()}.stem.mp4")  # the container comes from the suffix
    stems = np.concatenate([mixture[None], sources]).transpose(0, 2, 1).astype(np.float64) / 32768
    try:
        writer = stempeg.StreamsWriter(codec="aac", bitrate=256000, stem_names=["mixture", *SOURCES])
        stempeg.write_stems(str(tmp), stems, sample_rate=SR, writer=writer)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def synthesize(
    out: str | os.PathLike, train: int, valid: int, test: int, seconds: float, fmt: str = "wav", seed: int = 0
) -> Path:
    """Write a synthetic MUSDB18-format dataset under `out` and return its root.

    train + valid songs go to train/ (validation songs listed in validation_tracks.txt), test
    songs to test/. fmt: 'wav' (MUSDB18-HQ layout, read with is_wav=True) or 'stems' (.stem.mp4).
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if min(train, valid, test) < 0 or train + valid + test == 0:
        raise UserError("--train, --valid and --test must be >= 0 and not all 0")
    if fmt == "stems":
        from ..audio import require_ffmpeg

        require_ffmpeg()
    root = Path(out)
    jobs = [("train", 0, i, song_name("train", i)) for i in range(train)]
    jobs += [("train", 1, i, song_name("valid", i)) for i in range(valid)]
    jobs += [("test", 2, i, song_name("test", i)) for i in range(test)]
    bar = progress_bar(len(jobs), "synth", "songs", disable=len(jobs) < 4)
    for folder, subset_id, index, name in jobs:
        write_song(root, folder, name, synth_song(seed, subset_id, index, seconds), fmt)
        bar.update(1)
    bar.close()
    if valid:
        with atomic_path(root / VALIDATION_FILE) as tmp:
            tmp.write_text("".join(song_name("valid", i) + "\n" for i in range(valid)))
    return root


def main(argv: Sequence[str] | None = None) -> None:
    (cfg,) = parse(argv, "demucs-dist synth", __doc__.split("\n\n")[0], SynthConfig)
    if not cfg.out:
        raise UserError("--out is required: the folder to write the dataset to")
    root = synthesize(cfg.out, cfg.train, cfg.valid, cfg.test, cfg.seconds, cfg.format, cfg.seed)
    flag = " --is-wav" if cfg.format == "wav" else ""
    print(f"wrote {cfg.train + cfg.valid + cfg.test} songs to {root}; next: demucs-dist shard --musdb {root}{flag}")


if __name__ == "__main__":
    sys.exit(run_main(main))
