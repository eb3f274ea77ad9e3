"""Faults that training must survive (issue #7), each in real processes on CPU.

Faults are injected through the trainer's test hooks (environment variables documented in
demucs_dist/faults.py): a NaN loss at chosen steps, a rank that SIGKILLs itself after a step,
and a SIGKILL inside a checkpoint save. docs/reliability.md lists what each test shows.
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import (
    TINY,
    build_once,
    cli_here,
    cpu_env,
    keep_output,
    kept_output,
    launch_command,
    output,
    run,
    run_probe,
    run_ranks,
    scalars,
)

from demucs_dist.modelfile import load_model

pytestmark = pytest.mark.slow  # real multi-process runs: `make test-fast` skips them

# 16 examples a pass, --repeat 3: 6 optimizer steps of 8 examples per epoch; a short timeout so a
# hang would show as a failure within seconds, not the default 10 minutes.
FAST = ["--global-batch", "8", "--max-device-batch", "2", "--workers", "1", "--timeout", "20"]
STEPS = 6
HANG_BOUND = 150  # seconds: far above a normal run (~10 s)
FAILED_JOB_BOUND = 60  # a failed job ends within the 20 s timeout plus a generous startup (~4 s measured)


def train(shards: Path, logdir: Path, *extra: str, processes: int = 2, fault: dict | None = None, launcher="forked"):
    """Run `demucs-dist train` (1 plain process, or 2 forked ranks (helpers.run_ranks) or under
    accelerate launch / torchrun); returns (CompletedProcess, seconds)."""
    env = cpu_env(processes if launcher != "torchrun" else None, **(fault or {}))
    target = ["-m", "demucs_dist.train", "--shards", shards, "--logdir", logdir, *TINY, *FAST, "--epochs", "1",
              "--repeat", "3", *extra]  # fmt: skip
    start = time.monotonic()
    if launcher == "forked" or processes == 1:
        result = run_ranks(target, processes, env, timeout=HANG_BOUND)
    else:
        # torchrun's default (static) rendezvous: its store outlives a restart, which is where restarted
        # workers used to find the dead round's addresses (distributed.join_restarted_group).
        result = run(launch_command(target, processes, launcher=launcher), env, timeout=HANG_BOUND)
    return result, time.monotonic() - start


def checkpoints(logdir: Path) -> list[str]:
    return sorted(p.name for p in (logdir / "checkpoints").iterdir())


def adam_steps(checkpoint: Path) -> set[int]:
    """The number of updates Adam applied, from a checkpoint's optimizer state."""
    optimizer = torch.load(checkpoint / "optimizer.bin")
    return {int(s["step"]) for s in optimizer["state"].values()}


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint / "pytorch_model.bin", weights_only=True)


def test_nonfinite_steps_are_skipped_and_counted(synth_shards, tmp_path):
    result, _ = train(synth_shards, tmp_path, "--max-nonfinite", "3", fault={"DEMUCS_DIST_FAULT_NAN_STEPS": "2,3"})
    assert result.returncode == 0, output(result)
    assert scalars(tmp_path, "train/skipped_steps")[-1] == (STEPS, 2)
    assert adam_steps(tmp_path / "checkpoints" / f"step-{STEPS:08d}") == {STEPS - 2}  # two updates not applied
    assert all(torch.isfinite(p).all() for p in load_model(tmp_path / "last.th").parameters())
    assert "train nan" not in result.stdout  # the skipped steps' NaN loss stays out of the epoch mean


def test_consecutive_nonfinite_steps_stop_the_run_without_a_bad_checkpoint(synth_shards, tmp_path):
    nan = {"DEMUCS_DIST_FAULT_NAN_STEPS": "3,4,5"}
    result, _ = train(synth_shards, tmp_path, "--max-nonfinite", "3", "--checkpoint-every", "2", processes=1, fault=nan)
    assert result.returncode == 2, output(result)
    assert "error: 3 steps in a row had non-finite gradients (step 5)" in result.stderr
    assert "Traceback" not in result.stderr
    # Steps 3 and 4 were skipped: the step-4 checkpoint holds the (finite) weights of step 2.
    assert checkpoints(tmp_path) == ["step-00000002", "step-00000004"]
    two, four = (weights(tmp_path / "checkpoints" / f"step-0000000{n}") for n in (2, 4))
    assert all(torch.isfinite(w).all() for w in four.values())
    assert all(torch.equal(two[name], four[name]) for name in two)
    assert not (tmp_path / "last.th").exists()
    resumed, _ = train(synth_shards, tmp_path, processes=1)  # without the fault: resumes and finishes
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, output(resumed)
    assert all(torch.isfinite(p).all() for p in load_model(tmp_path / "last.th").parameters())


