"""The torch scorer (demucs_dist.bss) against museval itself, frame by frame.

Every comparison calls museval on the same arrays in the test (never a stored copy of its output)
and asks for every window's SDR, ISR, SIR and SAR within 0.01 dB and the same windows NaN.
museval needs ~7 s for a song of 4 stereo sources whatever its length (a 4096 x 4096 solve per
source), and ~0.8 s for 2 (a 2048 system, solved twice). So the cases about a signal (silence, the
mixture, near-perfect estimates) use 2 sources; a real model's estimates and the real MUSDB clip
are scored at full size, and marked slow.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import stempeg
import torch
from helpers import tiny_model

from demucs_dist import SOURCES
from demucs_dist.apply import apply_model, normalize
from demucs_dist.bss import (
    SilentSourceError,
    _blockwise,
    _correlations,
    bss_eval_v4,
    fft_size,
    nanmedian,
    song_median_sdr,
    window_count,
)
from demucs_dist.errors import UserError
from demucs_dist.model import center_trim
from demucs_dist.scoring import METRICS, SongScores, frame_medians, score_song, score_song_torch

RATE = 44100
TOLERANCE_DB = 0.01
NOISE_FLOOR_DB = 120.0  # energy ratios of 1e12: beyond what float64 sums of audio resolve
NAMES = ("SDR", "ISR", "SIR", "SAR")  # museval.evaluate's order


def museval_scores(references: np.ndarray, estimates: np.ndarray, window: int, hop: int | None = None) -> dict:
    """museval.evaluate on (sources, channels, samples) arrays, as scoring.score_song calls it."""
    import museval

    refs = np.asarray(references, dtype=np.float64).transpose(0, 2, 1)
    ests = np.asarray(estimates, dtype=np.float64).transpose(0, 2, 1)
    return dict(zip(NAMES, museval.evaluate(refs, ests, win=window, hop=hop or window)))


def assert_matches_museval(
    references, estimates, window: int = RATE, hop: int | None = None, expected: dict | None = None
) -> dict:
    """Every window's four metrics within TOLERANCE_DB of museval's, the same windows NaN (and
    the same infinities). Returns museval's scores (or uses `expected`, museval's, if given).

    Ratios above NOISE_FLOOR_DB are float64 rounding noise, in museval and here alike (an
    estimate exactly in the span of the delayed references, such as the exact sum of the
    sources, has an infinite SAR in exact arithmetic): there both must be above the floor.
    """
    expected = expected or museval_scores(references, estimates, window, hop)
    got = bss_eval_v4(torch.as_tensor(references), torch.as_tensor(estimates), window, hop).numpy()
    for name in NAMES:
        a, b = got[name], expected[name]
        assert a.shape == b.shape, name
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{name}: NaN windows differ")
        np.testing.assert_array_equal(np.isinf(a), np.isinf(b), err_msg=f"{name}: infinite windows differ")
        meaningful = np.isfinite(b) & (b < NOISE_FLOOR_DB)
        worst = np.abs(a[meaningful] - b[meaningful]).max(initial=0.0)
        assert worst <= TOLERANCE_DB, f"{name}: off by {worst:.4g} dB"
        assert (a[np.isfinite(b) & ~meaningful] >= NOISE_FLOOR_DB).all(), f"{name}: museval's is beyond the floor"
    return expected


def stereo_noise(rng: np.random.Generator, sources: int, seconds: float, rate: int = RATE) -> np.ndarray:
    """Coloured noise (a random short filter per source and channel): (sources, 2, samples) float32."""
    samples = int(seconds * rate)
    white = rng.standard_normal((sources, 2, samples + 63))
    taps = rng.standard_normal((sources, 2, 64)) * np.exp(-np.arange(64) / rng.uniform(2, 20, (sources, 2, 1)))
    coloured = np.stack([[np.convolve(w, t, mode="valid") for w, t in zip(ws, ts)] for ws, ts in zip(white, taps)])
    return (0.1 * coloured / coloured.std()).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Quick checks (2 sources, or no museval solve at all)


def test_window_count_and_slices_are_museval_framing():
    from museval.metrics import Framing

    for samples in (1, 511, 44099, 44100, 44101, 88199, 88200, 88201, 150000):
        for window, hop in ((44100, 44100), (44100, 22050), (8000, 3000)):
            framer = Framing(window, hop, samples)
            assert window_count(samples, window, hop) == framer.nwin, (samples, window, hop)
            slices = list(framer)
            length = window if window < samples else samples
            assert all(s.stop - s.start == length for s in slices), "museval's windows all have one length"


def test_fft_size_is_the_smallest_7_smooth_number():
    def smooth(n: int) -> bool:
        for prime in (2, 3, 5, 7):
            while n % prime == 0:
                n //= prime
        return n == 1

    for n in list(range(1, 3000)) + [44611, 45122, 132300 + 1022]:
        size = fft_size(n)
        assert size >= n and smooth(size)
        assert not any(smooth(m) for m in range(n, size)), n


def direct_correlations(x: np.ndarray, y: np.ndarray, taps: int) -> np.ndarray:
    """r[p, q, taps - 1 + d] = sum_n x[p, n + d] y[q, n] for |d| < taps, by numpy."""
    # np.correlate(a, v, "valid")[k] = sum_n a[n + k] v[n]; a padded by taps - 1 for lags < 0.
    return np.array([[np.correlate(np.pad(xp, taps - 1), yq, mode="valid") for yq in y] for xp in x])


@pytest.mark.slow
def test_block_correlations_equal_direct_sums():
    """Lags -taps+1..taps-1 across many blocks and chunks, zero padding at both ends: the general
    overlap-save version and the one-FFT-per-block version with its boundary terms."""
    rng = np.random.default_rng(3)
    taps = 9
    for samples in (3, 40, 700, 40000):
        x, y = rng.standard_normal((3, samples)), rng.standard_normal((3, samples))
        expected = direct_correlations(x, np.concatenate([x, y]), taps)
        got = _correlations(torch.from_numpy(x), [torch.from_numpy(x), torch.from_numpy(y)], taps, 2)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-9 * samples)
        for block in (taps, 40, 1000):  # one block, a few, many; the last one partial or whole
            size = fft_size(block + taps - 1)
            got = _blockwise([torch.from_numpy(x), torch.from_numpy(y)], block, size, taps, blocks_per_chunk=3)
            np.testing.assert_allclose(got.numpy(), expected, atol=1e-9 * samples, err_msg=f"{samples}, {block}")


@pytest.fixture(scope="session")
def two_source_song():
    """2 stereo sources, 3.6 s (3 windows, the partial 4th dropped) with the silence cases:
    window 1: source 1 silent (zeros); window 2: estimate 0 with L = -R (silent by museval's sum);
    source 0's right channel is zero throughout (a zero block in the Gram matrix: eps matters)."""
    rng = np.random.default_rng(0)
    references = stereo_noise(rng, 2, 3.6)
    references[1, :, RATE : 2 * RATE] = 0
    references[0, 1] = 0
    estimates = (0.8 * references + 0.2 * references[::-1] + 0.05 * stereo_noise(rng, 2, 3.6)).astype(np.float32)
    estimates[0, 1, 2 * RATE : 3 * RATE] = -estimates[0, 0, 2 * RATE : 3 * RATE]
    return references, estimates


@pytest.fixture(scope="session")
def two_source_museval(two_source_song):
    return museval_scores(*two_source_song, RATE)


def test_two_sources_match_museval_frame_by_frame(two_source_song, two_source_museval):
    references, estimates = two_source_song
    expected = assert_matches_museval(references, estimates, expected=two_source_museval)
    assert expected["SDR"].shape == (2, 3)
    assert np.isnan(expected["SDR"][:, 1:]).all() and np.isfinite(expected["SDR"][:, 0]).all()


def test_overlapping_windows_and_mono_sources_match_museval():
    """museval's general framing (hop < window) and another channel count."""
    rng = np.random.default_rng(1)
    references = stereo_noise(rng, 2, 1.0, rate=16000)[:, :1].copy()
    estimates = (references + 0.3 * stereo_noise(rng, 2, 1.0, rate=16000)[:, :1]).astype(np.float32)
    expected = assert_matches_museval(references, estimates, window=4000, hop=1500)
    assert expected["SDR"].shape == (2, 9)


def test_stereo_song_shorter_than_one_window():
    """museval scores the whole song as one window (its framing, whatever the source count)."""
    rng = np.random.default_rng(7)
    references = stereo_noise(rng, 2, 0.4)
    estimates = (references + 0.5 * stereo_noise(rng, 2, 0.4)).astype(np.float32)
    expected = assert_matches_museval(references, estimates)
    assert expected["SDR"].shape == (2, 1)


def test_song_median_sdr_is_museval_frame_median(two_source_song, two_source_museval):
    references, estimates = two_source_song
    got = song_median_sdr(torch.from_numpy(references), torch.from_numpy(estimates), RATE)
    assert got.dtype == torch.float64 and got.shape == (2,)
    np.testing.assert_allclose(got.numpy(), np.nanmedian(two_source_museval["SDR"], axis=1), atol=TOLERANCE_DB)


def test_whole_song_silence_is_refused_as_museval_does():
    import museval

    rng = np.random.default_rng(2)
    references = stereo_noise(rng, 2, 0.5)
    estimates = references.copy()
    estimates[1, 1] = -estimates[1, 0]  # L = -R throughout: silent by museval's rule
    with pytest.raises(ValueError, match="silent"):
        museval.evaluate(references.transpose(0, 2, 1), estimates.transpose(0, 2, 1))
    with pytest.raises(SilentSourceError, match="estimate source is silent"):
        bss_eval_v4(references, estimates)
    assert issubclass(SilentSourceError, UserError)  # one line on the command line
    # Validation must not stop training for it: NaN for every source.
    assert song_median_sdr(torch.from_numpy(references), torch.from_numpy(estimates), RATE).isnan().all()


def test_bad_shapes_are_user_errors():
    with pytest.raises(UserError, match="sources, channels, samples"):
        bss_eval_v4(np.ones((2, 2, 100)), np.ones((2, 2, 99)))
    with pytest.raises(UserError, match="sources, channels, samples"):
        bss_eval_v4(np.ones((2, 100)), np.ones((2, 100)))
    with pytest.raises(UserError, match="nothing to score"):
        bss_eval_v4(np.ones((2, 2, 0)), np.ones((2, 2, 0)))


def test_nanmedian_is_numpys():
    rng = np.random.default_rng(4)
    values = rng.standard_normal((6, 9))
    values[0, :4] = np.nan  # odd count left
    values[1, :3] = np.nan  # even count left: numpy averages the two middle values
    values[2] = np.nan
    values[3, 2] = np.inf
    with pytest.warns(RuntimeWarning):
        expected = np.nanmedian(values, axis=1)
    np.testing.assert_array_equal(nanmedian(torch.from_numpy(values)).numpy(), expected)


def test_song_scores_json_is_museval_trackstores_byte_for_byte():
    """The per-song json both scorers write (SongScores, built without importing museval) against
    museval.TrackStore's, for values that round up and down near the 5th decimal, NaN, infinities,
    -0 and large values."""
    import museval

    rng = np.random.default_rng(8)
    scores = {metric: rng.normal(0, 30, (len(SOURCES), 7)) for metric in NAMES}
    scores["SDR"][0, :6] = [np.nan, np.inf, -np.inf, 0.000005, 0.000015, -2.5e-6]
    scores["SAR"][1, :3] = [176.123456789, 1e12, -0.0]
    store = museval.TrackStore(track_name="song", win=1.0, hop=1.0)
    for i, source in enumerate(SOURCES):
        store.add_target(target_name=source, values={metric: scores[metric][i].tolist() for metric in NAMES})
    assert SongScores(scores).json == store.json


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_gives_the_cpu_numbers(two_source_song):
    references, estimates = two_source_song
    cpu = bss_eval_v4(references, estimates).numpy()
    cuda = bss_eval_v4(torch.from_numpy(references).cuda(), torch.from_numpy(estimates).cuda())
    assert cuda.sdr.device.type == "cuda"
    for name, values in cuda.numpy().items():
        np.testing.assert_allclose(values, cpu[name], atol=1e-6, equal_nan=True)


@pytest.fixture(scope="session")
def synth_song():
    """A 3 s synthetic song (its drums and vocals start late: silent first windows)."""
    from demucs_dist.data.synth import synth_song as make

    sources = make(0, 2, 0, 3.0).astype(np.float32) / 32768
    return sources, sources.sum(axis=0)


@pytest.fixture(scope="session")
def two_source_synth_song(synth_song):
    """The synthetic song's drums and vocals (both start late: silent first windows), and their sum."""
    sources = synth_song[0][[SOURCES.index("drums"), SOURCES.index("vocals")]]
    return sources, sources.sum(axis=0)


def test_mixture_as_every_estimate(two_source_synth_song):
    sources, mix = two_source_synth_song
    expected = assert_matches_museval(sources, np.broadcast_to(mix, sources.shape).copy())
    assert (expected["SIR"][np.isfinite(expected["SIR"])] < 10).all()
    # The mixture is the exact sum of the sources: SAR is infinite in exact arithmetic, and both
    # scorers report their rounding noise there (museval ~176 dB, bss.py ~198 dB).
    assert (expected["SAR"][np.isfinite(expected["SAR"])] > NOISE_FLOOR_DB).all()
    assert np.isnan(expected["SDR"][:, 0]).all()


def test_references_plus_small_noise(two_source_synth_song):
    sources, _ = two_source_synth_song
    noise = np.random.default_rng(5).standard_normal(sources.shape).astype(np.float32)
    expected = assert_matches_museval(sources, sources + 1e-3 * noise)
    assert np.nanmin(expected["SDR"]) > 25  # high ratios: the differences are small signals


def test_silent_source_in_some_windows():
    """Source 0 silent in window 1, source 1 with L = -R in window 3, an estimate silent in window
    4 for a few samples short of the whole window (not silent), the last partial window dropped."""
    rng = np.random.default_rng(6)
    references = stereo_noise(rng, 2, 5.5)
    references[0, :, RATE : 2 * RATE] = 0
    references[1, 1, 3 * RATE : 4 * RATE] = -references[1, 0, 3 * RATE : 4 * RATE]
    estimates = (references + 0.3 * stereo_noise(rng, 2, 5.5)).astype(np.float32)
    estimates[1, :, 4 * RATE : 5 * RATE - 3] = 0
    expected = assert_matches_museval(references, estimates)
    assert expected["SDR"].shape == (2, 5)
    assert [bool(np.isnan(expected["SDR"][:, t]).all()) for t in range(5)] == [False, True, False, True, False]


# ---------------------------------------------------------------------------------------------
# The cases that matter, at full size: 4 stereo sources, museval's 4096 x 4096 systems


def tiny_trained_model_estimates(sources: np.ndarray, mix: np.ndarray, steps: int = 8) -> np.ndarray:
    """Estimates of a tiny Demucs (channels 4, depth 3) trained for `steps` Adam steps on 1 s crops
    of this very song, then run over the whole song as `evaluate` runs it."""
    torch.manual_seed(0)
    model = tiny_model()
    normalized, mean, std = normalize(torch.from_numpy(mix))
    targets = (torch.from_numpy(sources) - mean) / std
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    crop = RATE
    padded = model.valid_length(crop)
    for step in range(steps):
        start = (step * 7919) % (mix.shape[-1] - crop)
        piece = normalized[:, start : start + crop]
        piece = torch.nn.functional.pad(piece, ((padded - crop) // 2, padded - crop - (padded - crop) // 2))
        loss = (center_trim(model(piece[None]), crop)[0] - targets[..., start : start + crop]).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        estimates = apply_model(model.eval(), normalized, shifts=1, seed=0)
    return (estimates * std + mean).numpy()


@pytest.mark.slow
def test_synthetic_song_with_a_tiny_trained_models_estimates(synth_song):
    sources, mix = synth_song
    estimates = tiny_trained_model_estimates(sources, mix)
    expected = assert_matches_museval(sources, estimates)
    assert np.isfinite(expected["SDR"][:, -1]).all() and np.isnan(expected["SDR"][:, 0]).all()
    # The validation score: museval's per-song frame median, for every source.
    got = song_median_sdr(torch.from_numpy(sources), torch.from_numpy(estimates), RATE).numpy()
    np.testing.assert_allclose(got, np.nanmedian(expected["SDR"], axis=1), atol=TOLERANCE_DB)


@pytest.fixture(scope="session")
def musdb_clip():
    """The real MUSDB18 clip that ships with stempeg (6 s, AAC: band-limited, so its Gram matrix
    is ill-conditioned), decoded by musdb through this project's reader."""
    from demucs_dist.data.songs import open_tracks, read_song

    with tempfile.TemporaryDirectory() as root:
        clip = Path(stempeg.example_stem_path())
        (Path(root) / "test").mkdir()
        (Path(root) / "test" / clip.name).symlink_to(clip)
        return read_song(open_tracks(root, is_wav=False, subset="test")[0])


@pytest.mark.slow
def test_real_musdb_clip_scored_by_both_scorers(musdb_clip):
    """score_song_torch's SongScores (what `evaluate --scorer torch` writes) against score_song's
    (museval) on the real clip: the same document, every frame value within the tolerance (both
    rounded to 1e-5 dB, so this is bss.py against museval on an ill-conditioned song)."""
    song = musdb_clip
    estimates = (0.7 * song.sources + 0.3 * song.mix[None]).astype(np.float32)
    a = json.loads(score_song_torch(song.sources, estimates, song.samplerate)[0].json)
    b = json.loads(score_song(song.sources, estimates, song.samplerate)[0].json)
    assert a.keys() == b.keys() and [t["name"] for t in a["targets"]] == [t["name"] for t in b["targets"]] == list(
        SOURCES
    )
    for ta, tb in zip(a["targets"], b["targets"]):
        assert [(f["time"], f["duration"]) for f in ta["frames"]] == [(f["time"], f["duration"]) for f in tb["frames"]]
        assert len(tb["frames"]) == 6
        for fa, fb in zip(ta["frames"], tb["frames"]):
            assert fa["metrics"].keys() == fb["metrics"].keys() == set(METRICS)
            for metric in METRICS:
                assert np.isfinite(fb["metrics"][metric])
                assert fa["metrics"][metric] == pytest.approx(fb["metrics"][metric], abs=TOLERANCE_DB)
    medians_a, medians_b = frame_medians(a), frame_medians(b)
    for source in SOURCES:
        for metric in METRICS:
            assert medians_a[source][metric] == pytest.approx(medians_b[source][metric], abs=TOLERANCE_DB)
