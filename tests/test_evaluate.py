"""Distributed evaluation: real processes, real museval, a tiny untrained model.

Songs are scored by the torch scorer (the default) unless a test asks for `--scorer museval`;
museval costs ~7-10 s per song here whatever its length (a fixed 4096x4096 solve per source and
channel), so the songs are few and short and the scored folders are shared between tests.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import stempeg
import torch
from helpers import build_once, keep_output, kept_output, run_ranks, tiny_model

from demucs_dist import SOURCES
from demucs_dist.apply import normalize, song_seed
from demucs_dist.data.songs import open_tracks, read_song
from demucs_dist.data.synth import synthesize
from demucs_dist.distributed import balance
from demucs_dist.errors import UserError
from demucs_dist.evaluate import baseline_scores, main
from demucs_dist.modelfile import save_model
from demucs_dist.scoring import METRICS, aggregate, read_events, read_song_json

REPO = Path(__file__).resolve().parents[1]
CLIP = Path(stempeg.example_stem_path())
SYNTH_SONGS = ["Synth Test 000", "Synth Test 001"]


def run(args, processes=1, timeout=300, full=False, **env_extra):
    """`python -m demucs_dist.evaluate ARGS` in one process, or in `processes` ranks (forked:
    helpers.run_ranks): its stdout (`full`: the CompletedProcess)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", **env_extra}
    target = ["-m", "demucs_dist.evaluate", *args]
    result = run_ranks(target, processes, env, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result if full else result.stdout


def table_numbers(stdout):
    """{row: [All, vocals, drums, bass, other]} of the printed markdown table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in METRICS:
            rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


@pytest.fixture(scope="session")
def model_file(tmp_path_factory):
    def build(folder: Path) -> None:
        torch.manual_seed(0)
        save_model(tiny_model(), folder / "tiny.th")

    return build_once(tmp_path_factory, "model", build) / "tiny.th"


@pytest.fixture(scope="session")
def eval_root(tmp_path_factory):
    return build_once(
        tmp_path_factory, "eval_songs", lambda f: synthesize(f, train=0, valid=0, test=len(SYNTH_SONGS), seconds=3.0)
    )


def common_args(model_file, eval_root, out):
    return ["--model", model_file, "--musdb", eval_root, "--is-wav", "--out", out, "--shifts", 2, "--timeout", 120]


@pytest.fixture(scope="session")
def one_process(model_file, eval_root, tmp_path_factory):
    """An evaluation in one process (2 museval workers): its --out and stdout. Tests only read it."""

    def build(work: Path) -> None:
        result = run(common_args(model_file, eval_root, work / "eval") + ["--workers", 2, "--no-progress"], full=True)
        keep_output(result, work / "output")

    work = build_once(tmp_path_factory, "one_process", build)
    return work / "eval", kept_output(work / "output").stdout


@pytest.fixture(scope="session")
def two_processes(model_file, eval_root, tmp_path_factory):
    """The same in 2 processes: its --out and stdout + stderr."""

    def build(work: Path) -> None:
        # progress on, a line per update: what a job log (not a terminal) gets
        args = common_args(model_file, eval_root, work / "eval") + ["--workers", 1]
        keep_output(run(args, 2, full=True, DEMUCS_DIST_PROGRESS_SECONDS="0"), work / "output")

    work = build_once(tmp_path_factory, "two_processes", build)
    result = kept_output(work / "output")
    return work / "eval", result.stdout + result.stderr


@pytest.mark.slow
def test_job_log_has_plain_progress_lines_of_each_rank(two_processes):
    _, log = two_processes
    assert "\r" not in log
    lines = log.splitlines()
    for rank in (0, 1):
        inference = [line for line in lines if line.startswith(f"rank {rank} inference: ")]
        assert inference and "1/1 song" in inference[-1], lines
        assert [line for line in lines if line.startswith(f"rank {rank} scoring: ")], lines


@pytest.mark.slow
def test_two_processes_give_the_same_per_song_scores(one_process, two_processes):
    (out1, _), (out2, _) = one_process, two_processes
    assert json.loads((out2 / "results.json").read_text())["this_run"]["processes"] == 2
    pids = {line.split("\t")[1] for line in (out2 / "events.log").read_text().splitlines() if "\tinferred\t" in line}
    assert len(pids) == 2, "both ranks should have inferred songs"
    for name in SYNTH_SONGS:
        a, b = read_song_json(out1 / "test" / f"{name}.json"), read_song_json(out2 / "test" / f"{name}.json")
        assert [t["name"] for t in a["targets"]] == list(SOURCES)
        frames_a = np.array([[f["metrics"][m] for f in t["frames"] for m in METRICS] for t in a["targets"]])
        frames_b = np.array([[f["metrics"][m] for f in t["frames"] for m in METRICS] for t in b["targets"]])
        # Same seed per song on any rank: the same estimates up to float summation order.
        np.testing.assert_allclose(frames_a, frames_b, atol=2e-3, equal_nan=True)
        assert a["demucs_dist"]["loss"] == pytest.approx(b["demucs_dist"]["loss"], rel=1e-5)
        assert a["demucs_dist"]["shift_seed"] == b["demucs_dist"]["shift_seed"] == song_seed(0, name)


@pytest.mark.slow
def test_museval_scorer_writes_the_torch_scorers_numbers(one_process, model_file, eval_root, tmp_path):
    """One of the songs, the same model and seed through `--scorer museval` (museval in a worker
    pool): the same json document, every frame within 0.01 dB. (One song: museval costs ~7 s a
    song; the table is aggregated from these documents whatever the scorer, and
    test_printed_table_is_museval_evalstore_aggregate checks that against museval's EvalStore.)"""
    out_torch, _ = one_process
    out, name = tmp_path / "eval", SYNTH_SONGS[0]
    run(common_args(model_file, eval_root, out) + ["--scorer", "museval", "--workers", 1, "--no-progress"]
        + ["--songs", name])  # fmt: skip
    a, b = read_song_json(out_torch / "test" / f"{name}.json"), read_song_json(out / "test" / f"{name}.json")
    assert (a["demucs_dist"]["scorer"], b["demucs_dist"]["scorer"]) == ("torch", "museval")
    # The same estimates, up to float summation order (the two runs use different thread counts).
    assert a["demucs_dist"]["loss"] == pytest.approx(b["demucs_dist"]["loss"], rel=1e-5)
    frames_a = np.array([[f["metrics"][m] for f in t["frames"] for m in METRICS] for t in a["targets"]])
    frames_b = np.array([[f["metrics"][m] for f in t["frames"] for m in METRICS] for t in b["targets"]])
    assert frames_a.shape == frames_b.shape
    np.testing.assert_array_equal(np.isnan(frames_a), np.isnan(frames_b))
    np.testing.assert_allclose(frames_a, frames_b, atol=0.01, equal_nan=True)
    assert sorted(p.stem for p in (out / "test").glob("*.json")) == [name]
    assert json.loads((out / "results.json").read_text())["scorer"] == "museval"


def test_printed_table_is_museval_evalstore_aggregate(one_process):
    import museval

    out, stdout = one_process
    store = museval.EvalStore(frames_agg="median", tracks_agg="median")
    store.add_eval_dir(out)  # museval's own reader of <out>/test/*.json
    assert sorted(store.df["track"].unique()) == SYNTH_SONGS
    expected = store.agg_frames_tracks_scores().unstack()  # rows: targets, columns: metrics
    expected.loc["All"] = expected.loc[list(SOURCES)].mean()
    printed, results = table_numbers(stdout), json.loads((out / "results.json").read_text())
    columns = ["All", "vocals", "drums", "bass", "other"]
    for metric in METRICS:
        assert printed[metric] == pytest.approx([expected.loc[c, metric] for c in columns], abs=5.1e-4)
        for column in columns:
            assert results["scores"][column][metric] == pytest.approx(expected.loc[column, metric], abs=1e-9)
    losses = [read_song_json(out / "test" / f"{n}.json")["demucs_dist"]["loss"] for n in SYNTH_SONGS]
    assert results["loss"] == pytest.approx(np.mean(losses))
    assert f"| L1 loss | {np.mean(losses):.3f} |" in stdout


def test_rerun_with_every_song_scored_does_no_inference(one_process, model_file, eval_root, tmp_path):
    out = Path(shutil.copytree(one_process[0], tmp_path / "eval"))  # others read one_process meanwhile
    first_stdout = one_process[1]
    json_times = {p: p.stat().st_mtime_ns for p in (out / "test").glob("*.json")}
    events_before = read_events(out)
    stdout = run(common_args(model_file, eval_root, out) + ["--no-progress"])
    assert json.loads((out / "results.json").read_text())["this_run"]["inferred"] == 0
    assert "inferred 0 and scored 0 in this run (2 already scored)" in stdout
    assert read_events(out) == events_before
    assert {p: p.stat().st_mtime_ns for p in (out / "test").glob("*.json")} == json_times
    assert table_numbers(stdout) == table_numbers(first_stdout)


@pytest.mark.slow
def test_killed_run_rerun_scores_every_song_exactly_once(model_file, eval_root, tmp_path):
    out = tmp_path / "eval"
    args = common_args(model_file, eval_root, out) + ["--workers", 1, "--no-progress"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    command = [sys.executable, "-m", "demucs_dist.evaluate", *map(str, args)]
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not list((out / "test").glob("*.json")) and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the run and its museval workers
        process.wait()
    scored_before_kill = {p.stem for p in (out / "test").glob("*.json")}
    assert len(scored_before_kill) == 1, "the kill should land between the first and the second song"

    stdout = run(args)
    assert "inferred 1 and scored 1 in this run (1 already scored)" in stdout
    scorings = [song for event, song in read_events(out) if event == "scored"]
    assert sorted(scorings) == SYNTH_SONGS, "every song scored exactly once, the first one kept"
    assert not list(out.glob(".scratch/*")), "no arrays left behind"


@pytest.fixture(scope="session")
def clip_root(tmp_path_factory):
    """The real MUSDB18 clip that ships with stempeg, in a MUSDB18 folder (.stem.mp4)."""
    root = tmp_path_factory.mktemp("clip")
    (root / "test").mkdir()
    (root / "test" / CLIP.name).symlink_to(CLIP)
    return root


@pytest.fixture(scope="session")
def clip_run(model_file, clip_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_eval") / "eval"
    main(["--model", str(model_file), "--musdb", str(clip_root), "--out", str(out), "--shifts", "2"]
         + ["--workers", "1", "--save-estimates", "--no-progress"])  # fmt: skip
    return out


@pytest.mark.slow
def test_real_musdb_clip_evaluates_end_to_end(clip_run, clip_root):
    out = clip_run
    name = CLIP.name.removesuffix(".stem.mp4")
    document = read_song_json(out / "test" / f"{name}.json")
    assert [t["name"] for t in document["targets"]] == list(SOURCES)
    assert len(document["targets"][0]["frames"]) == 6  # 6 s clip, 1 s windows
    results = json.loads((out / "results.json").read_text())
    assert all(np.isfinite(results["scores"][c]["SDR"]) for c in results["scores"])
    song = read_song(open_tracks(clip_root, is_wav=False, subset="test")[0])
    for source in SOURCES:
        audio, rate = soundfile.read(out / "estimates" / "test" / name / f"{source}.wav")
        assert rate == 44100 and audio.shape == (song.mix.shape[1], 2)
    assert (out / "results.md").read_text().startswith("| tiny (1 songs) | All | vocals | drums | bass | other |")


def test_mixture_baseline_scores_the_mixture_as_every_source(clip_run, clip_root, tmp_path, capsys):
    out = tmp_path / "baseline"
    main(["--baseline", "mixture", "--musdb", str(clip_root), "--out", str(out), "--workers", "1", "--no-progress"]
         + ["--compare", str(clip_run / "results.json"), "--logdir", str(tmp_path / "tb")])  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    song = read_song(open_tracks(clip_root, is_wav=False, subset="test")[0])
    mix, mean, std = normalize(torch.from_numpy(song.mix))
    expected_loss = (mix[None] - (torch.from_numpy(song.sources) - mean) / std).abs().mean().item()
    assert results["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert results["label"] == "mixture baseline"
    # The mixture is a poor estimate of the quieter sources: their SIR is negative.
    assert min(results["scores"][s]["SIR"] for s in SOURCES) < 0
    # --compare adds the other run's SDR as a row.
    stdout = capsys.readouterr().out
    model_sdr = json.loads((clip_run / "results.json").read_text())["scores"]
    row = " | ".join(f"{model_sdr[c]['SDR']:.3f}" for c in ["All", "vocals", "drums", "bass", "other"])
    assert f"| SDR (tiny) | {row} |" in stdout
    assert f"| SDR (tiny) | {row} |" in (out / "results.md").read_text()
    # --logdir: the numbers in TensorBoard too.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    [scalar] = events.Scalars("evaluate/SDR/vocals")
    assert scalar.value == pytest.approx(results["scores"]["vocals"]["SDR"], rel=1e-6)
    # The same numbers from the function the demo calls (every song is scored already: no museval).
    assert baseline_scores(clip_root, out, workers=1)["scores"] == results["scores"]


def test_balance_longest_first_to_the_least_loaded_rank():
    durations = {"a": 10.0, "b": 9.0, "c": 5.0, "d": 4.0, "e": 1.0, "f": 1.0}
    shares = balance(durations, 2)
    assert shares == [["a", "d", "e"], ["b", "c", "f"]]  # loads 15 and 15 (ties go to the lower rank)
    assert balance(durations, 2) == shares  # deterministic: every rank computes the same split
    assert sorted(sum(balance(durations, 4), [])) == sorted(durations)
    assert balance({"x": 1.0}, 3) == [["x"], [], []]


def test_song_seed_is_a_fixed_function_of_seed_and_name():
    """crc32 of the name, not hash(): the same in every process, so the same on every rank."""
    assert song_seed(5, "abc") == 5 + 0x352441C2
    assert song_seed(0, "Synth Test 000") != song_seed(0, "Synth Test 001")


def test_aggregation_matches_evalstore_with_nan_frames(tmp_path):
    """NaN frames (silent windows) and a song whose target is NaN throughout are left out the
    same way museval's EvalStore (pandas' median) leaves them out."""
    import museval

    rng = np.random.default_rng(0)
    documents = {}
    for song in range(5):
        store = museval.TrackStore(track_name=f"song {song}", win=1.0, hop=1.0)
        for target in SOURCES:
            values = {m: rng.normal(3, 4, size=7 + song) for m in ("SDR", "SIR", "ISR", "SAR")}
            values["SDR"][rng.random(7 + song) < 0.3] = np.nan
            if song == 2 and target == "vocals":
                values = {m: np.full(9, np.nan) for m in values}
            store.add_target(target, values)
        path = tmp_path / "test" / f"song {song}.json"
        path.parent.mkdir(exist_ok=True)
        store.save(path)
        documents[f"song {song}"] = read_song_json(path)
    evalstore = museval.EvalStore(frames_agg="median", tracks_agg="median")
    evalstore.add_eval_dir(tmp_path)
    expected = evalstore.agg_frames_tracks_scores().unstack()
    results = aggregate(documents)
    for target in SOURCES:
        for metric in METRICS:
            assert results["scores"][target][metric] == pytest.approx(expected.loc[target, metric], abs=1e-12)
    assert np.isnan(results["songs"]["song 2"]["vocals"]["SDR"])


def test_bad_input_is_one_line_user_errors(model_file, clip_root, tmp_path):
    musdb = ["--musdb", str(clip_root), "--out", str(tmp_path / "o")]
    with pytest.raises(UserError, match="either --model FILE or --baseline"):
        main(musdb)
    with pytest.raises(UserError, match="model file not found"):
        main(["--model", str(tmp_path / "none.th"), *musdb])
    with pytest.raises(UserError, match="MUSDB root not found"):
        main(["--model", str(model_file), "--musdb", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="no songs found"):
        main(["--model", str(model_file), "--musdb", str(clip_root), "--is-wav", "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="songs not found.*Nope"):
        main(["--model", str(model_file), *musdb, "--songs", "Nope"])
    # An output folder with scores of other settings is not mixed with new ones.
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "run.json").write_text(json.dumps({"baseline": "mixture", "subset": "test", "loss": "l1"}))
    with pytest.raises(UserError, match="other settings"):
        main(["--baseline", "mixture", *musdb, "--loss", "mse"])


@pytest.mark.slow
def test_default_inference_is_the_papers_protocol_computed_by_hand(model_file, eval_root):
    """evaluate's defaults: 10 shifts of up to 0.5 s, each shifted song whole in one fp32 pass
    (no overlap-add), averaged, on the song z-scored by its mixture and scaled back."""
    import torch.nn.functional as F

    from demucs_dist.apply import shift_offsets
    from demucs_dist.config import ApplyConfig
    from demucs_dist.evaluate import infer_song
    from demucs_dist.model import center_trim
    from demucs_dist.modelfile import load_model

    model = load_model(model_file)
    song = read_song(open_tracks(eval_root, True, "test")[0])
    seed = song_seed(0, song.name)
    estimates, _ = infer_song(model, song, ApplyConfig(), seed, "l1", torch.device("cpu"))

    mix, mean, std = normalize(torch.from_numpy(song.mix))
    length, max_shift = mix.shape[-1], model.samplerate // 2
    offsets = shift_offsets(10, max_shift, seed)
    padded = F.pad(mix, (max_shift, max_shift))
    by_hand = torch.zeros(len(SOURCES), *mix.shape)
    for offset in offsets:
        view = padded[:, offset : offset + length + max_shift]
        excess = model.valid_length(view.shape[-1]) - view.shape[-1]
        with torch.no_grad():
            whole = model(F.pad(view, (excess // 2, excess - excess // 2))[None])[0]
        by_hand += center_trim(whole, view.shape[-1])[..., max_shift - offset : max_shift - offset + length]
    by_hand = by_hand / len(offsets) * std + mean
    assert len(offsets) == 10 and ApplyConfig().split is False
    np.testing.assert_allclose(estimates, by_hand.numpy(), atol=1e-5)


def test_the_loss_follows_the_model_files_training_loss(eval_root, tmp_path):
    """A model trained with --loss mse is evaluated with MSE unless --loss says otherwise."""
    torch.manual_seed(0)
    model = tmp_path / "mse.th"
    save_model(tiny_model(), model, loss="mse")
    out = tmp_path / "eval"
    main(["--model", str(model), "--musdb", str(eval_root), "--is-wav", "--out", str(out), "--shifts", "1",
          "--songs", SYNTH_SONGS[0], "--no-progress"])  # fmt: skip
    document = read_song_json(out / "test" / f"{SYNTH_SONGS[0]}.json")
    assert document["demucs_dist"]["loss_kind"] == "mse"