@pytest.fixture(scope="session")
def killed_in_epoch_two(synth_shards, tmp_path_factory):
    """The reference run (conftest's `two_epochs`: 2 epochs of 4 steps, a checkpoint every 2) in
    which rank 1 SIGKILLs itself after step 7: the newest checkpoint is step 6, mid-epoch 2.
    Returns the run folder, the killed launch's output and the seconds it took."""

    def build(work: Path) -> None:
        start = time.monotonic()
        kill = {"DEMUCS_DIST_FAULT_KILL": "1:7"}
        killed, _ = run_probe(work / "killed", synth_shards, work / "run", "--epochs", "2", "--timeout", "20",
                              env=kill, check=False, launcher="accelerate")  # fmt: skip
        keep_output(killed, work / "killed")
        (work / "seconds").write_text(str(time.monotonic() - start))

    work = build_once(tmp_path_factory, "killed_in_epoch_two", build)
    seconds = float((work / "seconds").read_text())
    return work / "run", kept_output(work / "killed"), seconds


def test_killed_rank_stops_the_job_and_a_relaunch_ends_as_if_uninterrupted(
    killed_in_epoch_two, two_epochs, synth_shards, tmp_path
):
    """SIGKILL of rank 1 in epoch 2 under accelerate launch: the launcher tears the job down (no
    hang). The relaunch resumes from the step-6 checkpoint and ends bit-identical to the
    uninterrupted run on both ranks, weights and averages (CPU ops and gloo's all-reduce are
    deterministic), each step applied and logged once. (A finished run relaunched with more
    epochs, which goes on where it ended: test_checkpoint's test_rank_zero_decides_the_resume_point.)"""
    killed_run, killed, seconds = killed_in_epoch_two
    assert killed.returncode != 0 and seconds < FAILED_JOB_BOUND, output(killed)
    assert "rank 1 kills itself at step 7" in killed.stderr
    assert "epoch 1/2" in killed.stdout and "epoch 2/2" not in killed.stdout  # died in epoch 2
    run = tmp_path / "run"
    shutil.copytree(killed_run, run)
    # every 2 steps, epoch 1's end (step 4) included though --checkpoint-minutes is not due
    assert checkpoints(run) == ["step-00000004", "step-00000006"]

    resumed, ranks = run_probe(tmp_path / "resumed", synth_shards, run, "--epochs", "2")
    assert "step-00000006 (epoch 1, step 6)" in resumed.stdout and "epoch 2/2" in resumed.stdout
    _, _, uninterrupted = two_epochs
    for rank, (state, reference) in enumerate(zip(ranks, uninterrupted)):
        assert state["step"] == reference["step"] == 8
        for name, tensor in reference["state"].items():
            assert torch.equal(state["state"][name], tensor), (rank, name)
        for average, values in reference["ema"].items():
            for name, tensor in values.items():
                assert torch.equal(state["ema"][average][name], tensor), (rank, average, name)
    assert adam_steps(run / "checkpoints" / "step-00000008") == {8}
    assert [step for step, _ in scalars(run, "train/loss")] == list(range(1, 9))


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(synth_shards, tmp_path):
    """Rank 0 is killed inside the save of step 4, after its files are written and before the rename."""
    kill = {"DEMUCS_DIST_FAULT_KILL_IN_SAVE": "0:4"}
    result, seconds = train(synth_shards, tmp_path, "--checkpoint-every", "2", fault=kill, launcher="accelerate")
    assert result.returncode != 0 and seconds < FAILED_JOB_BOUND, output(result)
    # Rank 1 stops at the launcher's SIGTERM at once: rank 0's DataLoader worker died with it and
    # with it its copies of rank 0's sockets (before, rank 1's barrier waited ~5 s for the worker
    # to notice, and its own workers' deaths then surfaced as a traceback in the job log).
    assert "DataLoader worker" not in result.stderr, output(result)
    assert checkpoints(tmp_path) == [".partial-step-00000004", "step-00000002"]
    assert (tmp_path / "checkpoints" / ".partial-step-00000004" / "optimizer.bin").exists()  # written, not complete

    resumed, _ = train(synth_shards, tmp_path, "--checkpoint-every", "2", processes=1)  # one process is enough
    assert resumed.returncode == 0, output(resumed)
    assert "step-00000002 (epoch 0, step 2)" in resumed.stdout
    assert not [name for name in checkpoints(tmp_path) if name.startswith(".partial")]
    assert adam_steps(tmp_path / "checkpoints" / f"step-{STEPS:08d}") == {STEPS}


