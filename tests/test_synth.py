"""`demucs-dist synth`: a MUSDB18 layout that musdb reads, exact mixtures, seeded bytes."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from demucs_dist import SAMPLERATE, SOURCES
from demucs_dist.data.songs import VALIDATION_FILE, choose_validation, open_tracks, read_song
from demucs_dist.data.synth import main, synthesize


def tree_digest(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_layout_is_read_by_musdb_with_its_validation_songs(synth_root):
    train = open_tracks(synth_root, is_wav=True, subset="train")
    test = open_tracks(synth_root, is_wav=True, subset="test")
    names = [t.name for t in train]
    assert len(names) == 6 and len(test) == 1
    assert (synth_root / VALIDATION_FILE).is_file()
    assert choose_validation(names, synth_root, "auto") == ["Synth Valid 000", "Synth Valid 001"]
    song = read_song(train[0])
    assert song.samplerate == SAMPLERATE and song.mix.shape == (2, 5 * SAMPLERATE)
    assert song.sources.shape == (len(SOURCES), 2, 5 * SAMPLERATE)
    import musdb

    track = musdb.DB(str(synth_root), is_wav=True, subsets="train", split="train").tracks[0]
    assert track.rate == SAMPLERATE and track.audio.shape == (5 * SAMPLERATE, 2)
    assert set(track.targets) >= set(SOURCES)


def test_mixture_is_the_exact_sum_of_the_sources_without_clipping(synth_root):
    for folder in (synth_root / "train").iterdir():
        mixture, _ = soundfile.read(folder / "mixture.wav", dtype="int16")
        stems = [soundfile.read(folder / f"{name}.wav", dtype="int16")[0].astype(np.int32) for name in SOURCES]
        assert np.array_equal(mixture.astype(np.int32), sum(stems))
        assert np.abs(mixture).max() < 32767 and all(np.abs(s).max() > 0 for s in stems)


def test_sources_sound_like_their_names(synth_root):
    """Bass lives below 400 Hz; drums carry the most energy above 4 kHz; every source has energy."""
    song = read_song(open_tracks(synth_root, is_wav=True)[0])
    spectra = np.abs(np.fft.rfft(song.sources.mean(1), axis=-1)) ** 2
    freqs = np.fft.rfftfreq(song.sources.shape[-1], 1 / SAMPLERATE)
    share_low = spectra[:, freqs < 400].sum(1) / spectra.sum(1)
    high = spectra[:, freqs > 4000].sum(1) / spectra.sum(1)
    bass, drums = SOURCES.index("bass"), SOURCES.index("drums")
    assert share_low[bass] > 0.9
    assert high.argmax() == drums


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    sizes = dict(train=1, valid=1, test=1, seconds=1.0)
    first = tree_digest(synthesize(tmp_path / "a", seed=3, **sizes))
    again = tree_digest(synthesize(tmp_path / "b", seed=3, **sizes))
    other = tree_digest(synthesize(tmp_path / "c", seed=4, **sizes))
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[k] != other[k] for k in first if k.endswith(".wav"))


def test_stems_format_is_read_by_musdb(tmp_path):
    root = synthesize(tmp_path / "stems", train=1, valid=1, test=0, seconds=2.0, fmt="stems")
    assert sorted(p.name for p in (root / "train").iterdir()) == [
        "Synth Train 000.stem.mp4",
        "Synth Valid 000.stem.mp4",
    ]
    tracks = open_tracks(root, is_wav=False)
    assert choose_validation([t.name for t in tracks], root) == ["Synth Valid 000"]
    song = read_song(tracks[0])
    assert song.sources.shape[:2] == (4, 2) and song.mix.shape[-1] >= 2 * SAMPLERATE
    # AAC is lossy and the mixture is encoded on its own: close to the sum, not equal.
    error = song.mix - song.sources.sum(0)
    assert np.sqrt((error**2).mean() / (song.mix**2).mean()) < 0.1


def test_cli_writes_a_dataset_and_explains_its_options(tmp_path, capsys):
    main(["--out", str(tmp_path / "d"), "--train", "1", "--valid", "0", "--test", "0", "--seconds", "0.5"])
    assert (tmp_path / "d" / "train" / "Synth Train 000" / "vocals.wav").is_file()
    assert not (tmp_path / "d" / VALIDATION_FILE).exists()
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--out", "--train", "--valid", "--test", "--seconds", "--format", "--seed"):
        assert flag in help_text
    result = subprocess.run([sys.executable, "-m", "demucs_dist.data.synth"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: --out is required")
