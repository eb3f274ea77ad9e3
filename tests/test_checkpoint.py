"""Checkpoints as a GPU node and a cluster meet them: cuDNN's flat LSTM weights, ranks that see
different folders, a damaged newest checkpoint, a timed cadence, one run per folder."""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import TINY, build_once, cpu_env, output, run_ranks, tiny_model

from demucs_dist.checkpoint import Checkpoints, Progress
from demucs_dist.errors import UserError
from demucs_dist.files import FolderLock
from demucs_dist.model import Demucs

pytestmark = pytest.mark.slow  # real multi-process runs: `make test-fast` skips them

FAST = ["--global-batch", "8", "--max-device-batch", "2", "--workers", "0", "--timeout", "30"]
STEPS = 6  # per epoch: 16 examples a pass x --repeat 3 / global batch 8


def train(shards: Path, logdir: Path, *extra: str, processes: int = 1, env: dict | None = None):
    target = ["-m", "demucs_dist.train", "--shards", shards, "--logdir", logdir, *TINY, *FAST, "--repeat", "3", *extra]
    env = cpu_env(processes if processes > 1 else None, **(env or {}))
    return run_ranks(target, processes, env, timeout=200)


def flatten_lstm_like_cudnn(model: Demucs) -> None:
    """Make the LSTM's weights views of one flat buffer, as cuDNN's flatten_parameters does on CUDA."""
    lstm = model.lstm.lstm
    flat = torch.cat([p.detach().reshape(-1) for p in lstm.parameters()])
    offset = 0
    for p in lstm.parameters():
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()


def test_lstm_weights_sharing_one_storage_survive_save_and_load(tmp_path):
    """With accelerate's default (safetensors) this round trip raises in load_state."""
    torch.manual_seed(0)
    model = tiny_model(lstm_layers=2)
    flatten_lstm_like_cudnn(model)
    params = list(model.lstm.lstm.parameters())
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.Adam(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoints = Checkpoints(tmp_path, keep=2, minutes=0)
    checkpoints.save(accelerator, Progress(step=3), model)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    progress, _ = checkpoints.resume(accelerator, print)
    assert progress.step == 3
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name


@pytest.fixture(scope="session")
def one_epoch(synth_shards, tmp_path_factory):
    """A finished 1-epoch run with checkpoints at steps 4 and 6 (kept: the newest 2)."""

    def build(work: Path) -> None:
        result = train(synth_shards, work / "run", "--epochs", "1", "--checkpoint-every", "2")
        assert result.returncode == 0, output(result)

    logdir = build_once(tmp_path_factory, "one_epoch", build) / "run"
    assert sorted(p.name for p in (logdir / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    return logdir


def test_rank_zero_decides_the_resume_point(one_epoch, synth_shards, tmp_path):
    """Rank 1 does not see the newest checkpoint (a stale network file system cache): both ranks
    still resume from it, and end with the same step count."""
    logdir = tmp_path / "run"
    shutil.copytree(one_epoch, logdir)
    hide = {"DEMUCS_DIST_FAULT_HIDE_CHECKPOINT": "1:step-00000006"}
    result = train(synth_shards, logdir, "--epochs", "2", processes=2, env=hide)
    assert result.returncode == 0, output(result)
    assert "step-00000006 (epoch 1, step 6)" in result.stdout
    assert json.loads((logdir / "checkpoints" / "step-00000012" / "progress.json").read_text())["step"] == 12


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(one_epoch, synth_shards, tmp_path):
    logdir = tmp_path / "run"
    shutil.copytree(one_epoch, logdir)
    weights = logdir / "checkpoints" / "step-00000006" / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:100])  # a full disk cut it short
    result = train(synth_shards, logdir, "--epochs", "1")
    assert result.returncode == 0, output(result)
    assert "step-00000006 cannot be loaded" in result.stdout
    assert "resuming from" in result.stdout and "step-00000004 (epoch 0, step 4)" in result.stdout


def test_timed_checkpoints_and_last_th_only_at_checkpoints(synth_shards, tmp_path):
    """--checkpoint-minutes 60 on a 2-epoch run: no checkpoint after epoch 1, one after the last."""
    result = train(synth_shards, tmp_path, "--epochs", "2", "--checkpoint-minutes", "60")
    assert result.returncode == 0, output(result)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [f"step-{2 * STEPS:08d}"]
    assert torch.load(tmp_path / "last.th", weights_only=True)["info"]["epoch"] == 2


def test_a_second_run_on_a_locked_folder_is_refused(synth_shards, tmp_path):
    lock = FolderLock(tmp_path, "training", "--logdir").acquire()  # as a running training holds it
    try:
        result = train(synth_shards, tmp_path, "--epochs", "1")
    finally:
        lock.release()
    assert result.returncode == 2, output(result)
    assert "is in use by a running training (pid" in result.stderr and "Traceback" not in result.stderr
    with open(tmp_path / ".lock") as f:  # released: a relaunch may take it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_restart_deletes_only_its_own_checkpoints(tmp_path):
    folder = tmp_path / "checkpoints"
    for name in ("step-00000002", ".partial-step-00000004", "notes", "step-backup"):
        (folder / name).mkdir(parents=True)
    Checkpoints(tmp_path, keep=1, minutes=0).clear()
    assert sorted(p.name for p in folder.iterdir()) == ["notes", "step-backup"]


@pytest.mark.parametrize("keep", [0, -1])
def test_keeping_no_checkpoint_is_refused(tmp_path, keep):
    with pytest.raises(UserError, match="keep at least 1"):
        Checkpoints(tmp_path, keep=keep, minutes=0)


def test_logdir_that_is_a_file_is_one_line(synth_shards, tmp_path, capsys):
    from demucs_dist.errors import run_main
    from demucs_dist.train import main

    logdir = tmp_path / "notes.txt"
    logdir.write_text("not a folder")
    assert run_main(main, ["--shards", str(synth_shards), "--logdir", str(logdir), *TINY, *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(logdir) in err and len(err.splitlines()) == 1, err
    assert logdir.read_text() == "not a folder"
