"""`demucs-dist score`: other systems' estimates in museval's layout, against a real MUSDB folder.

The estimates folder is written the way other systems write theirs: float and 16-bit wav files,
a mono file, files shorter and longer than the song (museval pads and cuts them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from demucs_dist import SOURCES
from demucs_dist.bss import bss_eval_v4
from demucs_dist.data.songs import open_tracks, read_song
from demucs_dist.data.synth import synthesize
from demucs_dist.errors import UserError
from demucs_dist.score import main
from demucs_dist.scoring import METRICS, read_events, read_song_json

SONGS = ["Synth Test 000", "Synth Test 001"]
SHORTER, LONGER = 1000, 700  # samples


@pytest.fixture(scope="session")
def musdb_root(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("musdb"), train=0, valid=0, test=len(SONGS), seconds=2.5)


@pytest.fixture(scope="session")
def estimates_root(musdb_root, tmp_path_factory) -> tuple[Path, dict]:
    """<root>/test/<song>/<source>.wav. Song 0: float stereo files LONGER samples too long. Song 1:
    16-bit files SHORTER samples too short, vocals in mono. Returns (root, {song: raw (sources,
    samples, channels) float64 arrays as read back, what museval.evaluate is given})."""
    root = tmp_path_factory.mktemp("estimates") / "other system"
    rng = np.random.default_rng(0)
    raw = {}
    for track in open_tracks(musdb_root, is_wav=True, subset="test"):
        song = read_song(track)
        estimates = 0.8 * song.sources + 0.2 * song.mix[None]
        estimates += 0.01 * rng.standard_normal(estimates.shape).astype(np.float32)
        folder = root / "test" / song.name
        folder.mkdir(parents=True)
        stems = []
        for source, stem in zip(SOURCES, estimates):
            if song.name == SONGS[0]:
                stem = np.concatenate([stem, stem[:, :LONGER]], axis=1)
                soundfile.write(folder / f"{source}.wav", stem.T, 44100, subtype="FLOAT")
            else:
                stem = stem[:, :-SHORTER]
                if source == "vocals":
                    stem = stem.mean(axis=0, keepdims=True)
                soundfile.write(folder / f"{source}.wav", stem.T, 44100, subtype="PCM_16")
            audio, _ = soundfile.read(folder / f"{source}.wav", always_2d=True)
            stems.append(np.broadcast_to(audio, (audio.shape[0], 2)))
        raw[song.name] = np.stack(stems)
    return root, raw


def score_args(musdb_root, estimates, out, *more):
    return ["--estimates", str(estimates), "--musdb", str(musdb_root), "--is-wav", "--out", str(out),
            "--no-progress", *map(str, more)]  # fmt: skip


def frames(document: dict) -> np.ndarray:
    """(sources, metrics, windows) of a song's museval json."""
    return np.array([[[f["metrics"][m] for f in t["frames"]] for m in METRICS] for t in document["targets"]])


