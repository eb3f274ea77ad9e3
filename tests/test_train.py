"""The trainer in real processes: 2 CPU ranks (gloo DDP) forked by helpers.run_ranks, or under
`accelerate launch` for what the launcher does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, build_once, cpu_env, keep_output, kept_output, launch_command, run, run_ranks, scalars
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from demucs_dist import SOURCES
from demucs_dist.apply import apply_model
from demucs_dist.bss import song_median_sdr
from demucs_dist.data.loader import valid_songs
from demucs_dist.data.manifest import examples_per_epoch, read_manifest
from demucs_dist.model import center_trim
from demucs_dist.modelfile import load_model

pytestmark = pytest.mark.slow  # real multi-process runs: `make test-fast` skips them

SCALARS = [
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/examples_per_s",
    "train/data_wait_fraction",
    "train/audio_seconds_per_s",
    "train/peak_memory_gb",
    "valid/loss",
    "valid/best",
    *[f"valid/SDR/{source}" for source in ("All", "drums", "bass", "other", "vocals")],  # songs on both ranks
]


def test_two_processes_finish_two_epochs_with_identical_weights(two_epochs):
    _, result, (rank0, rank1) = two_epochs
    assert rank0["epoch"] == rank1["epoch"] == 2
    for name, tensor in rank0["state"].items():
        assert torch.equal(tensor, rank1["state"][name]), name
    assert set(rank0["ema"]) == {"ema0.5", "ema0.9"}  # --ema: the averages too
    for average, values in rank0["ema"].items():
        for name, tensor in values.items():
            assert torch.equal(tensor, rank1["ema"][average][name]), (average, name)
    assert "epoch 2/2" in result.stdout


def test_accumulation_and_optimizer_step_count(two_epochs, synth_shards):
    work, result, (rank0, _) = two_epochs
    assert "2 per device x 2 x 2 accumulation" in result.stdout
    expected_steps = 2 * (
        examples_per_epoch(read_manifest(str(synth_shards))) * 2 // 8
    )  # epochs x (examples x repeat // batch)
    assert rank0["step"] == expected_steps
    # Adam's own count of the updates it applied, from the last checkpoint.
    optimizer = torch.load(work / "run" / "checkpoints" / f"step-{expected_steps:08d}" / "optimizer.bin")
    assert {int(s["step"]) for s in optimizer["state"].values()} == {expected_steps}


def test_tensorboard_has_the_scalars_audio_and_config(two_epochs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work, _, _ = two_epochs
    events = EventAccumulator(str(work / "run"), size_guidance={"audio": 0, "images": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert set(SCALARS) <= set(tags["scalars"])
    assert len(events.Scalars("valid/loss")) == len(events.Scalars("valid/loss_ema0.9")) == 2
    assert "separation/mixture" in tags["audio"] and "separation/vocals_estimate" in tags["audio"]
    assert "separation/spectrograms" in tags["images"]  # the labelled matplotlib figure
    assert any("config" in t for t in tags["tensors"])
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(events.PluginTagToContent("hparams"))
    assert events.Scalars("train/peak_memory_gb")[-1].value > 0.05  # a process's resident memory


def test_job_log_has_plain_progress_lines(two_epochs):
    """Captured output is not a terminal: progress is plain lines (the test sets one per step), no redraws."""
    _, result, _ = two_epochs
    assert "\r" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("epoch 1: ")]
    assert lines and "steps (" in lines[-1] and "loss" in lines[-1] and "examples per s" in lines[-1], lines


def test_model_files_are_exported(two_epochs):
    work, _, (rank0, _) = two_epochs
    last = load_model(work / "run" / "last.th")
    for name, tensor in last.state_dict().items():
        assert torch.equal(tensor, rank0["state"][name]), name
    assert load_model(work / "run" / "best.th").kwargs["channels"] == 4


def test_world_size_mismatch_fails_loudly(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process: the trainer says so and stops."""
    command = launch_command(["-m", "demucs_dist.train", "--shards", tmp_path, "--logdir", tmp_path], cpu_flag=True)
    result = run(command, cpu_env(2))
    assert result.returncode != 0
    assert "launched as 2 processes but running as 1" in result.stderr


def single_step(shards: Path, logdir: Path, *extra: str):
    """One process, one optimizer step of 2 examples, then a validation: its CompletedProcess."""
    options = ["--global-batch", "2", "--max-device-batch", "2", "--workers", "0", "--epochs", "1",
               "--epoch-size", "2", "--repeat", "1"]  # fmt: skip
    target = ["-m", "demucs_dist.train", "--shards", shards, "--logdir", logdir, *TINY, *options, *extra]
    return run_ranks(target, 1, cpu_env(), timeout=300)