def test_torchrun_with_max_restarts_resumes_by_itself(synth_shards, tmp_path):
    """torchrun restarts both workers once after rank 1 dies; they resume from the last checkpoint."""
    marker = tmp_path / "killed-once"
    kill = {"DEMUCS_DIST_FAULT_KILL": f"1:3:{marker}"}
    result, _ = train(synth_shards, tmp_path / "run", "--checkpoint-every", "2", fault=kill, launcher="torchrun")
    assert result.returncode == 0, output(result)
    assert marker.exists() and "rank 1 kills itself at step 3" in result.stderr
    assert "resuming from" in result.stdout and "step 2)" in result.stdout
    assert adam_steps(tmp_path / "run" / "checkpoints" / f"step-{STEPS:08d}") == {STEPS}


def damaged_copy(shards: Path, folder: Path) -> tuple[Path, str, str]:
    """A copy of `shards` with one train shard truncated and one with a flipped byte (same size)."""
    copy = folder / "shards"
    shutil.copytree(shards, copy)
    truncated, flipped = "train/000001.tar", "train/000005.tar"
    with open(copy / truncated, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    with open(copy / flipped, "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    return copy, truncated, flipped


def test_verify_finds_truncated_and_corrupt_shards(synth_shards, tmp_path, capfd):
    whole = cli_here(["shard", "--verify", "--out", synth_shards], capfd)
    assert whole.returncode == 0 and "are whole" in whole.stdout, whole.stderr
    copy, truncated, flipped = damaged_copy(synth_shards, tmp_path)
    (copy / "valid" / "000000.tar").unlink()
    result = cli_here(["shard", "--verify", "--out", copy], capfd)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    bad = [line for line in result.stdout.splitlines() if line.startswith("bad shard:")]
    assert len(bad) == 3
    assert f"{truncated}: 1" in result.stdout and "truncated" in result.stdout
    assert f"{flipped}: sha256 differs" in result.stdout and "valid/000000.tar: missing" in result.stdout
    assert result.stderr.startswith("error: 3 bad shard(s)")


def test_training_on_a_truncated_shard_stops_naming_it_or_skips_it(synth_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(synth_shards, copy)
    with open(copy / "train" / "000001.tar", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    stopped, _ = train(copy, tmp_path / "stop", processes=1)
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr, output(stopped)
    error = [line for line in re.split(r"[\r\n]", stopped.stderr) if line.startswith("error:")]  # \r: tqdm
    assert len(error) == 1 and "train/000001.tar cannot be read" in error[0] and "--verify" in error[0]

    skipped, _ = train(copy, tmp_path / "skip", "--on-bad-shard", "skip", processes=1)
    assert skipped.returncode == 0, output(skipped)
    assert "warning: training shard" in skipped.stderr and "000001.tar cannot be read" in skipped.stderr
    assert scalars(tmp_path / "skip", "train/bad_shards")[-1][1] >= 1
    assert adam_steps(tmp_path / "skip" / "checkpoints" / f"step-{STEPS:08d}") == {STEPS}  # a full epoch


def test_shards_hold_every_chunk_and_song_once(synth_shards):
    """With the killed-and-rerun test in test_shard.py (rerun == uninterrupted, byte for byte): no duplicates."""
    manifest = json.loads((synth_shards / "manifest.json").read_text())
    keys: Counter = Counter()
    for record in manifest["train"] + manifest["valid"]:
        with tarfile.open(synth_shards / record["name"]) as tar:
            members = [m.name for m in tar]
        samples = {name.split(".", 1)[0] for name in members}
        assert len(samples) == record["samples"]
        keys.update(f"{record['name'].split('/')[0]}/{key}" for key in samples)
    assert keys and max(keys.values()) == 1


def test_resume_under_another_world_size_and_global_batch_trains_the_rest_once(
    killed_in_epoch_two, synth_shards, tmp_path
):
    """A SLURM requeue on another node count with another --global-batch: the mid-epoch
    checkpoint (16 of epoch 2's 32 examples, 2 processes drawing 8 a step) resumes in 1 process
    drawing 4 a step, with the other 16 drawn anew. (In the layout the world size is what differs;
    another --global-batch alone changes the accumulation: either way the layout that drew the
    epoch is not the relaunch's, and this path is taken.)"""
    run = tmp_path / "run"
    shutil.copytree(killed_in_epoch_two[0], run)
    resumed, _ = run_probe(tmp_path / "probe", synth_shards, run, "--epochs", "2", "--global-batch", "4", processes=1)
    assert "16 examples, is drawn anew in 4 steps" in resumed.stdout
    assert adam_steps(run / "checkpoints" / "step-00000010") == {10}