@pytest.fixture(scope="session")
def torch_run(musdb_root, estimates_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("scored") / "torch"
    main(score_args(musdb_root, estimates_root[0], out, "--device", "cpu"))
    return out


@pytest.mark.slow
def test_scores_every_song_into_evaluates_store(torch_run, musdb_root, estimates_root, capsys):
    import museval

    out = torch_run
    assert sorted(p.stem for p in (out / "test").glob("*.json")) == SONGS
    results = json.loads((out / "results.json").read_text())
    assert results["label"] == "other system" and results["scorer"] == "torch"
    assert results["this_run"] == {**results["this_run"], "scored": 2, "skipped": 0}
    # museval's own reader and aggregation of the store give the table's numbers.
    store = museval.EvalStore(frames_agg="median", tracks_agg="median")
    store.add_eval_dir(out)
    expected = store.agg_frames_tracks_scores().unstack()
    for source in SOURCES:
        for metric in METRICS:
            assert results["scores"][source][metric] == pytest.approx(expected.loc[source, metric], abs=1e-9)
    assert (out / "results.md").read_text().startswith("| other system (2 songs) | All |")
    # Each song's frames: bss_eval v4 of the references and the padded / cut / mono estimates.
    for track in open_tracks(musdb_root, is_wav=True, subset="test"):
        song = read_song(track)
        raw = estimates_root[1][song.name].transpose(0, 2, 1)
        seen = np.zeros_like(song.sources, dtype=np.float64)
        length = min(raw.shape[-1], seen.shape[-1])
        seen[..., :length] = raw[..., :length]
        scores = bss_eval_v4(song.sources, seen).numpy()
        document = read_song_json(out / "test" / f"{song.name}.json")
        expected_frames = np.stack([[scores[m][i] for m in METRICS] for i in range(len(SOURCES))])
        np.testing.assert_allclose(frames(document), expected_frames, atol=1e-5, equal_nan=True)
        assert document["demucs_dist"]["scorer"] == "torch" and document["demucs_dist"]["loss"] > 0
    # A rerun scores nothing again.
    before = read_events(out)
    main(score_args(musdb_root, estimates_root[0], out))
    assert "scored 0 in this run (2 already scored)" in capsys.readouterr().out
    assert read_events(out) == before
    assert sorted(song for event, song in before if event == "scored") == SONGS


@pytest.mark.first
@pytest.mark.slow
def test_museval_scorer_and_museval_itself_agree(torch_run, musdb_root, estimates_root, tmp_path):
    """`--scorer museval` writes the torch scorer's numbers (song 0: longer float files), and
    museval.evaluate given the raw files (its own padding and cutting) gives them too (song 1:
    shorter 16-bit files, a mono one)."""
    import museval

    out = tmp_path / "museval"
    main(score_args(musdb_root, estimates_root[0], out, "--scorer", "museval", "--workers", 1, "--songs", SONGS[0]))
    a, b = read_song_json(torch_run / "test" / f"{SONGS[0]}.json"), read_song_json(out / "test" / f"{SONGS[0]}.json")
    assert b["demucs_dist"]["scorer"] == "museval"
    np.testing.assert_allclose(frames(a), frames(b), atol=0.01, equal_nan=True)
    song = read_song([t for t in open_tracks(musdb_root, is_wav=True, subset="test") if t.name == SONGS[1]][0])
    references = song.sources.transpose(0, 2, 1).astype(np.float64)
    direct = museval.evaluate(references, estimates_root[1][SONGS[1]], win=44100, hop=44100)
    document = read_song_json(torch_run / "test" / f"{SONGS[1]}.json")
    expected = np.stack([[dict(zip(("SDR", "ISR", "SIR", "SAR"), direct))[m][i] for m in METRICS] for i in range(4)])
    np.testing.assert_allclose(frames(document), expected, atol=0.01, equal_nan=True)


def test_bad_input_is_one_line_user_errors(musdb_root, estimates_root, tmp_path):
    estimates = estimates_root[0]
    with pytest.raises(UserError, match="--estimates is required"):
        main(["--musdb", str(musdb_root), "--is-wav", "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="no 'train' folder"):
        main(score_args(musdb_root, estimates, tmp_path / "o", "--subset", "train"))
    with pytest.raises(UserError, match="--device 'tpu'"):
        main(score_args(musdb_root, estimates, tmp_path / "o", "--device", "tpu"))
    # A song without its four files: said before anything is scored.
    partial = tmp_path / "partial"
    (partial / "test" / SONGS[0]).mkdir(parents=True)
    for source in SOURCES[:3]:
        (partial / "test" / SONGS[0] / f"{source}.wav").symlink_to(estimates / "test" / SONGS[0] / f"{source}.wav")
    with pytest.raises(UserError, match=r"2 of 2 songs have no estimates.*Synth Test 000, Synth Test 001"):
        main(score_args(musdb_root, partial, tmp_path / "p"))
    assert not (tmp_path / "p").exists()
    # A file at another sample rate: that song fails with the reason, the other is scored.
    resampled = tmp_path / "rate"
    for name in SONGS:
        (resampled / "test" / name).mkdir(parents=True)
        for source in SOURCES:
            audio, rate = soundfile.read(estimates / "test" / name / f"{source}.wav")
            soundfile.write(resampled / "test" / name / f"{source}.wav", audio, 48000 if name == SONGS[1] else rate)
    with pytest.raises(UserError, match=r"1 songs could not be scored.*Synth Test 001: .*48000 Hz"):
        main(score_args(musdb_root, resampled, tmp_path / "r"))
    assert [p.stem for p in (tmp_path / "r" / "test").glob("*.json")] == [SONGS[0]]
    # Another estimates folder is not mixed into an output folder with scores of the first.
    with pytest.raises(UserError, match="other settings"):
        main(score_args(musdb_root, estimates, tmp_path / "r"))


def test_cuda_device_without_cuda_is_a_user_error(musdb_root, estimates_root, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="no CUDA device"):
        main(score_args(musdb_root, estimates_root[0], tmp_path / "o", "--device", "cuda"))