@pytest.fixture(scope="session")
def bf16_step(synth_shards, tmp_path_factory):
    """One bf16 step on one process with validation SDR on: its logdir and output."""

    def build(work: Path) -> None:
        result = single_step(synth_shards, work / "run", "--mixed-precision", "bf16", "--valid-sdr")
        keep_output(result, work / "output")

    work = build_once(tmp_path_factory, "bf16_step", build)
    result = kept_output(work / "output")
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run", result


def test_bf16_training_validates_in_fp32(bf16_step, synth_shards):
    """bf16 is allowed on CPU (fp16 is refused: see test_train_plan). The validation loss that picks
    best.th is the 2019 protocol's: each song whole, in one fp32 pass; here recomputed by hand."""
    logdir, result = bf16_step
    assert "mixed precision bf16" in result.stdout and "epoch 1/1" in result.stdout
    # global batch 2 on one process: a step holds 2 examples, fewer than a Remix group of 4
    assert "each process handles 2 example(s) per optimizer step, fewer than a Remix group (4)" in result.stdout
    model = load_model(logdir / "last.th")  # the weights validation ran with (saved after it)
    assert load_model(logdir / "init.th").kwargs == model.kwargs  # the untrained floor
    torch.set_num_threads(1)  # as the trainer ran (OMP_NUM_THREADS=1): the same summation order
    losses = []
    for song in valid_songs(str(synth_shards), read_manifest(str(synth_shards)), rank=0, world_size=1):
        length = song.mix.shape[-1]
        excess = model.valid_length(length) - length
        with torch.no_grad():
            estimates = model(F.pad(song.mix, (excess // 2, excess - excess // 2))[None])[0]
        losses.append(F.l1_loss(center_trim(estimates, length), song.sources).double())
    reference = torch.stack(losses).mean().float()
    assert torch.tensor(scalars(logdir, "valid/loss")[-1][1]) == reference  # TensorBoard stores float32


def test_validation_reports_the_median_sdr_of_the_songs(bf16_step, synth_shards):
    """valid/SDR/<source>: per song museval's median SDR over 1 s windows (bss.song_median_sdr,
    itself checked against museval in test_bss) on the song's own scale, then the median over
    songs; "All" the mean of the sources. Recomputed here from last.th, by hand (in fp32, as
    validation runs under bf16 training too)."""
    logdir, result = bf16_step
    model = load_model(logdir / "last.th")
    per_song = []
    for song in valid_songs(str(synth_shards), read_manifest(str(synth_shards)), rank=0, world_size=1):
        with torch.no_grad():
            estimates = apply_model(model, song.mix, shifts=0, split=False)
        denormalized = [x * song.std + song.mean for x in (song.sources, estimates)]
        per_song.append(song_median_sdr(*denormalized).numpy())
    assert len(per_song) == 2
    expected = np.median(np.stack(per_song), axis=0)  # no NaN song here
    for source, value in zip(SOURCES, expected):
        assert scalars(logdir, f"valid/SDR/{source}")[-1][1] == pytest.approx(value, abs=1e-4)
    assert scalars(logdir, "valid/SDR/All")[-1][1] == pytest.approx(expected.mean(), abs=1e-4)
    assert "SDR " in result.stdout  # the epoch line


def test_compiled_model_exports_a_loadable_model_file(synth_shards, tmp_path):
    """--compile wraps the model; best.th and the checkpoints must still hold the plain Demucs
    weights, so that the run resumes without --compile. The aot_eager backend wraps and traces the
    model as inductor does, without inductor's C++ builds (~30 s on a CPU with an empty cache).
    Its run also shows validation without --valid-sdr (TINY): the loss is logged, no SDR."""
    result = single_step(synth_shards, tmp_path, "--compile", "--compile-backend", "aot_eager")
    assert result.returncode == 0, result.stderr[-3000:]
    model = load_model(tmp_path / "best.th")
    assert model.kwargs["channels"] == 4
    tags = EventAccumulator(str(tmp_path)).Reload().Tags()["scalars"]
    assert "valid/loss" in tags and not [tag for tag in tags if tag.startswith("valid/SDR")]
    weights = torch.load(tmp_path / "checkpoints" / "step-00000001" / "pytorch_model.bin", weights_only=True)
    assert not [key for key in weights if "_orig_mod" in key]
    resumed = single_step(synth_shards, tmp_path, "--epochs", "2")
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-3000:]
